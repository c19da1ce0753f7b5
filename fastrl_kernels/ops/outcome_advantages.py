"""Outcome-reward advantage estimators under verl's names: batched, float32, no host syncs.

Each estimator in ``ESTIMATORS`` takes token rewards ``r`` and a float mask ``m`` ``[B, T]``, dense group
ids ``g`` ``[B]`` (or None) and the options, and returns ``(advantages, returns)`` ``[B, T]``. Groups are
reduced with ``index_add_`` / ``scatter_reduce_`` into buffers of size B, so no group count ever reaches
the host. The float64 twins in ``fastrl_kernels.reference.outcome_advantages`` define the results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from ..config import as_float_mask, check_float_tensor, check_real, check_shape
from .advantages import _whiten

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def dense_groups(index: torch.Tensor) -> torch.Tensor:
    """Group ids 0, 1, ... (in order of the sorted ids) for any integer ids ``[B]``, without a host sync."""
    ids, order = torch.sort(index.to(torch.int64), stable=True)
    starts = torch.ones_like(ids)
    starts[1:] = (ids[1:] != ids[:-1]).to(torch.int64)
    return torch.empty_like(ids).scatter_(0, order, torch.cumsum(starts, 0) - 1)


def _group_sum(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per row: the sum of ``x`` over the row's group."""
    return torch.zeros_like(x).index_add_(0, g, x)[g]


