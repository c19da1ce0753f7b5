"""Data-parallel runs of the trainer under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

Every rank builds the same model from the same seed and runs the same supervised warm-up (same
batches, so the warm-up is the single-process one); then the policy is wrapped in DDP (whose
construction also broadcasts rank 0's weights) and ranks other than 0 switch to their own sampling
seed, so each rank draws different prompts and samples. Each rank's policy / value loss is divided by
``global_normalizer(mask, average_grads=True)``: after DDP averages the gradients they are those of the
token mean over the global batch. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """This process's place in the job: ``rank`` of ``world`` (world 1: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str) -> DistContext:
    """Start the default process group when ``torchrun``'s ``WORLD_SIZE`` > 1; else a world of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, local_rank=local)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The sampling seed of ``rank`` > 0 from ``step`` on (rank 0 keeps the run's own random stream)."""
    return random.Random(f"fastrl-train:{seed}:{rank}:{step}").getrandbits(62)


class ResponseModel(nn.Module):
    """``forward(seq) -> (hidden [B, A, d], logits [B, A, V])`` at the positions that predict the response.

    The module DDP wraps: DDP hooks ``forward``, so the trainer's gradient pass must go through it.
    """

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, seq: torch.Tensor):
        h = self.model.hidden(seq[:, :-1])[:, self.start :]
        return h, self.model.lm_head(h)


def wrap_ddp(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    ids = [ctx.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def mean_metrics(metrics: dict, ctx: DistContext) -> dict:
    """Numbers averaged over the ranks (``loss_peak_bytes``: the max); ``step`` and lists of numbers too."""
    if not ctx.active:
        return metrics
    keys = [k for k, v in metrics.items() if k != "step" and isinstance(v, (int, float, list))]
    flat = []
    for k in keys:
        flat.extend(metrics[k] if isinstance(metrics[k], list) else [metrics[k]])
    values = torch.tensor(flat, dtype=torch.float64)
    peak = torch.tensor([float(metrics.get("loss_peak_bytes", 0))], dtype=torch.float64)
    dist.all_reduce(values)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    values = (values / ctx.world).tolist()
    out, i = dict(metrics), 0
    for k in keys:
        n = len(metrics[k]) if isinstance(metrics[k], list) else 1
        out[k] = values[i : i + n] if isinstance(metrics[k], list) else values[i]
        i += n
    if "loss_peak_bytes" in metrics:
        out["loss_peak_bytes"] = int(peak.item())
    return out


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on one (a stop request must stop all ranks at one step)."""
    if not ctx.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any, ctx: DistContext) -> Optional[list]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (None in a single-process run)."""
    if not ctx.active:
        return None
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def parameter_digest(model: nn.Module) -> str:
    """SHA-1 of the parameters' bytes, in order: equal digests mean bit-identical weights."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
