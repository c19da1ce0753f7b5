"""Outcome-reward advantage estimators in float64: one Python loop over the groups, one formula each.

``ESTIMATORS`` maps verl's estimator names to functions ``(scores or rewards, mask, groups, options)``
returning ``(advantages, returns)`` ``[B, T]``; ``outcome_advantages`` is the entry point (same arguments
as ``fastrl_kernels.outcome_advantages``, no argument checks). See docs/design.md, "The loss math".
"""

from __future__ import annotations

from typing import Optional

import torch

from .advantages import masked_whiten


def _groups(index: Optional[torch.Tensor], group_size: Optional[int], batch: int) -> dict:
    """Group id -> list of its rows, in row order."""
    ids = [i // group_size for i in range(batch)] if index is None else index.tolist()
    groups: dict = {}
    for row, gid in enumerate(ids):
        groups.setdefault(gid, []).append(row)
    return groups


def _mean(values: list) -> float:
    return sum(values) / len(values)


def _sample_std(values: list) -> float:
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _broadcast(per_row: list, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.tensor(per_row, dtype=torch.float64).reshape(-1, 1) * mask
    return out, out


def grpo(rewards, mask, groups, *, norm_adv_by_std=True, std_scope="group", epsilon=1e-6, **_):
    """(s - mean_g) / (std_g + epsilon); a group of one: mean 0, std 1; ``std_scope="batch"``: std of all s."""
    scores = rewards.sum(-1).tolist()
    batch_std = _sample_std(scores) if len(scores) > 1 else 0.0
    out = [0.0] * len(scores)
    for rows in groups.values():
        values = [scores[i] for i in rows]
        mean, std = (0.0, 1.0) if len(rows) == 1 else (_mean(values), _sample_std(values))
        if std_scope == "batch":
            std = batch_std
        for i in rows:
            out[i] = (scores[i] - mean) / (std + epsilon) if norm_adv_by_std else scores[i] - mean
    return _broadcast(out, mask)


def rloo(rewards, mask, groups, **_):
    """s minus the mean of the other rows of its group, = n / (n - 1) (s - mean_g); a group of one keeps s."""
    scores = rewards.sum(-1).tolist()
    out = list(scores)
    for rows in groups.values():
        if len(rows) > 1:
            for i in rows:
                others = [scores[j] for j in rows if j != i]
                out[i] = scores[i] - _mean(others)
    return _broadcast(out, mask)


def reinforce_plus_plus(rewards, mask, groups, *, gamma=1.0, **_):
    """Discounted returns over unmasked steps (masked ones skipped), whitened over the batch."""
    batch, length = rewards.shape
    returns = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        running = 0.0
        for t in reversed(range(length)):
            if mask[b, t] > 0:
                running = float(rewards[b, t]) + gamma * running
                returns[b, t] = running
    return masked_whiten(returns, mask) * mask, returns


def reinforce_plus_plus_baseline(rewards, mask, groups, **_):
    """s - mean_g (0 for a group of one) on every unmasked token, whitened over the batch."""
    centred, _ = grpo(rewards, mask, groups, norm_adv_by_std=False)
    out = masked_whiten(centred, mask) * mask
    return out, out


def remax(rewards, mask, groups, *, reward_baselines=None, **_):
    """returns_t = sum over t' >= t of masked rewards; A = returns - greedy reward on unmasked tokens."""
    masked = rewards * mask
    batch, length = rewards.shape
    returns = torch.stack([masked[:, t:].sum(-1) for t in range(length)], dim=1) if length else masked
    return returns - reward_baselines.to(torch.float64).reshape(-1, 1) * mask, returns


def opo(rewards, mask, groups, **_):
    """s minus its group's length-weighted mean score (lengths = unmasked tokens); 0 for a group of one."""
    scores = rewards.sum(-1).tolist()
    lengths = mask.sum(-1).tolist()
    out = list(scores)
    for rows in groups.values():
        if len(rows) > 1:
            total = sum(lengths[i] for i in rows)
            baseline = sum(lengths[i] * scores[i] for i in rows) / total if total > 0 else 0.0
            for i in rows:
                out[i] = scores[i] - baseline
    return _broadcast(out, mask)


def grpo_passk(rewards, mask, groups, *, norm_adv_by_std=True, epsilon=1e-6, **_):
    """The group's best row (first of equals) gets max - second max (over std_g + epsilon); others 0."""
    scores = rewards.sum(-1).tolist()
    out = [0.0] * len(scores)
    for rows in groups.values():
        ordered = sorted(rows, key=lambda i: (-scores[i], i))
        advantage = scores[ordered[0]] - scores[ordered[1]]
        if norm_adv_by_std:
            advantage /= _sample_std([scores[i] for i in rows]) + epsilon
        out[ordered[0]] = advantage
    return _broadcast(out, mask)


def gpg(rewards, mask, groups, **_):
    """B / (number of nonzero scores, at least 1) * (s - mean_g), mean 0 for a group of one."""
    scores = rewards.sum(-1).tolist()
    alpha = len(scores) / max(sum(1 for s in scores if s != 0), 1)
    centred, _ = grpo(rewards, mask, groups, norm_adv_by_std=False)
    return alpha * centred, alpha * centred


ESTIMATORS = {
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
    "remax": remax,
    "opo": opo,
    "grpo_passk": grpo_passk,
    "gpg": gpg,
}


def outcome_advantages(rewards, mask, *, estimator="grpo", index=None, group_size=None, **options):
    """Float64 ``(advantages, returns)`` ``[B, T]``; see ``fastrl_kernels.ops.outcome_advantages``."""
    r = rewards.detach().to(torch.float64).cpu()
    m = torch.ones_like(r) if mask is None else mask.detach().to(torch.float64).cpu()
    groups = {} if index is None and group_size is None else _groups(index, group_size, r.shape[0])
    return ESTIMATORS[estimator](r, m, groups, **options)
