"""The online-softmax building block shared by the Triton kernels, their launch table and launcher.

Both kernels see a row of logits z through the transform of ``CoreParams``:

    x = c * tanh(logit_scale * z / c) / temperature      with softcap c
    x = logit_scale * z / temperature                     without

and walk the vocabulary in blocks of ``BLOCK_V`` lanes. Inside a kernel a row is held as
``w`` with ``x = w * k``: without softcap w = z (or -z for a negative logit_scale, a compile-time
flag) and k = |logit_scale| / temperature, so the running max and every shift ``(w - m) * k`` are
taken on the raw logits (z_y - max z is exact in float32, fl(z * k) at |z| = 1e4 is not); with
softcap w = x and k = 1. Shifts are in base-2 units (exp2 is one instruction, exp is two). Lanes past
V and logits of -inf are dead: w = -inf, their shift is clamped to ``DEAD_SHIFT`` so they contribute
exactly 0 (never 0 * -inf). With one row per program, a row is walked as an aligned head, unmasked
full blocks (the hot loop: vector loads, no per-element select) and a masked tail.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..core import CoreParams

# Below this |u| tanh comes from its Taylor series: (1 - e^{-2u}) / (1 + e^{-2u}) loses ~eps / (2u)
# of relative accuracy to cancellation as u -> 0. Through u^13 the series is off by < 1e-8 relative
# at |u| = 0.4, where the exp form is already within ~2e-7.
_TANH_SERIES_BOUND = tl.constexpr(0.4)


@triton.jit
def softcap_tanh(u):
    """(tanh u, 1 - tanh^2 u) in float32 for any u, inf included, without overflow.

    With e = exp(-2|u|) in (0, 1]: tanh|u| = (1 - e) / (1 + e) and 1 - tanh^2 u = 4e / (1 + e)^2,
    the latter free of the cancellation of 1 - tanh^2 near |u| = large. Small |u| use the series
    u - u^3/3 + 2u^5/15 - 17u^7/315 + 62u^9/2835 - 1382u^11/155925 + 21844u^13/6081075.
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    # The clamp keeps the (discarded) series finite for huge |u|: tl.where evaluates both sides.
    c = tl.minimum(a, _TANH_SERIES_BOUND)
    c2 = c * c
    poly = 21844.0 / 6081075.0
    poly = poly * c2 - 1382.0 / 155925.0
    poly = poly * c2 + 62.0 / 2835.0
    poly = poly * c2 - 17.0 / 315.0
    poly = poly * c2 + 2.0 / 15.0
    poly = poly * c2 - 1.0 / 3.0
    small = c + c * c2 * poly
    mag = tl.where(a < _TANH_SERIES_BOUND, small, big)
    return tl.where(u < 0.0, -mag, mag), sech2


