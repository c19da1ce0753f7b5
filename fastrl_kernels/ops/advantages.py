"""Advantage estimators and the value loss: batched, float32, no host syncs.

These are O(B x T) and need no kernel; they run on whatever device their inputs live on. The float64
versions in ``fastrl_kernels.reference.advantages`` define the results (same docstrings, same math).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import as_float_mask, canonical_loss_agg, check_float_tensor, check_normalizer, check_real, check_shape
from ..losses.aggregation import aggregate

Number = Union[float, int, torch.Tensor]


def _check_2d(name: str, tensor: torch.Tensor) -> None:
    check_float_tensor(name, tensor)
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {tuple(tensor.shape)}")


def _whiten(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = m.sum()
    mean = (m * x).sum() / torch.clamp(n, min=1.0)
    var = (m * (x - mean) ** 2).sum() / torch.clamp(n - 1.0, min=1.0)
    return m * (x - mean) * torch.rsqrt(var + 1e-8)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: ``(advantages, returns)``, float32 ``[B, T]``, no gradient.

    rewards, values ``[B, T]`` (any float dtype), mask bool / {0,1} ``[B, T]`` (None = ones). Backwards
    over t: delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next, where V_next and
    A_next belong to the next unmasked step (0 past the end); masked steps are skipped, carrying both
    (verl's ``compute_gae_advantage_return``). returns = A + V. ``whiten=True``: verl's
    ``masked_whiten`` of A (batch mean, unbiased variance over unmasked steps, eps 1e-8; variance 0
    when at most one step is unmasked); returns are taken before whitening. Advantages are 0 at masked
    steps (where returns = V). One vectorised step per t over the batch. ``gamma`` and ``lam`` lie in
    [0, 1] (ValueError otherwise); B = 0 or T = 0 gives empty results.
    """
    _check_2d("rewards", rewards)
    check_shape("values", values, rewards.shape, "the shape of rewards")
    check_float_tensor("values", values)
    # Discounts outside [0, 1] make A grow geometrically with T (or flip sign step by step).
    check_real("gamma", gamma, "a number in [0, 1]", lambda x: 0.0 <= x <= 1.0)
    check_real("lam", lam, "a number in [0, 1]", lambda x: 0.0 <= x <= 1.0)
    with torch.no_grad():
        r = rewards.to(torch.float32)
        v = values.to(torch.float32)
        m = as_float_mask(mask, r.shape, r, like_name="rewards", what="the shape of rewards")
        keep = m > 0
        batch, length = r.shape
        # delta needs V_next of the next *unmasked* step, known only inside the backward sweep.
        advantages = torch.zeros_like(r)
        next_value = r.new_zeros(batch)
        next_advantage = r.new_zeros(batch)
        discount = gamma * lam
        for t in range(length - 1, -1, -1):
            a_t = r[:, t] + gamma * next_value - v[:, t] + discount * next_advantage
            keep_t = keep[:, t]
            next_value = torch.where(keep_t, v[:, t], next_value)
            next_advantage = torch.where(keep_t, a_t, next_advantage)
            advantages[:, t] = a_t
        advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
        returns = advantages + v
        if whiten:
            advantages = _whiten(advantages, m)
    return advantages, returns


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "std",
    std_ddof: int = 0,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Group-relative advantages (GRPO): float32 ``[B]``, no gradient.

    rewards ``[B]`` (any float dtype), groups contiguous: ``rewards.view(-1, group_size)`` (TRL's
    layout). A = (r - mean_g) / (std_g + eps), std_g with ``std_ddof`` (0: the seed's ``np.std``;
    1: TRL / verl's ``torch.std``); ``scale="none"``: r - mean_g (Dr. GRPO, TRL ``scale_rewards="none"``).
    ``eps`` is finite and > 0, so a group of equal rewards gets 0 (not 0 / 0); a group of one
    (``group_size=1``) gets 0 too, and is refused with ``std_ddof=1`` (its sample std divides by 0).
    """
    check_float_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of the batch size {rewards.shape[0]}, got {group_size}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale: expected 'std' or 'none', got {scale!r}")
    if not isinstance(std_ddof, int) or isinstance(std_ddof, bool) or std_ddof < 0:
        raise ValueError(f"std_ddof: expected an int >= 0 (0: population std, 1: sample std), got {std_ddof!r}")
    # eps = 0 would turn a group of equal rewards (std 0) into 0 / 0 = NaN.
    check_real("eps", eps, "a number > 0", lambda x: x > 0)
    if scale == "std" and group_size - std_ddof < 1:
        raise ValueError(f"group_size: expected > std_ddof={std_ddof} for scale='std', got {group_size}")
    with torch.no_grad():
        groups = rewards.to(torch.float32).view(-1, group_size)
        centred = groups - groups.mean(dim=1, keepdim=True)
        if scale == "std":
            std = torch.sqrt((centred * centred).sum(dim=1, keepdim=True) / (group_size - std_ddof))
            centred = centred / (std + eps)
    return centred.reshape(-1)


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
    """Clipped value loss: 0-d float32, differentiable in ``values``.

    values, old_values, returns, mask ``[B, T]`` or ``[N]`` (one sequence). Per token
    0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = v_old + clamp(v - v_old, -clip, clip); ``clip=None``
    gives 0.5 * (v - R)^2 (verl's ``compute_value_loss``, OpenRLHF's ``ValueLoss``). Reduced like the
    policy losses (``loss_agg``: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
    "seq-mean-token-sum-norm", "sum" or TRL's names; ``normalizer``, a finite number > 0, replaces the
    default divisor). No tokens (or none unmasked) give 0. ``clip`` is None or a finite number > 0.
    ``return_clipfrac=True`` returns ``(loss, clipfrac)``: clipfrac, 0-d float32 without gradient, is the
    fraction of unmasked tokens where the clipped error is the larger, (v_clip - R)^2 > (v - R)^2 (verl's
    ``vf_clipfrac``, TRL's ``value_clipfrac``); 0 with ``clip=None`` or no unmasked token.
    """
    check_float_tensor("values", values)
    if values.dim() not in (1, 2):
        raise ValueError(f"values: expected shape [B, T] or [N], got {tuple(values.shape)}")
    check_shape("old_values", old_values, values.shape, "the shape of values")
    check_shape("returns", returns, values.shape, "the shape of values")
    if clip is not None:
        check_real("clip", clip, "a number > 0 or None", lambda x: x > 0)
    mode = canonical_loss_agg(loss_agg)
    check_normalizer(normalizer)
    if not isinstance(return_clipfrac, bool):
        raise ValueError(f"return_clipfrac: expected True or False, got {return_clipfrac!r}")
    v = values.to(torch.float32)
    old = old_values.detach().to(torch.float32)
    target = returns.detach().to(torch.float32)
    m = as_float_mask(mask, values.shape, values, like_name="values", what="the shape of values")
    if v.dim() == 1:
        v, old, target, m = v[None], old[None], target[None], m[None]
    err = (v - target) ** 2
    clipped = None
    if clip is not None:
        clipped_err = (old + torch.clamp(v - old, -clip, clip) - target) ** 2
        clipped = (clipped_err > err).detach()
        err = torch.maximum(err, clipped_err)
    loss = aggregate(0.5 * err, m, mode, normalizer)
    if not return_clipfrac:
        return loss
    with torch.no_grad():
        if clipped is None:
            clipfrac = torch.zeros((), dtype=torch.float32, device=v.device)
        else:
            clipfrac = (clipped * m).sum() / m.sum().clamp(min=1.0)
    return loss, clipfrac
