"""Per-token log-probabilities and entropy in float64, straight from the definitions.

No streaming, no shift tricks beyond ``logsumexp``: this is the yardstick for the fused core op
(``fastrl_kernels.core``), so it must be checkable against the formulas by eye.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import check_logits_targets, check_temperature
from ..core import CoreStats


def transformed_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """x = c * tanh(logit_scale * z / c) / temperature with ``softcap`` = c, else logit_scale * z / temperature.

    Float64, differentiable in ``logits``; the softcap is Gemma-2's ``final_logit_softcapping``.
    """
    check_temperature(temperature)
    z = logits.to(torch.float64) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> CoreStats:
    """All statistics of the core op, float64, of the leading shape of ``logits``.

    logits ``[..., V]`` (any float dtype), targets int64 ``[...]`` in [0, V) or ``ignore_index``.
    With x = ``transformed_logits(logits)`` and p = softmax(x):

        lse = log sum_j e^{x_j}         logp = x_y - lse
        mean_x = sum_j p_j x_j          entropy = -sum_j p_j log p_j  (= lse - mean_x)
        log_sum_p2 = log sum_j p_j^2    (the WPO weight's ingredient)

    Rows whose target is ``ignore_index`` get logp = 0 and entropy = 0 (no gradient); their lse,
    mean_x and log_sum_p2 are still those of the row. A row holding NaN, or +inf without softcap, gives
    NaN logp and entropy; a target at a -inf logit gives logp = -inf. Differentiable in ``logits``
    through every field.
    """
    check_logits_targets(logits, targets, ignore_index)
    x = transformed_logits(logits, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    lse = torch.logsumexp(x, dim=-1)
    log_p = x - lse.unsqueeze(-1)
    p = torch.exp(log_p)

    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.gather(log_p, -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    # p_j log p_j -> 0 as p_j -> 0: a -inf logit (a masked vocabulary entry) contributes 0, where the
    # plain product would give 0 * -inf = NaN (in value and in gradient).
    finite_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    finite_x = torch.where(p > 0, x, torch.zeros_like(x))
    entropy = -(p * finite_log_p).sum(dim=-1)
    # A row holding +inf (after the transform; a softcap bounds it) or NaN has no distribution: NaN
    # logp and entropy, as on every fused backend (logsumexp alone would give logp = -inf there).
    undefined = torch.isnan(lse) | (lse == float("inf"))
    nan = torch.full_like(logp, float("nan"))
    logp, entropy = torch.where(undefined, nan, logp), torch.where(undefined, nan, entropy)
    zero = torch.zeros_like(logp)
    return CoreStats(
        logp=torch.where(valid, logp, zero),
        entropy=torch.where(valid, entropy, zero),
        lse=lse,
        mean_x=(p * finite_x).sum(dim=-1),
        log_sum_p2=torch.logsumexp(2.0 * log_p, dim=-1),
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` of ``token_stats(logits, targets, **options)``: float64 of the leading shape,
    differentiable in ``logits``; ``options`` are token_stats' (temperature, logit_scale, softcap, ignore_index).

    logp = log softmax(x)[target], entropy = -sum p log p of softmax(x), x as in ``transformed_logits``;
    0 (and zero gradient) on rows whose target is ``ignore_index``.
    """
    stats = token_stats(logits, targets, **options)
    return stats.logp, stats.entropy
