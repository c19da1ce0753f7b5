"""Portable backend: the two primitives of ``core.py`` in chunked PyTorch.

Rows are processed in chunks that fit in cache; each chunk reuses two float32 work buffers with
in-place ops, so the extra memory is O(chunk x V) plus the gradient output. One read of the
logits for ``stats``, one read and one write for ``grad``. Rows whose target is ``ignore_index`` are
never read: when there are any, the other rows are gathered chunk by chunk into a cache-sized buffer
(finding them costs one host sync on an accelerator), and their gradient rows are written as zeros.
"""

from __future__ import annotations

from typing import Optional

import torch

from .core import CoreParams, CoreStats

# Elements per float32 work buffer: 256K floats (1 MiB) keeps two buffers inside L2/L3 while each
# torch op still has enough work to amortise its dispatch overhead.
_CHUNK_ELEMENTS = 1 << 18
# Keeps exp(x - m) * (x - m) finite when the row holds -inf logits (masked vocabulary entries):
# e^-1e30 is 0 and 0 * -1e30 is 0, where 0 * -inf would be NaN.
_MOST_NEGATIVE_SHIFT = -1.0e30


def rows_per_chunk(n_rows: int, vocab: int, chunk_elements: int = _CHUNK_ELEMENTS) -> int:
    return max(1, min(n_rows, chunk_elements // max(vocab, 1)))


def _shifted_into(x: torch.Tensor, z: torch.Tensor, params: CoreParams) -> tuple[torch.Tensor, torch.Tensor]:
    """x <- x - m in float32 with m = max_j x_j; returns (m as float64 [rows, 1], tanh or None).

    Without softcap the shift is taken on the raw logits, x - m = k (z - max z): z - max z is exact
    where it matters, whereas rounding k z to float32 first would cost ulp(|k z|) (5e-4 at 1e4).
    Under softcap |x| <= c / temperature, so x itself is formed and shifted.
    """
    if params.softcap is None:
        k = params.logit_scale / params.temperature
        z_max = z.amax(dim=1, keepdim=True).float()
        torch.sub(z, z_max, out=x)
        if k != 1.0:
            x.mul_(k)
        return z_max.double() * k, None
    x.copy_(z)
    x.mul_(params.logit_scale / params.softcap).tanh_()
    tanh = x.clone()
    x.mul_(params.softcap / params.temperature)
    x_max = x.amax(dim=1, keepdim=True)
    x.sub_(x_max)
    return x_max.double(), tanh


def _minus_lse_into(x: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, params: CoreParams):
    """x <- x - lse in float32 for float64 ``lse [rows, 1]``; returns tanh or None (see _shifted_into).

    Without softcap, x - lse = k (z - c) - r with c = fp32(lse / k), r = lse - k c: z - c is exact
    for the lanes with non-negligible p (Sterbenz), so p keeps full precision at |z| = 1e4.
    """
    if params.softcap is None:
        k = params.logit_scale / params.temperature
        c = (lse / k).float()
        r = (lse - c.double() * k).float()
        torch.sub(z, c, out=x)
        if k != 1.0:
            torch.add(-r, x, alpha=k, out=x)
        else:
            x.sub_(r)
        return None
    x.copy_(z)
    x.mul_(params.logit_scale / params.softcap).tanh_()
    tanh = x.clone()
    x.mul_(params.softcap / params.temperature).sub_(lse.float())
    return tanh


def _safe_targets(targets: torch.Tensor, ignore_index: int):
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)


def _row_chunks(logits: torch.Tensor, valid: torch.Tensor, rows: int):
    """Yields ``(sel, z)`` per chunk of the rows to compute: ``sel`` picks them in [N]-shaped outputs,
    ``z`` holds their logits. Contiguous slices (views, no copy) when every row is valid; otherwise the
    valid rows' indices, with those rows gathered into one reused chunk buffer (ignored rows unread)."""
    n_rows = logits.shape[0]
    index = valid.nonzero().view(-1)
    if index.numel() == n_rows:
        for start in range(0, n_rows, rows):
            sel = slice(start, min(start + rows, n_rows))
            yield sel, logits[sel]
        return
    z_buf = logits.new_empty((min(rows, index.numel()), logits.shape[1]))
    for start in range(0, index.numel(), rows):
        sel = index[start : start + rows]
        z = z_buf[: sel.numel()]
        torch.index_select(logits, 0, sel, out=z)
        yield sel, z


def stats(
    logits: torch.Tensor, targets: torch.Tensor, params: CoreParams, with_log_sum_p2: bool = False
) -> CoreStats:
    n_rows, vocab = logits.shape
    device = logits.device
    # Zeros: ignored rows keep logp = entropy = lse = mean_x = 0 (as in the other backends).
    logp, entropy = torch.zeros((2, n_rows), dtype=torch.float32, device=device)
    lse, mean_x = torch.zeros((2, n_rows), dtype=torch.float64, device=device)
    log_sum_p2 = torch.zeros(n_rows, dtype=torch.float32, device=device) if with_log_sum_p2 else None
    rows = rows_per_chunk(n_rows, vocab)
    x_buf = torch.empty((rows, vocab), dtype=torch.float32, device=device)
    e_buf = torch.empty_like(x_buf)
    valid, safe_targets = _safe_targets(targets, params.ignore_index)
    for sel, z in _row_chunks(logits, valid, rows):
        count = z.shape[0]
        x, e = x_buf[:count], e_buf[:count]
        row_max, _ = _shifted_into(x, z, params)
        x.clamp_(min=_MOST_NEGATIVE_SHIFT)
        torch.exp(x, out=e)
        s = e.sum(dim=1)
        if with_log_sum_p2:
            s2 = torch.linalg.vecdot(e, e)
        # sum_j e_j (x_j - m) in place in e (no temporary; e is not needed afterwards).
        t = e.mul_(x).sum(dim=1)
        log_s = s.log()
        mean_shifted = t / s
        m = row_max.view(-1)
        logp_rows = x.gather(1, safe_targets[sel]).view(-1) - log_s
        if params.softcap is None:
            # A target at a -inf logit has probability 0: logp = -inf, not the clamp's -1e30.
            dead = z.gather(1, safe_targets[sel]).view(-1) == float("-inf")
            logp_rows = logp_rows.masked_fill(dead, float("-inf"))
        logp[sel] = logp_rows
        entropy[sel] = log_s - mean_shifted
        lse[sel] = m + log_s.double()
        mean_x[sel] = m + mean_shifted.double()
        if with_log_sum_p2:
            log_sum_p2[sel] = s2.log() - 2.0 * log_s
    return CoreStats(logp, entropy, lse, mean_x, log_sum_p2)


def grad(logits: torch.Tensor, targets: torch.Tensor, stats: CoreStats, g_lp: torch.Tensor,
         g_entropy: torch.Tensor, params: CoreParams, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    n_rows, vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    valid, safe_targets = _safe_targets(targets, params.ignore_index)
    # dL/dx_j = -p_j [g_lp + g_H (x_j - E)] + g_lp 1[j=y], written with x - lse as the working variable:
    # x_j - E = (x_j - lse) + (lse - E).
    g_lp, g_entropy = g_lp.float(), g_entropy.float()
    offset = (g_lp + g_entropy * (stats.lse - stats.mean_x).float()).unsqueeze(1)
    g_h = g_entropy.unsqueeze(1)
    lse = stats.lse.double().unsqueeze(1)
    rows = rows_per_chunk(n_rows, vocab)
    every_row = bool(valid.all())
    if not every_row:
        out[~valid] = 0  # written, never read: ignored rows get a zero gradient whatever they hold
    # A float32 output is its own work buffer when its rows are contiguous slices (one pass less);
    # otherwise the chunk is computed in x_buf and copied (or scattered) into out.
    work_in_out = out.dtype == torch.float32 and every_row
    x_buf = None if work_in_out else torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    p_buf = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    base_scale = params.logit_scale / params.temperature
    for sel, z in _row_chunks(logits, valid, rows):
        count = z.shape[0]
        x = out[sel] if work_in_out else x_buf[:count]
        p = p_buf[:count]
        tanh = _minus_lse_into(x, z, lse[sel], params)
        x.clamp_(min=_MOST_NEGATIVE_SHIFT)
        torch.exp(x, out=p)
        # (addcmul with broadcast [rows, 1] operands is several times slower than these two ops)
        x.mul_(g_h[sel]).add_(offset[sel]).mul_(p)
        g_lp_rows = g_lp[sel].unsqueeze(1)
        if tanh is None:
            # scale folds in the sign: dL/dz = scale (g_lp 1[j=y] - p (g_lp + g_H (x - E)))
            x.mul_(-base_scale)
            x.scatter_add_(1, safe_targets[sel], base_scale * g_lp_rows)
        else:
            x.neg_().scatter_add_(1, safe_targets[sel], g_lp_rows)
            x.mul_(tanh.mul_(tanh).neg_().add_(1.0).mul_(base_scale))
        if work_in_out:
            continue
        if isinstance(sel, slice):
            out[sel].copy_(x)
        else:
            out.index_copy_(0, sel, x.to(out.dtype))
    return out
