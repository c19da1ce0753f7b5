"""Pass 2 of the core op in Triton: dL/dlogits from the row statistics, one read and one write."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core import CoreParams, CoreStats
from .online_softmax import (
    LaunchConfig,
    check_launch,
    check_logits,
    device_guard,
    softcap_tanh,
    softmax_input,
    transform_scalars,
)

# Derivation (row z, target y, x = transform(z), p = softmax(x), E = sum_j p_j x_j):
#   logp = x_y - lse                 -> d logp / dx_j = 1[j=y] - p_j
#   H = lse - E, dE/dx_j = p_j + sum_i x_i dp_i/dx_j = p_j + p_j x_j - p_j E
#                                    -> dH/dx_j = p_j - p_j (1 + x_j - E) = -p_j (x_j - E)
#   dL/dx_j = g_lp (1[j=y] - p_j) - g_H p_j (x_j - E)
#           = g_lp 1[j=y] - p_j (g_lp + g_H (x_j - E))
#   chain rule through the transform, elementwise:
#     x = k' z                 -> dx/dz = k' = logit_scale / temperature
#     x = (c / tau) tanh(u), u = logit_scale z / c
#                              -> dx/dz = (c / tau) (1 - tanh^2 u) (logit_scale / c)
#                                       = (logit_scale / temperature) (1 - tanh^2 u)
#   p_j = e^{x_j - lse} uses the lse of pass 1, so no reduction is needed here: each block is read,
#   turned into its gradient and written back independently (in place when out is logits).
# Lanes with z = -inf (masked vocabulary) have p = 0 but x - E = -inf; x is clamped to -1e30 so the
# product is 0 rather than 0 * -inf = NaN. Lanes past V get the same -1e30 (p = 0, nothing overflows).
_MOST_NEGATIVE_X = tl.constexpr(-1.0e30)


@triton.jit
def _grad_kernel(
    logits_ptr,
    targets_ptr,
    c_ptr,
    r_ptr,
    h_ptr,
    g_lp_ptr,
    g_entropy_ptr,
    out_ptr,
    n_rows,
    vocab,
    stride_row,
    stride_out_row,
    w_sign,
    k,
    cap_in,
    cap_out,
    dx_dz,
    ignore_index,
    HAS_SOFTCAP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """out[r, j] = dx_j/dz_j * [g_lp 1[j=y] - p_j (g_lp + g_H (x_j - E))], p_j = e^{x_j - lse}.

    dx/dz = dx_dz = logit_scale / temperature, times (1 - tanh^2(logit_scale z / c)) under softcap;
    rows with y == ignore_index are written as 0 without being read. Each program reads a block
    before writing the same block, so out may alias logits.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_base = logits_ptr + rows.to(tl.int64) * stride_row
    out_base = out_ptr + rows.to(tl.int64) * stride_out_row
    lanes = tl.arange(0, BLOCK_V)

    y = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (y != ignore_index)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)[:, None]
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)[:, None]
    h = tl.load(h_ptr + rows, mask=row_ok, other=0.0)[:, None]
    g_lp = tl.where(valid, tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0), 0.0)[:, None]
    g_h = tl.where(valid, tl.load(g_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)[:, None]
    y = tl.where(valid, y, -1)[:, None]

    for start in range(0, vocab, BLOCK_V):
        cols = start + lanes
        mask = row_ok[:, None] & (cols < vocab)[None, :]
        # Ignored rows are written as zeros without being read (masked tokens cost half the traffic).
        z = tl.load(row_base[:, None] + cols[None, :], mask=mask & valid[:, None], other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            th, sech2 = softcap_tanh(z * cap_in)
            w = cap_out * th
            slope = dx_dz * sech2
        else:
            w = softmax_input(z, w_sign, cap_in, cap_out, HAS_SOFTCAP)
            slope = dx_dz
        # d = x - lse = (w - c) k - r: w - c is exact where p matters (see grad's docstring).
        d = (w - c) * k - r
        d = tl.where(mask & valid[:, None], tl.maximum(d, _MOST_NEGATIVE_X), _MOST_NEGATIVE_X)
        p = tl.exp(d)
        # x - E = d + (lse - E). p (x - E) first: exactly 0 on dead lanes whatever g_H is.
        g = tl.where(cols[None, :] == y, g_lp, 0.0) - p * g_lp - g_h * (p * (d + h))
        g = tl.where(valid[:, None], g * slope, 0.0)
        tl.store(out_base[:, None] + cols[None, :], g.to(out_ptr.dtype.element_ty), mask=mask)


# What each argument of _grad_kernel is, for compiling it ahead of time (triton/inspect.py).
_GRAD_ARG_KINDS = {
    "logits_ptr": "logits*", "targets_ptr": "i64*", "c_ptr": "fp32*", "r_ptr": "fp32*", "h_ptr": "fp32*",
    "g_lp_ptr": "fp32*", "g_entropy_ptr": "fp32*", "out_ptr": "logits*", "n_rows": "i32", "vocab": "i32",
    "stride_row": "i32", "stride_out_row": "i32", "w_sign": "fp32", "k": "fp32", "cap_in": "fp32",
    "cap_out": "fp32", "dx_dz": "fp32", "ignore_index": "i32",
}


def grad_kernel_variant(has_softcap: bool, launch: LaunchConfig, vocab: int):
    """(kernel, argument kinds, compile-time constants) of the launch ``grad`` makes for these options."""
    constexprs = {"HAS_SOFTCAP": has_softcap, "ROWS": launch.rows, "BLOCK_V": launch.block_v}
    return _grad_kernel, _GRAD_ARG_KINDS, constexprs


def lse_split(stats: CoreStats, k: float) -> list[torch.Tensor]:
    """Per-row float32 (c, r, h): lse = c k + r with c = fp32(lse / k), and h = lse - E_p[x]."""
    lse = stats.lse.to(torch.float64)
    c = (lse / k).to(torch.float32)
    r = (lse - c.to(torch.float64) * k).to(torch.float32)
    h = (lse - stats.mean_x.to(torch.float64)).to(torch.float32)
    return [c.contiguous(), r.contiguous(), h.contiguous()]


def grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    stats: CoreStats,
    g_lp: torch.Tensor,
    g_entropy: torch.Tensor,
    params: CoreParams,
    out: Optional[torch.Tensor] = None,
    *,
    launch: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """Pass 2 of the core op (SPEC sections 4, 6b): dL/dlogits, one read of ``logits`` and one write.

    logits ``[N, V]`` and targets ``[N]`` as for ``stats``; ``stats`` from pass 1 (only ``lse`` and
    ``mean_x`` are read); g_lp = dL/dlogp and g_entropy = dL/dentropy, float32 ``[N]``.
    Returns ``out`` (a new tensor of the logits' shape and dtype when None; ``out`` may be
    ``logits`` itself for an in-place gradient, or any tensor of that shape and dtype with a unit
    last-dim stride) holding, row by row,

        dL/dz_j = dx_j/dz_j * [g_lp (1[j=y] - p_j) - g_entropy p_j (x_j - E_p[x])],

    computed in float32 and rounded to out's dtype; zero rows where y == ``params.ignore_index``.
    p_j = e^{x_j - lse} with x_j - lse = (w_j - c) k - r, c = fp32(lse / k), r = lse - c k from the
    float64 lse of pass 1: w_j - c is exact for every lane with non-negligible p (Sterbenz), so p
    keeps float32 accuracy at |x| = 1e4. No host synchronisation.
    """
    check_logits(logits, targets)
    n_rows, vocab = logits.shape
    if out is None:
        out = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    elif out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(
            f"out: expected {tuple(logits.shape)} {logits.dtype} on {logits.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    elif vocab > 1 and out.stride(1) != 1:
        raise ValueError(f"out: expected a unit stride in the last dim, got strides {out.stride()}")
    if n_rows == 0:
        return out
    cfg = check_launch(launch, vocab, logits.dtype)
    sc = transform_scalars(params)
    vectors = lse_split(stats, sc.k) + [v.to(torch.float32).contiguous() for v in (g_lp, g_entropy)]
    grid = (triton.cdiv(n_rows, cfg.rows),)
    with device_guard(logits):
        _grad_kernel[grid](
            logits,
            targets.contiguous(),
            *vectors,
            out,
            n_rows,
            vocab,
            logits.stride(0),
            out.stride(0),
            sc.w_sign,
            sc.k,
            sc.cap_in,
            sc.cap_out,
            sc.dx_dz,
            params.ignore_index,
            HAS_SOFTCAP=sc.has_softcap,
            ROWS=cfg.rows,
            BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
    return out
