"""The aggregation modes: one registry entry per canonical ``loss_agg`` name (docs/design.md, "Recipes").

Each entry maps a float mask ``[B, T]`` to ``(weights, default divisor)``: the loss is
``sum(weights * values) / divisor``, where ``normalizer`` replaces the default divisor. ``config.LOSS_AGG_MODES``
is this registry's keys and ``reference/policy.AGGREGATIONS`` has an entry of its own for each (a test
checks both). This module imports no other part of the package: ``config.py`` reads its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

Divisor = Union[float, torch.Tensor]
Aggregation = Callable[[torch.Tensor], tuple[torch.Tensor, Divisor]]


def _seq_mean_token_mean(mask: torch.Tensor) -> tuple[torch.Tensor, Divisor]:
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0), float(mask.shape[0])


AGGREGATIONS: dict[str, Aggregation] = {
    # verl "token-mean"; TRL "bnpo" and "dapo" (with the global token count as normalizer)
    "token-mean": lambda mask: (mask, mask.sum().clamp(min=1.0)),
    # TRL "grpo": each sequence's token mean, averaged over sequences
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": lambda mask: (mask, float(mask.shape[0])),
    # Dr. GRPO (TRL "dr_grpo"): a constant divisor B * T, whatever the mask
    "seq-mean-token-sum-norm": lambda mask: (mask, float(mask.shape[0] * mask.shape[1])),
    "sum": lambda mask: (mask, 1.0),
}
