"""Pass 1 of the core op in Triton: per-row log-prob, entropy, lse, E[x] (and log sum p^2), one read."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core import CoreParams, CoreStats
from .online_softmax import (
    LN2,
    LaunchConfig,
    aligned_head,
    check_launch,
    check_logits,
    launch_rows,
    load_w,
    online_softmax_update,
    softmax_input,
    transform_scalars,
)


@triton.jit
def _stats_kernel(
    logits_ptr,
    targets_ptr,
    out_ptr,
    n_rows,
    vocab,
    stride_row,
    k2,
    cap_in,
    cap_out,
    ignore_index,
    NEGATE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_LOG_SUM_P2: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Rows [pid * ROWS, pid * ROWS + ROWS) of logits -> out[f, row] for the fields f below.

    With x = w k (see online_softmax), m = max_j w_j and, accumulated online over vocab blocks in
    base-2 units, s = sum_j 2^{d_j}, t = sum_j 2^{d_j} d_j, q = sum_j 2^{2 d_j}, d_j = (w_j - m) k2:

        out[0] logp       = ln2 ((w_y - m) k2 - log2 s)
        out[1] entropy    = ln2 (log2 s - t / s)

    Rows whose target is ignore_index are not read: every field is 0 there.
        out[2] m          (the launcher forms lse = m k + log s in float64)
        out[3] log s      = ln2 log2 s
        out[4] ln2 t / s  (the launcher forms mean_x = E_p[x] = m k + ln2 t / s in float64)
        out[5] log_sum_p2 = ln2 (log2 q - 2 log2 s)             (only WITH_LOG_SUM_P2)

    logp never forms x_y - lse: at |x| = 1e4 that difference of two rounded numbers is off by ~5e-4.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    # int64 offsets: N * V exceeds 2^31 at N = 16384, V = 151936.
    row_offset = rows.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK_V)

    y = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (y != ignore_index)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    q = tl.zeros([ROWS], tl.float32)
    if ROWS == 1:
        # Ignored rows (masked tokens) are not read at all.
        if tl.max(valid.to(tl.int32), axis=0) > 0:
            # One row: an aligned head (masked), full blocks with plain vector loads, a masked tail.
            head = aligned_head(row_offset, vocab, 16)
            if tl.max(head, axis=0) > 0:
                cols = tl.arange(0, 16)
                w = load_w(logits_ptr + row_offset[:, None] + cols[None, :], (cols < head[:, None]), cap_in,
                           cap_out, NEGATE, HAS_SOFTCAP, True)
                m, s, t, q = online_softmax_update(m, s, t, q, w, k2, WITH_LOG_SUM_P2)
            first = tl.max(head, axis=0)
            n_full = (vocab - first) // BLOCK_V
            aligned = logits_ptr + tl.multiple_of(row_offset + first, 16)
            for block in tl.range(0, n_full):
                ptrs = aligned + block * BLOCK_V + lanes
                w = load_w(ptrs[None, :], None, cap_in, cap_out, NEGATE, HAS_SOFTCAP, False)
                m, s, t, q = online_softmax_update(m, s, t, q, w, k2, WITH_LOG_SUM_P2)
            tail = first + n_full * BLOCK_V
            if tail < vocab:
                cols = tail + lanes
                w = load_w(logits_ptr + row_offset[:, None] + cols[None, :], (cols < vocab)[None, :], cap_in,
                           cap_out, NEGATE, HAS_SOFTCAP, True)
                m, s, t, q = online_softmax_update(m, s, t, q, w, k2, WITH_LOG_SUM_P2)
    else:
        for start in range(0, vocab, BLOCK_V):
            cols = start + lanes
            # Ignored rows' lanes are all dead: no load is issued for them.
            mask = valid[:, None] & (cols < vocab)[None, :]
            w = load_w(logits_ptr + row_offset[:, None] + cols[None, :], mask, cap_in, cap_out, NEGATE, HAS_SOFTCAP,
                       True)
            m, s, t, q = online_softmax_update(m, s, t, q, w, k2, WITH_LOG_SUM_P2)

    z_y = tl.load(logits_ptr + row_offset + tl.where(valid, y, 0), mask=valid, other=0.0).to(tl.float32)
    w_y = softmax_input(z_y, cap_in, cap_out, NEGATE, HAS_SOFTCAP)

    # Ignored rows and the last program's padding rows saw no live lane: every field is 0 there.
    m = tl.where(valid, m, 0.0)
    s = tl.where(valid, s, 1.0)
    q = tl.where(valid, q, 1.0)
    t = tl.where(valid, t, 0.0)
    log2_s = tl.log2(s)
    mean_shift = t / s
    logp = tl.where(valid, ((w_y - m) * k2 - log2_s) * LN2, 0.0)
    entropy = tl.where(valid, (log2_s - mean_shift) * LN2, 0.0)
    tl.store(out_ptr + rows, logp, mask=row_ok)
    tl.store(out_ptr + n_rows + rows, entropy, mask=row_ok)
    tl.store(out_ptr + 2 * n_rows + rows, m, mask=row_ok)
    tl.store(out_ptr + 3 * n_rows + rows, log2_s * LN2, mask=row_ok)
    tl.store(out_ptr + 4 * n_rows + rows, mean_shift * LN2, mask=row_ok)
    if WITH_LOG_SUM_P2:
        tl.store(out_ptr + 5 * n_rows + rows, (tl.log2(q) - 2.0 * log2_s) * LN2, mask=row_ok)


# What each argument of _stats_kernel is, for compiling it ahead of time (triton/inspect.py):
# "logits*" a pointer of the logits' dtype, "<type>*" other pointers, scalars by Triton type.
_STATS_ARG_KINDS = {
    "logits_ptr": "logits*", "targets_ptr": "i64*", "out_ptr": "fp32*", "n_rows": "i32", "vocab": "i32",
    "stride_row": "i32", "k2": "fp32", "cap_in": "fp32", "cap_out": "fp32", "ignore_index": "i32",
}


def stats_kernel_variant(has_softcap: bool, with_log_sum_p2: bool, launch: LaunchConfig, vocab: int):
    """(kernel, argument kinds, compile-time constants) of the launch ``stats`` makes for these options."""
    constexprs = {"NEGATE": False, "HAS_SOFTCAP": has_softcap, "WITH_LOG_SUM_P2": with_log_sum_p2,
                  "ROWS": launch.rows, "BLOCK_V": launch.block_v}
    return _stats_kernel, _STATS_ARG_KINDS, constexprs


def stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    params: CoreParams,
    with_log_sum_p2: bool = False,
    *,
    launch: Optional[LaunchConfig] = None,
) -> CoreStats:
    """Pass 1 of the core op (docs/design.md): one streaming read of ``logits``.

    logits: ``[N, V]`` float32/bfloat16/float16, unit stride in the last dim, any row stride.
    targets: ``[N]`` int64 in [0, V) or ``params.ignore_index``.
    Returns ``CoreStats`` of ``[N]`` tensors (lse and mean_x float64, the rest float32):
    logp = log softmax(x)[y], entropy of
    softmax(x), lse = logsumexp(x), mean_x = E_p[x], and log_sum_p2 = log sum_j p_j^2 when
    ``with_log_sum_p2``; x = transform(z) as in ``CoreParams``. Rows whose target is
    ``ignore_index`` are not read: every statistic is 0 there (as the native backend). ``launch`` overrides the table of
    ``online_softmax.launch_config``. No host synchronisation.
    """
    check_logits(logits, targets)
    n_rows, vocab = logits.shape
    fields = 6 if with_log_sum_p2 else 5
    out = torch.empty((fields, n_rows), dtype=torch.float32, device=logits.device)
    sc = transform_scalars(params)
    if n_rows > 0:
        cfg = check_launch(launch, vocab, logits.dtype, "stats", params.softcap is not None, with_log_sum_p2)
        launch_rows(
            _stats_kernel, logits, cfg, sc,
            logits, targets.contiguous(), out,
            n_rows, vocab, logits.stride(0),
            sc.k2, sc.cap_in, sc.cap_out, params.ignore_index,
            WITH_LOG_SUM_P2=with_log_sum_p2,
        )
    # lse and mean_x in float64 (core.CoreStats): m k in float32 would be off by ulp(1e4) = 1e-3.
    # One widening copy of (max, log-sum, mean offset) and three in-place ops: each tensor op costs a
    # launch and its host time, which at these sizes rivals the kernel's.
    wide = out[2:5].to(torch.float64)
    max_x = wide[0].mul_(sc.k)
    lse, mean_x = wide[1].add_(max_x), wide[2].add_(max_x)
    return CoreStats(out[0], out[1], lse, mean_x, out[5] if with_log_sum_p2 else None)
