"""Global loss normalisers for data parallelism and gradient accumulation (torch.distributed).

A loss aggregated per rank with the *local* token or sequence count is not the loss of the global
batch: ranks with fewer tokens get larger per-token weights. Pass the *global* count as ``normalizer=``
instead; every rank then computes ``sum_local / global_count``, and the sum of the ranks' losses is the
whole-batch loss exactly (also for micro-batches of one optimizer step: count over all of them).

Data-parallel wrappers (DDP, FSDP) *average* gradients over the world size W, so the reduced gradient
is the whole-batch gradient divided by W. Use ``global_normalizer(..., average_grads=True)`` (the count
divided by W: verl's ``* dp_size``) to get the whole-batch gradient after DDP's averaging; leave it False
when you all-reduce with a sum yourself or want the per-rank losses to add up to the global loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import canonical_loss_agg


def _world(group: Any) -> tuple[bool, int]:
    active = dist.is_available() and dist.is_initialized()
    return active, dist.get_world_size(group) if active else 1


def all_reduce_sum(value: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum of ``value`` over the ranks of ``group`` (a copy; ``value`` itself when not distributed)."""
    active, _ = _world(group)
    if not active:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def global_normalizer(
    mask: torch.Tensor,
    loss_agg: str = "token-mean",
    *,
    group: Any = None,
    average_grads: bool = False,
    horizon: Optional[int] = None,
) -> torch.Tensor:
    """The ``normalizer=`` of the losses for the global batch across the ranks of ``group``.

    Args:
        mask: bool / {0,1} ``[B, T]`` of this rank (this micro-batch); sum the results of several
            micro-batches first when accumulating (call with ``torch.cat`` of their masks, or add counts).
        loss_agg: our or TRL / verl aggregation names. "token-mean": number of unmasked tokens over all
            ranks (DAPO, verl ``batch_num_tokens``); "seq-mean-token-mean" / "seq-mean-token-sum": number of
            sequences over all ranks (verl ``global_batch_size``); "seq-mean-token-sum-norm": global number of
            sequences x ``horizon`` (default T, Dr. GRPO's max length); "sum": 1.
        group: process group (None = default). Not initialised / not available: the local count.
        average_grads: divide by the world size, for wrappers that average gradients (DDP, FSDP).
        horizon: the length of "seq-mean-token-sum-norm" (TRL's max_completion_length).

    Returns:
        float32 0-d tensor on ``mask``'s device (no host sync), for ``fk.policy_loss(..., normalizer=)``,
        ``fk.linear_policy_loss`` and ``fastrl_kernels.losses.aggregation.aggregate``.
    """
    mode = canonical_loss_agg(loss_agg)
    if mask.dim() != 2:
        raise ValueError(f"mask: expected shape [B, T], got {tuple(mask.shape)}")
    fmask = mask.to(torch.float32)
    if mode == "token-mean":
        local = fmask.sum()
    elif mode == "sum":
        local = torch.ones((), dtype=torch.float32, device=mask.device)
    else:
        local = torch.tensor(float(mask.shape[0]), dtype=torch.float32, device=mask.device)
    total = all_reduce_sum(local, group)
    if mode == "seq-mean-token-sum-norm":
        total = total * float(mask.shape[1] if horizon is None else horizon)
    elif mode == "sum":
        total = local  # "sum" has no denominator: every rank adds its own terms
    if mode == "token-mean":
        total = total.clamp(min=1.0)  # an all-masked global batch gives loss 0, not NaN
    _, world = _world(group)
    return total / world if average_grads else total
