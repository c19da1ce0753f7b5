"""Advantage estimators and the value loss in float64, as plain loops and formulas.

See docs/design.md, "The loss math".
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .policy import aggregate

Number = Union[float, int, torch.Tensor]


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over unmasked entries, 0 at masked ones, float64.

    mean and the unbiased variance (divisor n - 1, n = number of unmasked entries) are taken over the
    whole batch, as verl's ``masked_whiten``; with n <= 1 the variance is 0 (verl raises or divides by 0).
    """
    x = values.to(torch.float64)
    m = mask.to(torch.float64)
    n = m.sum()
    mean = (m * x).sum() / torch.clamp(n, min=1.0)
    var = (m * (x - mean) ** 2).sum() / torch.clamp(n - 1.0, min=1.0)
    return m * (x - mean) / torch.sqrt(var + 1e-8)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: ``(advantages, returns)``, float64 ``[B, T]``.

    rewards, values, mask ``[B, T]`` (mask bool / {0,1}, None = ones). Backwards over t:

        delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next

    where V_next and A_next are those of the next *unmasked* step (0 past the end): a masked step is
    skipped, carrying both unchanged, which is verl's ``compute_gae_advantage_return``. returns = A + V.
    ``whiten=True`` applies verl's ``masked_whiten`` to A (batch mean and unbiased variance over
    unmasked steps, (A - mean) / sqrt(var + 1e-8)); returns are taken before whitening, as in verl.
    Unlike verl (which leaves the carried value there), advantages at masked steps are 0, so there
    returns = V; on unmasked steps both agree.
    """
    r = rewards.to(torch.float64)
    v = values.to(torch.float64)
    m = torch.ones_like(r) if mask is None else mask.to(torch.float64)
    batch, length = r.shape
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(batch, dtype=torch.float64, device=r.device)
    next_advantage = torch.zeros(batch, dtype=torch.float64, device=r.device)
    for t in reversed(range(length)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_advantage
        keep = m[:, t] > 0
        advantages[:, t] = torch.where(keep, a_t, torch.zeros_like(a_t))
        next_value = torch.where(keep, v[:, t], next_value)
        next_advantage = torch.where(keep, a_t, next_advantage)
    returns = torch.where(m > 0, advantages + v, v)
    if whiten:
        advantages = masked_whiten(advantages, m)
    return advantages, returns


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "std",
    std_ddof: int = 0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Group-relative advantages (GRPO), float64 ``[B]``.

    rewards ``[B]``, groups contiguous: ``rewards.view(-1, group_size)`` (TRL's layout, each prompt's
    completions adjacent). A = (r - mean_g) / (std_g + eps) with std_g = sqrt(sum (r - mean_g)^2 /
    (group_size - std_ddof)); ``std_ddof=0`` is the seed's ``np.std``, 1 is TRL / verl's ``torch.std``.
    ``scale="none"`` gives r - mean_g (Dr. GRPO, TRL ``scale_rewards="none"``).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of the batch size {rewards.shape[0]}, got {group_size}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale: expected 'std' or 'none', got {scale!r}")
    if scale == "std" and group_size - std_ddof < 1:
        raise ValueError(f"group_size: expected > std_ddof={std_ddof} for scale='std', got {group_size}")
    groups = rewards.to(torch.float64).view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    std = torch.sqrt((centred**2).sum(dim=1, keepdim=True) / (group_size - std_ddof))
    return (centred / (std + eps)).reshape(-1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip: Optional[float] = None,
    loss_agg: str = "token-mean",
    normalizer: Optional[Number] = None,
    return_clipfrac: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Clipped value loss, 0-d float64, differentiable in ``values``.

    values, old_values, returns, mask ``[B, T]`` (or ``[N]``). Per token
    0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = v_old + clamp(v - v_old, -clip, clip), or
    0.5 * (v - R)^2 with ``clip=None`` (verl's ``compute_value_loss`` / OpenRLHF's ``ValueLoss``),
    reduced with ``aggregate(..., loss_agg, normalizer)``. ``return_clipfrac=True`` returns
    ``(loss, clipfrac)``, clipfrac = sum(m [(v_clip - R)^2 > (v - R)^2]) / max(sum(m), 1) (verl's
    ``vf_clipfrac``), 0 with ``clip=None``.
    """
    v = values.to(torch.float64)
    old = old_values.detach().to(torch.float64)
    target = returns.detach().to(torch.float64)
    err = (v - target) ** 2
    clipped = torch.zeros_like(err)
    if clip is not None:
        v_clipped = old + torch.clamp(v - old, -clip, clip)
        clipped = ((v_clipped - target) ** 2 > err).to(torch.float64).detach()
        err = torch.maximum(err, (v_clipped - target) ** 2)
    loss = aggregate(0.5 * err, mask, loss_agg, normalizer)
    if not return_clipfrac:
        return loss
    m = torch.ones_like(err) if mask is None else mask.to(device=err.device, dtype=torch.float64)
    return loss, (m * clipped).sum() / torch.clamp(m.sum(), min=1.0)