def _group_stats(s: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: group size n, group mean (0 for a group of one) and sample std (1 for a group of one)."""
    n = _group_sum(torch.ones_like(s), g)
    single = n < 2
    mean = torch.where(single, torch.zeros_like(s), _group_sum(s, g) / n)
    centred = s - mean
    var = _group_sum(centred * centred, g) / torch.clamp(n - 1.0, min=1.0)
    return n, mean, torch.where(single, torch.ones_like(s), torch.sqrt(var))


def _per_token(a: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = a[:, None] * m
    return out, out


def _grpo(r, m, g, *, norm_adv_by_std, std_scope, epsilon, **_):
    s = r.sum(-1)
    _, mean, std = _group_stats(s, g)
    a = s - mean
    if norm_adv_by_std:
        if std_scope == "batch":
            # One std for the whole batch (unbiased, 0 for a batch of one).
            d = s - s.mean()
            std = torch.sqrt((d * d).sum() / max(s.shape[0] - 1, 1)).expand_as(s)
        a = a / (std + epsilon)
    return _per_token(a, m)


def _rloo(r, m, g, **_):
    s = r.sum(-1)
    n, mean, _ = _group_stats(s, g)
    scale = n / torch.clamp(n - 1.0, min=1.0)
    return _per_token(torch.where(n > 1, s * scale - mean * scale, s), m)


def _reinforce_plus_plus(r, m, g, *, gamma, **_):
    returns = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        new = r[:, t] + gamma * running
        returns[:, t] = new * m[:, t]
        running = torch.where(m[:, t] > 0, new, running)
    return _whiten(returns, m), returns


def _reinforce_plus_plus_baseline(r, m, g, **_):
    s = r.sum(-1)
    _, mean, _ = _group_stats(s, g)
    a = _whiten((s - mean)[:, None] * m, m)
    return a, a


def _remax(r, m, g, *, reward_baselines, **_):
    returns = torch.flip(torch.cumsum(torch.flip(r * m, [1]), 1), [1])
    return returns - reward_baselines.to(torch.float32)[:, None] * m, returns


def _opo(r, m, g, **_):
    s = r.sum(-1)
    length = m.sum(-1)
    n = _group_sum(torch.ones_like(s), g)
    total = _group_sum(length, g)
    baseline = _group_sum(length * s, g) / torch.where(total > 0, total, torch.ones_like(total))
    return _per_token(s - torch.where(n > 1, baseline, torch.zeros_like(s)), m)


def _grpo_passk(r, m, g, *, norm_adv_by_std, epsilon, **_):
    s = r.sum(-1)
    rows = torch.arange(s.shape[0], device=s.device)
    top = torch.full_like(s, -torch.inf).scatter_reduce_(0, g, s, "amax")[g]
    # The first row holding its group's maximum gets the advantage; its value leaves the group for the second.
    first = torch.full_like(rows, s.shape[0]).scatter_reduce_(0, g, torch.where(s == top, rows, s.shape[0]), "amin")
    best = first[g] == rows
    rest = torch.where(best, torch.full_like(s, -torch.inf), s)
    second = torch.full_like(s, -torch.inf).scatter_reduce_(0, g, rest, "amax")[g]
    a = top - second
    if norm_adv_by_std:
        _, _, std = _group_stats(s, g)
        a = a / (std + epsilon)
    return _per_token(torch.where(best, a, torch.zeros_like(s)), m)


def _gpg(r, m, g, **_):
    s = r.sum(-1)
    _, mean, _ = _group_stats(s, g)
    alpha = s.shape[0] / torch.clamp(torch.count_nonzero(s), min=1).to(s.dtype)
    return _per_token(alpha * (s - mean), m)


ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce_plus_plus": _reinforce_plus_plus,
    "reinforce_plus_plus_baseline": _reinforce_plus_plus_baseline,
    "remax": _remax,
    "opo": _opo,
    "grpo_passk": _grpo_passk,
    "gpg": _gpg,
}
GROUPED = frozenset(ESTIMATORS) - {"reinforce_plus_plus", "remax"}


def check_groups(batch: int, index: Optional[torch.Tensor], group_size: Optional[int], device) -> torch.Tensor:
    """Dense group ids ``[B]`` from exactly one of ``index`` (any integer ids) or ``group_size``."""
    if (index is None) == (group_size is None):
        raise ValueError("index, group_size: expected exactly one of them (the group of each row)")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1 or batch % group_size:
            raise ValueError(f"group_size: expected a divisor of the batch size {batch}, got {group_size!r}")
        return torch.arange(batch, device=device) // group_size
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index: expected an integer torch.Tensor of shape ({batch},), got {type(index).__name__}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index: expected an integer dtype (group id per row), got {index.dtype}")
    check_shape("index", index, (batch,), "one group id per row of rewards")
    if index.device != device:
        raise ValueError(f"index: expected the device of rewards ({device}), got {index.device}")
    return dense_groups(index)


def outcome_advantages(
    rewards: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    estimator: str = "grpo",
    index: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    norm_adv_by_std: bool = True,
    std_scope: str = "group",
    epsilon: float = 1e-6,
    gamma: float = 1.0,
    reward_baselines: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome-reward advantages: ``(advantages, returns)``, float32 ``[B, T]``, no gradient.

    rewards ``[B, T]`` token rewards (the outcome reward on the last token; a row's score is its sum),
    mask bool / {0,1} ``[B, T]`` (None = ones). Groups (the completions of one prompt) come as ``index``
    (an integer id per row, any ids, any group sizes) or as ``group_size`` (contiguous groups). Each
    estimator equals verl's ``compute_<estimator>_outcome_advantage`` (returns = advantages unless said):

    - ``grpo``: (s - mean_g) / (std_g + epsilon), sample std; ``norm_adv_by_std=False``: s - mean_g.
      A group of one has mean 0, std 1. ``std_scope="batch"``: one sample std of all scores instead of
      std_g (TRL's ``scale_rewards="batch"``).
    - ``rloo``: n / (n - 1) * (s - mean_g) (leave-one-out baseline); a group of one keeps s.
    - ``reinforce_plus_plus``: discounted returns (``gamma``; masked steps skipped), whitened over the
      batch; returns are the unwhitened returns. No groups.
    - ``reinforce_plus_plus_baseline``: s - mean_g on every unmasked token, whitened over the batch.
    - ``remax``: returns = reverse cumulative sum of masked rewards, A = returns - ``reward_baselines``
      (``[B]``, the greedy completion's reward). No groups.
    - ``opo``: s minus the length-weighted group mean (lengths = mask sums); 0 baseline for a group of one.
    - ``grpo_passk``: only the group's best row (its first on ties) gets (max - second max), divided by
      std_g + epsilon unless ``norm_adv_by_std=False``; every group needs two rows.
    - ``gpg``: B / (number of nonzero scores) * (s - mean_g) (verl's ``f_norm`` = 1).

    Whitening is verl's ``masked_whiten``, with variance 0 where at most one token is unmasked.
    ``epsilon`` > 0 (so equal rewards give 0, not NaN), ``gamma`` in [0, 1]; B = 0 gives empty results.
    """
    check_float_tensor("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape [B, T], got {tuple(rewards.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {sorted(ESTIMATORS)}, got {estimator!r}")
    if std_scope not in ("group", "batch"):
        raise ValueError(f"std_scope: expected 'group' or 'batch', got {std_scope!r}")
    if std_scope == "batch" and estimator != "grpo":
        raise ValueError(f"std_scope: 'batch' applies to estimator='grpo' only, got estimator={estimator!r}")
    check_real("epsilon", epsilon, "a number > 0", lambda x: x > 0)
    check_real("gamma", gamma, "a number in [0, 1]", lambda x: 0.0 <= x <= 1.0)
    batch = rewards.shape[0]
    if estimator == "remax":
        check_float_tensor("reward_baselines", reward_baselines)
        check_shape("reward_baselines", reward_baselines, (batch,), "one greedy reward per row of rewards")
    elif reward_baselines is not None:
        raise ValueError(f"reward_baselines: used by estimator='remax' only, got estimator={estimator!r}")
    groups = None
    if estimator in GROUPED:
        groups = check_groups(batch, index, group_size, rewards.device)
    elif index is not None or group_size is not None:
        raise ValueError(f"index, group_size: estimator={estimator!r} takes no groups")
    with torch.no_grad():
        r = rewards.to(torch.float32)
        m = as_float_mask(mask, r.shape, r, like_name="rewards", what="the shape of rewards")
        if estimator == "grpo_passk" and batch:
            n = _group_sum(r.new_ones(batch), groups)
            if bool((n < 2).any()):  # one host sync, for this refusal only
                raise ValueError("index, group_size: grpo_passk needs at least two rows in every group")
        return ESTIMATORS[estimator](
            r, m, groups, norm_adv_by_std=bool(norm_adv_by_std), std_scope=std_scope, epsilon=float(epsilon),
            gamma=float(gamma), reward_baselines=reward_baselines,
        )
