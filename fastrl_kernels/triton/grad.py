"""Pass 2 of the core op in Triton: dL/dlogits from the row statistics, one read and one write."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core import CoreParams, CoreStats
from .online_softmax import (
    DEAD_SHIFT,
    LN2,
    LOG2E,
    LaunchConfig,
    aligned_head,
    check_launch,
    check_logits,
    launch_rows,
    softcap_tanh,
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
# In the kernel, with d_j = (x_j - lse) log2(e) (base-2 units: p_j = 2^{d_j}, one exp2 instruction)
# and x_j - E = d_j ln2 + h, h = lse - E, every term but the target's is p_j times an affine function
# of d_j with per-row coefficients:
#   dL/dz_j = slope [g_lp 1[j=y] - p_j (g_lp + g_H h + g_H ln2 d_j)] = slope g_lp 1[j=y] + p_j (a d_j + b),
#   a = -slope g_H ln2,  b = -slope (g_lp + g_H h)      (slope = dx/dz, a per-row constant without softcap)
# so the hot loop is: load, sub, fma, max, exp2, fma, mul, store. The target's element is written
# once more after the row, exactly, by the same program (no per-element compare with y).
# Dead lanes (z = -inf) have p = 0 but d = -inf: d is clamped to DEAD_SHIFT, so p (a d + b) = 0.


@triton.jit
def _grad_block(z, mask, c, k2, r2, a, b, cap_in, cap_out, dx_dz, NEGATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                MASKED: tl.constexpr):
    """The gradient of one block of float32 logits z (every lane but the target's term); with
    ``MASKED`` the lanes outside ``mask`` are dead (p = 0), whatever was loaded there."""
    if HAS_SOFTCAP:
        th, sech2 = softcap_tanh(z * cap_in)
        d = tl.maximum((cap_out * th - c) * k2 - r2, DEAD_SHIFT, propagate_nan=tl.PropagateNan.ALL)
    else:
        w = -z if NEGATE else z
        d = tl.maximum((w - c) * k2 - r2, DEAD_SHIFT, propagate_nan=tl.PropagateNan.ALL)
    if MASKED:
        d = tl.where(mask, d, DEAD_SHIFT)
    g = tl.exp2(d) * (a * d + b)
    if HAS_SOFTCAP:
        # a and b come without the slope here: it is per element under softcap.
        g = g * (dx_dz * sech2)
    return g


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
    k,
    cap_in,
    cap_out,
    dx_dz,
    ignore_index,
    NEGATE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PEELED: tl.constexpr,
):
    """out[r, j] = dx_j/dz_j * [g_lp 1[j=y] - p_j (g_lp + g_H (x_j - E))], p_j = e^{x_j - lse}.

    dx/dz = dx_dz = logit_scale / temperature, times (1 - tanh^2(logit_scale z / c)) under softcap;
    rows with y == ignore_index are written as 0 without being read. Each program reads a block
    before writing the same block, and reads z_y before its row's first write, so out may alias
    logits.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    row_offset = rows.to(tl.int64) * stride_row
    out_offset = rows.to(tl.int64) * stride_out_row
    lanes = tl.arange(0, BLOCK_V)
    out_ty = out_ptr.dtype.element_ty

    y = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (y != ignore_index)
    y = tl.where(valid, y, 0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
    h = tl.load(h_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(valid, tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    g_h = tl.where(valid, tl.load(g_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)
    # z_y before any write of this row: out may be the logits.
    z_y = tl.load(logits_ptr + row_offset + y, mask=valid, other=0.0).to(tl.float32)
    k2 = k * LOG2E
    r2 = r * LOG2E
    slope = 1.0 if HAS_SOFTCAP else dx_dz
    a = -slope * g_h * LN2
    b = -slope * (g_lp + g_h * h)

    if PEELED:
        # One row per program, and out's rows aligned like the logits' (the launcher checks): the
        # peeled head aligns both the loads and the stores of the full blocks.
        head = aligned_head(row_offset, vocab, 16)
        first = tl.max(head, axis=0)
        live = tl.max(valid.to(tl.int32), axis=0) > 0
        if first > 0:
            cols = tl.arange(0, 16)
            mask = (cols < head[:, None])
            if live:
                z = tl.load(logits_ptr + row_offset[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g = _grad_block(z, mask, c[:, None], k2, r2[:, None], a[:, None], b[:, None], cap_in, cap_out, dx_dz,
                                NEGATE, HAS_SOFTCAP, True)
            else:
                g = tl.zeros([1, 16], tl.float32)
            tl.store(out_ptr + out_offset[:, None] + cols[None, :], g.to(out_ty), mask=mask)
        n_full = (vocab - first) // BLOCK_V
        src = logits_ptr + tl.multiple_of(row_offset + first, 16)
        dst = out_ptr + tl.multiple_of(out_offset + first, 16)
        if live:
            for block in tl.range(0, n_full):
                z = tl.load(src + block * BLOCK_V + lanes).to(tl.float32)
                g = _grad_block(z, None, c, k2, r2, a, b, cap_in, cap_out, dx_dz, NEGATE, HAS_SOFTCAP, False)
                tl.store(dst + block * BLOCK_V + lanes, g.to(out_ty))
        else:
            # Ignored rows cost a write and no read.
            for block in tl.range(0, n_full):
                tl.store(dst + block * BLOCK_V + lanes, tl.zeros([BLOCK_V], out_ty))
        tail = first + n_full * BLOCK_V
        if tail < vocab:
            cols = tail + lanes
            mask = cols < vocab
            if live:
                z = tl.load(logits_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
                g = _grad_block(z, mask, c, k2, r2, a, b, cap_in, cap_out, dx_dz, NEGATE, HAS_SOFTCAP, True)
            else:
                g = tl.zeros([BLOCK_V], tl.float32)
            tl.store(out_ptr + out_offset + cols, g.to(out_ty), mask=mask)
    else:
        for start in range(0, vocab, BLOCK_V):
            cols = start + lanes
            mask = row_ok[:, None] & (cols < vocab)[None, :]
            # Ignored rows are written as zeros without being read.
            z = tl.load(logits_ptr + row_offset[:, None] + cols[None, :], mask=mask & valid[:, None],
                        other=0.0).to(tl.float32)
            g = _grad_block(z, mask & valid[:, None], c[:, None], k2, r2[:, None], a[:, None], b[:, None], cap_in,
                            cap_out, dx_dz, NEGATE, HAS_SOFTCAP, True)
            tl.store(out_ptr + out_offset[:, None] + cols[None, :], g.to(out_ty), mask=mask)

    # The target's element, exactly: slope_y [g_lp (1 - p_y) - g_H p_y (x_y - E)], written after every
    # thread of the program has stored its blocks (the barrier orders the two writes to out[y]).
    tl.debug_barrier()
    if HAS_SOFTCAP:
        th, sech2 = softcap_tanh(z_y * cap_in)
        w_y = cap_out * th
        slope_y = dx_dz * sech2
    else:
        w_y = -z_y if NEGATE else z_y
        slope_y = dx_dz
    d_y = tl.maximum((w_y - c) * k2 - r2, DEAD_SHIFT, propagate_nan=tl.PropagateNan.ALL)
    p_y = tl.exp2(d_y)
    g_y = slope_y * (g_lp * (1.0 - p_y) - g_h * p_y * (d_y * LN2 + h))
    tl.store(out_ptr + out_offset + y, g_y.to(out_ty), mask=valid)


# What each argument of _grad_kernel is, for compiling it ahead of time (triton/inspect.py).
_GRAD_ARG_KINDS = {
    "logits_ptr": "logits*", "targets_ptr": "i64*", "c_ptr": "fp32*", "r_ptr": "fp32*", "h_ptr": "fp32*",
    "g_lp_ptr": "fp32*", "g_entropy_ptr": "fp32*", "out_ptr": "logits*", "n_rows": "i32", "vocab": "i32",
    "stride_row": "i32", "stride_out_row": "i32", "k": "fp32", "cap_in": "fp32", "cap_out": "fp32",
    "dx_dz": "fp32", "ignore_index": "i32",
}


def grad_kernel_variant(has_softcap: bool, launch: LaunchConfig, vocab: int):
    """(kernel, argument kinds, compile-time constants) of the launch ``grad`` makes for these options."""
    constexprs = {"NEGATE": False, "HAS_SOFTCAP": has_softcap, "ROWS": launch.rows, "BLOCK_V": launch.block_v,
                  "PEELED": launch.rows == 1}
    return _grad_kernel, _GRAD_ARG_KINDS, constexprs


def lse_split(stats: CoreStats, k: float) -> list[torch.Tensor]:
    """Per-row float32 (c, r, h): lse = c k + r with c = fp32(lse / k), and h = lse - E_p[x]."""
    lse = stats.lse.to(torch.float64)
    c = (lse / k).to(torch.float32)
    r = torch.sub(lse, c.to(torch.float64), alpha=k).to(torch.float32)  # lse - c k in float64, one op
    h = (lse - stats.mean_x.to(torch.float64)).to(torch.float32)
    return [c.contiguous(), r.contiguous(), h.contiguous()]


def grad(
    logits: torch.Tensor, targets: torch.Tensor, stats: CoreStats, g_lp: torch.Tensor, g_entropy: torch.Tensor,
    params: CoreParams, out: Optional[torch.Tensor] = None,
    *,
    launch: Optional[LaunchConfig] = None,
) -> torch.Tensor:
    """Pass 2 of the core op (docs/design.md): dL/dlogits, one read of ``logits`` and one write.

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
    cfg = check_launch(launch, vocab, logits.dtype, "grad", params.softcap is not None)
    sc = transform_scalars(params)
    vectors = lse_split(stats, sc.k) + [v.to(torch.float32).contiguous() for v in (g_lp, g_entropy)]
    launch_rows(
        _grad_kernel, logits, cfg, sc,
        logits, targets.contiguous(), *vectors, out,
        n_rows, vocab, logits.stride(0), out.stride(0),
        sc.k, sc.cap_in, sc.cap_out, sc.dx_dz, params.ignore_index,
        # Out's full blocks are aligned like the logits' only when the row strides agree mod 16.
        PEELED=cfg.rows == 1 and (out.stride(0) - logits.stride(0)) % 16 == 0,
    )
    return out