# 2^-16384 is 0 in float32: a shift clamped here gives e = 0 and keeps e * d finite (d = -inf for a
# logit of -inf would make it 0 * -inf = NaN). One max per element instead of selects on a mask.
DEAD_SHIFT = tl.constexpr(-16384.0)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def softmax_input(z, cap_in, cap_out, NEGATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """w of float32 logits z (module docstring): ``cap_out * tanh(cap_in * z)``, ``-z`` or ``z``."""
    if HAS_SOFTCAP:
        th, _ = softcap_tanh(z * cap_in)
        return cap_out * th
    elif NEGATE:
        return -z
    else:
        return z


@triton.jit
def load_w(ptrs, mask, cap_in, cap_out, NEGATE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """w of one block of logits as float32; with ``MASKED``, lanes outside ``mask`` are dead (w = -inf).

    The unmasked form is the hot loop's: a plain vector load, no select per element."""
    if MASKED:
        z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        w = softmax_input(z, cap_in, cap_out, NEGATE, HAS_SOFTCAP)
        if HAS_SOFTCAP or NEGATE:
            # tanh(-inf) = -1 and -(-inf) = +inf would bring dead lanes back to life.
            w = tl.where(mask, w, float("-inf"))
    else:
        z = tl.load(ptrs).to(tl.float32)
        w = softmax_input(z, cap_in, cap_out, NEGATE, HAS_SOFTCAP)
    return w


@triton.jit
def online_softmax_update(m, s, t, q, w, k2, WITH_SQUARES: tl.constexpr):
    """Fold one block ``w`` [ROWS, BLOCK_V] (dead lanes = -inf) into the running row statistics.

    Per row, in base-2 units relative to the running max m (in w units, -inf before any live lane):
        s = sum_j 2^{d_j},  t = sum_j 2^{d_j} d_j,  q = sum_j 2^{2 d_j},  d_j = (w_j - m) k2,
    k2 = k log2(e), so d_j = (x_j - max x) log2(e) and 2^{d_j} = e^{x_j - max x}. When the max moves
    m -> m', with a = 2^{dm}, dm = (m - m') k2, and block sums taken against m':
        s' = a s + s_blk,  t' = a (t + s dm) + t_blk,  q' = a^2 q + q_blk.
    w - m is exact for every lane whose 2^d is not negligible (both are raw logits within a factor
    of two), which keeps p accurate at |z| = 1e4. Per element: max, sub, mul, max, exp2, add, fma.
    """
    m_new = tl.maximum(m, tl.max(w, axis=1))
    # A row with no live lane yet keeps m' = -inf; shift it by 0 so no -inf - -inf appears.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    # The clamp keeps NaN (max.NaN, one instruction like max): a NaN logit makes its row's sums NaN,
    # as on every backend, instead of vanishing as a dead lane.
    d = tl.maximum((w - m_ref[:, None]) * k2, DEAD_SHIFT, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    dm = tl.maximum((m - m_ref) * k2, DEAD_SHIFT)
    a = tl.exp2(dm)
    s_new = a * s + tl.sum(e, axis=1)
    t_new = a * (t + s * dm) + tl.sum(e * d, axis=1)
    if WITH_SQUARES:
        q_new = a * a * q + tl.sum(e * e, axis=1)
    else:
        q_new = q
    return m_new, s_new, t_new, q_new


@triton.jit
def aligned_head(row_offset, vocab, ALIGN: tl.constexpr):
    """Lanes before the first column whose flat offset is a multiple of ``ALIGN`` (at most vocab).

    A row of V % 16 != 0 logits starts anywhere; peeling these lanes lets every later block start
    on a 16-element boundary, so the hot loop keeps 128-bit loads and stores."""
    return tl.minimum((ALIGN - row_offset % ALIGN) % ALIGN, vocab)


@dataclass(frozen=True)
class TransformScalars:
    """Runtime float32 scalars of the transform (never constexpr: no recompile per value)."""

    has_softcap: bool
    negate: bool  # logit_scale < 0 without softcap: w = -z (a compile-time flag, not a value)
    k: float  # |logit_scale| / temperature without softcap, 1 with
    cap_in: float  # logit_scale / c
    cap_out: float  # c / temperature
    dx_dz: float  # logit_scale / temperature (times 1 - tanh^2 under softcap)

    @property
    def k2(self) -> float:
        """k log2(e): the kernels' shifts are in base-2 units (exp2 is one instruction)."""
        return self.k * LOG2E.value


def transform_scalars(params: CoreParams) -> TransformScalars:
    scale, tau = float(params.logit_scale), float(params.temperature)
    if params.softcap is None:
        return TransformScalars(False, scale < 0, abs(scale) / tau, 1.0, 1.0, scale / tau)
    cap = float(params.softcap)
    return TransformScalars(True, False, 1.0, scale / cap, cap / tau, scale / tau)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile of one program: ``rows`` rows x ``block_v`` vocabulary lanes per step, ``num_warps`` warps."""

    block_v: int
    rows: int = 1
    num_warps: int = 4


# Launch table, by kernel, vocabulary size and element size (autotuning is off by default;
# bench/gpu_suite.py --sweep times alternatives on a GPU). A tile is the logits one program moves per
# step. The stats kernel reduces every block across the program (max, two sums), so it wants long
# blocks: 16 KiB (8192 bf16 lanes, 32 per thread) keeps its hot loop at 11.6 SASS instructions per
# element, where 8 KiB costs 13.8. The grad kernel reduces nothing, and its registers grow with the
# lanes per thread (bf16 on sm_90a: 151 at 32, 64 at 16, 32 at 8, per `python -m
# fastrl_kernels.triton.inspect`): 8 KiB tiles (16 lanes per thread) keep it at 64 registers, four
# programs per SM, for 0.4 more instructions per element. Under softcap (an accurate tanh per
# element) both kernels take half their tile, which keeps them from spilling on sm_80. When a whole
# row fits in fewer lanes, one program takes several rows (up to 16) so small vocabularies still fill
# the tile.
_TILE_BYTES = {("stats", False): 16384, ("stats", True): 8192, ("grad", False): 8192, ("grad", True): 4096}
_MAX_ROWS = 16
# The stats kernel on 8192-lane tiles takes 4 warps (64 lanes per thread, more loads in flight per
# thread): on an H200 at N = 8192, V = 151936 bf16 it ran in 0.70 ms against 1.05 ms with 8 warps and
# 1.13 ms with 16 (bench/results/gpu-h200-2026-11-28, the stats launch sweep), and its hot loop is
# 10.3 SASS instructions per element on sm_90a instead of 11.6, at 168 registers. The variant that
# also sums p^2 keeps 8 warps: at 4 it would reach the 128-register cap of that occupancy and spill on
# sm_80.
_STATS_FOUR_WARPS = 8192


def launch_config(
    vocab: int, dtype: torch.dtype, kernel: str = "stats", softcap: bool = False, with_log_sum_p2: bool = False
) -> LaunchConfig:
    """Block size, rows per program and warps for ``kernel`` ("stats" or "grad") on rows of ``vocab``
    logits of ``dtype`` (``softcap``: the transform has a softcap; ``with_log_sum_p2``: the stats
    kernel also sums p^2)."""
    tile = _TILE_BYTES[(kernel, bool(softcap))] // torch.empty((), dtype=dtype).element_size()
    block_v = max(16, min(tile, triton.next_power_of_2(vocab)))
    rows = max(1, min(_MAX_ROWS, tile // block_v)) if block_v >= vocab else 1
    elements = rows * block_v
    num_warps = 8 if elements >= 2048 else (4 if elements >= 512 else 2)
    if kernel == "stats" and not softcap and not with_log_sum_p2 and elements >= _STATS_FOUR_WARPS:
        num_warps = 4
    return LaunchConfig(block_v=block_v, rows=rows, num_warps=num_warps)


def check_launch(
    launch: Optional[LaunchConfig], vocab: int, dtype: torch.dtype, kernel: str, softcap: bool,
    with_log_sum_p2: bool = False,
) -> LaunchConfig:
    if launch is None:
        return launch_config(vocab, dtype, kernel, softcap, with_log_sum_p2)
    for name, value in (("block_v", launch.block_v), ("rows", launch.rows)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"launch.{name}: expected a power of two >= 1, got {value}")
    if launch.num_warps < 1 or launch.num_warps & (launch.num_warps - 1):
        raise ValueError(f"launch.num_warps: expected a power of two, got {launch.num_warps}")
    return launch


def check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Shapes and layout the kernels rely on (the ops validate values; this guards the pointers)."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"logits: expected a 2-D float32/bfloat16/float16 tensor, got {tuple(logits.shape)} {logits.dtype}"
        )
    if logits.shape[1] < 1 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(
            f"logits: expected V >= 1 and a unit stride in the last dim, got shape {tuple(logits.shape)} "
            f"strides {logits.stride()}"
        )
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets: expected int64 of shape {tuple(logits.shape[:1])}, got {tuple(targets.shape)} {targets.dtype}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets: expected a tensor on {logits.device}, got {targets.device}")


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton uses the current device), a no-op on CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch_rows(kernel, logits: torch.Tensor, cfg: LaunchConfig, sc: TransformScalars, *args, **constexprs) -> None:
    """``kernel`` over the rows of ``logits`` [N, V], ``cfg.rows`` rows per program, on the logits' GPU:
    runtime ``args``, then the compile-time flags every kernel takes (the transform's NEGATE and
    HAS_SOFTCAP, the tile's ROWS and BLOCK_V, ``cfg.num_warps``) and the kernel's own ``constexprs``."""
    grid = (triton.cdiv(logits.shape[0], cfg.rows),)
    with device_guard(logits):
        kernel[grid](
            *args,
            NEGATE=sc.negate,
            HAS_SOFTCAP=sc.has_softcap,
            ROWS=cfg.rows,
            BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
            **constexprs,
        )
