"""Triton backend of the two core primitives (``fastrl_kernels.core``): ``stats`` and ``grad``.

Importing this package imports ``triton`` (the real package: modules here use absolute imports);
``import fastrl_kernels`` never does, the backend dispatch imports it on first use. On CPU the
kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is imported.

- ``online_softmax``: the shared online-softmax block, the logit transform and the launch table;
- ``stats``: pass 1, per-row logp, entropy, lse, E[x] (and log sum p^2) in one read;
- ``grad``: pass 2, dL/dlogits in one read and one write, in place when ``out`` is the logits.
"""

from ..core import float64_on_float32_rows
from .grad import grad
from .online_softmax import LaunchConfig, launch_config
from .stats import stats

# float64 logits (for testing) run on a float32 copy of the rows, as on the native backend.
stats, grad = float64_on_float32_rows(stats, grad)

__all__ = ["LaunchConfig", "grad", "launch_config", "stats"]
