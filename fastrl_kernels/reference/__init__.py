"""Float64 reference formulas: unfused, obvious, differentiable; the independent check of every backend.

Nothing here imports the formulas of ``fastrl_kernels.losses`` or ``fastrl_kernels.ops`` (``config.py``, which
the reference shares, takes the accepted names from the registry modules of ``losses/``). ``seed`` holds four
numpy sketches of the losses (docs/design.md, "Seed functions"); it loads NumPy, so it is imported on first use
(``fastrl_kernels.reference.seed`` or ``from fastrl_kernels.reference import seed``).
"""

import importlib

from .advantages import gae, group_advantages, masked_whiten, value_loss
from .logprobs import token_logprobs, token_stats, transformed_logits
from .policy import aggregate, kl_penalty, policy_loss, policy_loss_from_logprobs

__all__ = [
    "aggregate",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "policy_loss_from_logprobs",
    "seed",  # noqa: F405 (imported on first use, see __getattr__)
    "token_logprobs",
    "token_stats",
    "transformed_logits",
    "value_loss",
]

from . import dpo
from .dpo import *  # noqa: F403, E402  (dpo_loss, sequence_logprobs, ...)

__all__ += dpo.__all__


def __getattr__(name: str):
    if name == "seed":
        return importlib.import_module(f"{__name__}.seed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
