"""The contract between the loss algebra and the backends: two primitives over ``[N, V]`` logits.

Every backend (``torch_backend``, ``native``, ``triton``) exposes two functions with these
signatures and nothing else on the N x V path (docs/design.md, "Two primitives, everything else O(N)")::

    stats(logits, targets, params, with_log_sum_p2=False) -> CoreStats
    grad(logits, targets, stats, g_lp, g_entropy, params, out=None) -> Tensor

Math, for a row z of logits, target y, x = transform(z) (see ``CoreParams``):

    lse = log sum_j e^{x_j},  p_j = e^{x_j - lse},  logp = x_y - lse,
    entropy = lse - E,  E = sum_j p_j x_j,  log_sum_p2 = log sum_j p_j^2
    dL/dz_j = dx_j/dz_j * [g_lp (1[j=y] - p_j) - g_entropy p_j (x_j - E)]

Rows whose target equals ``params.ignore_index`` have logp = entropy = 0 and a zero gradient row; the
native and Triton backends do not read them (their lse, mean_x, log_sum_p2 are 0), so masked tokens,
folded into ignore_index by the ops, cost no traffic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol

import torch


@dataclass(frozen=True)
class CoreParams:
    """Options of the core op; runtime values, never compile-time constants.

    x = c * tanh(logit_scale * z / c) / temperature when ``softcap`` = c is set
    (Gemma-2 final_logit_softcapping), else x = logit_scale * z / temperature.
    """

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100


class CoreStats(NamedTuple):
    """Per-row statistics of pass 1, each of shape ``[N]``.

    ``logp``, ``entropy``, ``log_sum_p2``: float32. ``lse`` and ``mean_x`` (= E_p[x]): float64, in x
    units (after scale/softcap/temperature); pass 2 needs only them. They are float64 because at
    |x| ~ 1e4 a float32 lse is off by up to 5e-4, and p = e^{x - lse} would inherit that error:
    pass 2 forms x - lse as k (z - c) - r with c = fp32(lse / k), r = lse - k c (see the backends).
    ``log_sum_p2`` is ``None`` unless asked for (WPO weights).
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    mean_x: torch.Tensor
    log_sum_p2: Optional[torch.Tensor] = None


class Primitives(Protocol):
    """What a backend module provides."""

    def stats(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        params: CoreParams,
        with_log_sum_p2: bool = False,
    ) -> CoreStats: ...

    def grad(self, logits: torch.Tensor, targets: torch.Tensor, stats: CoreStats, g_lp: torch.Tensor,
             g_entropy: torch.Tensor, params: CoreParams, out: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def float64_on_float32_rows(stats: Callable, grad: Callable) -> tuple[Callable, Callable]:
    """``(stats, grad)`` of a backend whose kernels read float32 / bfloat16 / float16 only, extended to
    float64 logits: they run on a float32 copy of the rows (float64 logits are for testing; that copy
    is N x V) and the gradient comes back in float64, into ``out`` when given (``logits`` itself for
    an in-place gradient). Results are those of the float32-rounded logits; only
    ``backend="reference"`` computes in float64. Other keyword options go to the backend's functions.
    """

    @functools.wraps(stats)
    def stats_any_float(logits, targets, params, with_log_sum_p2=False, **options):
        if logits.dtype == torch.float64:
            logits = logits.to(torch.float32)
        return stats(logits, targets, params, with_log_sum_p2, **options)

    @functools.wraps(grad)
    def grad_any_float(logits, targets, stats, g_lp, g_entropy, params, out=None, **options):
        if logits.dtype != torch.float64:
            return grad(logits, targets, stats, g_lp, g_entropy, params, out=out, **options)
        if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype
                                or out.device != logits.device):
            raise ValueError(f"out: expected {tuple(logits.shape)} {logits.dtype} on {logits.device}, "
                             f"got {tuple(out.shape)} {out.dtype} on {out.device}")
        rows = logits.to(torch.float32)
        rows = grad(rows, targets, stats, g_lp, g_entropy, params, out=rows, **options)
        return rows.to(torch.float64) if out is None else out.copy_(rows)

    return stats_any_float, grad_any_float
