"""Reduction of per-token values ``[B, T]`` to the scalar loss (``loss_agg``; docs/design.md, "The loss math").

Each mode divides by a default denominator that ``normalizer`` replaces (a global count across
micro-batches and ranks: DAPO / BNPO, TRL's ``num_items_in_batch``). Empty masks give 0, never NaN.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import check_normalizer
from .aggregation_modes import AGGREGATIONS

Normalizer = Optional[Union[float, int, torch.Tensor]]


def aggregation_weights(mask: torch.Tensor, mode: str, normalizer: Normalizer = None, *,
                        token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token weights ``w [B, T]`` with ``aggregate(x) == sum(w * x)`` for every mode.

    They depend on the mask only, so a loss aggregated this way is a sum of per-token terms: the
    lm_head path evaluates it chunk by chunk and still gets the exact gradient. ``token_count``:
    ``mask.sum().clamp(min=1.0)`` when the caller holds it already (token-mean's default divisor).
    """
    check_normalizer(normalizer)  # 0, negative, NaN or inf would give an inf / NaN / sign-flipped loss
    if mode == "token-mean" and token_count is not None:
        weights, default = mask, token_count
    elif mode in AGGREGATIONS:
        weights, default = AGGREGATIONS[mode](mask)
    else:
        raise ValueError(f"loss_agg: unknown mode {mode!r}")
    return weights / (default if normalizer is None else normalizer)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: Normalizer = None, *,
              token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aggregate ``values [B, T]`` under float ``mask [B, T]``; ``mode`` is a canonical name of config.py.

    token-mean (verl "token-mean", TRL "bnpo"/"dapo"), seq-mean-token-mean (TRL "grpo"),
    seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO: / (B * T), TRL "dr_grpo"), sum.
    ``token_count`` as in ``aggregation_weights``.
    """
    return (values * aggregation_weights(mask, mode, normalizer, token_count=token_count)).sum()
