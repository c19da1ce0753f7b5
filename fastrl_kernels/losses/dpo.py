"""The DPO family on sequence log-probs: O(N) algebra shared by every backend (docs/design.md, "The loss math").

Ordinary differentiable PyTorch on ``[B]`` (pair) and ``[2B, T]`` (token) tensors, computed in float32
or higher, with no host syncs and no data-dependent Python branches (options are static), so it runs
under ``torch.compile``. The fused op calls ``fused_dpo_objective`` inside its forward and takes
dL/dlogp from autograd on it. Formulas and citations: ``fastrl_kernels.reference.dpo``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import DPOConfig
from .dpo_types import F_DIVERGENCE_SCORES, pair_loss


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half / bf16 / fp32 inputs, float64 for float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def f_divergence_scores(logratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """Scores s = f'(e^u) (constants dropped) of f-DPO; see ``reference.dpo.f_divergence_scores``."""
    if f_divergence not in F_DIVERGENCE_SCORES:
        raise ValueError(f"f_divergence: unknown {f_divergence!r}")
    return F_DIVERGENCE_SCORES[f_divergence](logratios, f_alpha)


def check_pair_weights(chosen_weights: Optional[torch.Tensor], rejected_weights: Optional[torch.Tensor]) -> None:
    """WPO pair weights come together: a product of one of them with a missing other is no weight."""
    if (chosen_weights is None) != (rejected_weights is None):
        raise ValueError("chosen_weights / rejected_weights: expected both [B] tensors or neither, got one")


def dpo_pair_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    config: DPOConfig,
    chosen_weights: Optional[torch.Tensor] = None,
    rejected_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` (mixture-weighted, times detached ``chosen_weights * rejected_weights``
    when given) and the detached rewards beta * (policy - ref), in ``compute_dtype``.

    Same math as ``reference.dpo.dpo_loss``; differentiable in the policy (and ref) log-probs.
    """
    dtype = compute_dtype(policy_chosen_logps)
    pc, pr, rc, rr = (x.to(dtype) for x in (policy_chosen_logps, policy_rejected_logps,
                                             ref_chosen_logps, ref_rejected_logps))
    u_c, u_r = pc - rc, pr - rr
    s_c = f_divergence_scores(u_c, config.f_divergence, config.f_alpha)
    s_r = f_divergence_scores(u_r, config.f_divergence, config.f_alpha)
    terms = dict(pc=pc, pr=pr, rc=rc, rr=rr, u_c=u_c, u_r=u_r, s_c=s_c, s_r=s_r, h=config.beta * (s_c - s_r))
    losses = None
    for name, weight in zip(config.loss_types, config.resolved_loss_weights):
        term = pair_loss(name, terms, config)
        term = term if weight == 1.0 else weight * term
        losses = term if losses is None else losses + term
    check_pair_weights(chosen_weights, rejected_weights)
    if chosen_weights is not None:
        losses = losses * (chosen_weights.to(dtype) * rejected_weights.to(dtype)).detach()
    return losses, (config.beta * u_c).detach(), (config.beta * u_r).detach()


def pair_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over pairs, 0 for an empty batch (the size is static: no host sync)."""
    return values.sum() / max(values.shape[0], 1)


def dpo_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """margins = chosen - rejected rewards ``[B]``, accuracy = mean(chosen > rejected) (0-d)."""
    margins = chosen_rewards - rejected_rewards
    return {"margins": margins, "accuracy": pair_mean((margins > 0).to(margins.dtype))}


def sequence_logps(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    average: bool = False,
    ld_alpha: Optional[float] = None,
) -> torch.Tensor:
    """Sequence log-probs ``[R]`` from token log-probs and a {0,1} float mask, both ``[R, T]``.

    Sum of mask * logp; with ``ld_alpha`` (rows [0:B] paired with [B:2B]) the response tokens past
    the shorter response of the pair weigh ``ld_alpha`` (LD-DPO, ``reference.dpo.ld_token_weights``);
    ``average=True`` divides by the response length (clamped at 1).
    """
    dtype = compute_dtype(token_logps)
    logp, m = token_logps.to(dtype), mask.to(dtype)
    weights = m
    if ld_alpha is not None:
        half = m.shape[0] // 2
        lengths = m.sum(dim=1)
        shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
        tail = torch.cumsum(m, dim=1) > shared[:, None]
        weights = m * torch.where(tail, ld_alpha, 1.0).to(dtype)
    total = (logp * weights).sum(dim=1)
    if average:
        total = total / m.sum(dim=1).clamp(min=1.0)
    return total


def wpo_sequence_weights(token_logps: torch.Tensor, log_sum_p2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO weights ``[R]``, detached: exp(mean over response tokens of logp - log sum_v p_v^2)."""
    dtype = compute_dtype(token_logps)
    m = mask.to(dtype)
    aligned = (token_logps.detach().to(dtype) - log_sum_p2.detach().to(dtype)) * m
    return torch.exp(aligned.sum(dim=1) / m.sum(dim=1).clamp(min=1.0))


def fused_dpo_objective(
    config: DPOConfig,
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    log_sum_p2: Optional[torch.Tensor],
    mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``fused_dpo_loss`` as a function of flat token log-probs ``[2B * T]``.

    ``mask`` ``[2B, T]`` float {0,1} (response tokens); rows [0:B] chosen, [B:2B] rejected. Returns the
    mean pair loss (0-d) and detached aux: chosen_rewards, rejected_rewards, margins ``[B]``, accuracy
    (0-d), policy_chosen_logps, policy_rejected_logps ``[B]``. ``entropy`` is unused.
    """
    rows, half = mask.shape[0], mask.shape[0] // 2
    token_logps = logp.view(rows, -1)
    seq = sequence_logps(token_logps, mask, average=config.average_logps, ld_alpha=config.ld_alpha)
    chosen_w = rejected_w = None
    if config.use_weighting:
        weights = wpo_sequence_weights(token_logps, log_sum_p2.view(rows, -1), mask)
        chosen_w, rejected_w = weights[:half], weights[half:]
    losses, chosen_rewards, rejected_rewards = dpo_pair_losses(
        seq[:half], seq[half:], ref_chosen_logps, ref_rejected_logps, config, chosen_w, rejected_w
    )
    aux = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    aux.update(dpo_metrics(chosen_rewards, rejected_rewards))
    aux["policy_chosen_logps"] = seq[:half].detach()
    aux["policy_rejected_logps"] = seq[half:].detach()
    return pair_mean(losses), aux
