"""The chunked PyTorch backend's two primitives (``fastrl_kernels.torch_backend``) on inputs of several
chunks: values and ``out=`` against the float64 reference, output dtypes and devices whatever torch's
defaults are, and the cost the module promises (each row read the same number of times whatever the
number of chunks, grad's float32 work buffers of one chunk each, no resize warnings). The primitive
contract every backend meets is ``tests/test_backend_contract.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastrl_kernels import torch_backend
from fastrl_kernels.core import CoreParams
from fastrl_kernels.testing.asserts import assert_close_to_reference
from fastrl_kernels.testing.strategies import make_logits
from tests.test_backend_contract import reference

# V = 2^16 + 1: three rows per chunk (2^18 elements // V), so 5 rows are chunks of 3 and 2 rows.
VOCAB = (1 << 16) + 1
ROWS = 5
TRANSFORMS = {
    "plain": CoreParams(),
    "scale_and_temperature": CoreParams(temperature=0.7, logit_scale=1.3),
    "softcap": CoreParams(temperature=1.2, logit_scale=0.8, softcap=4.0, ignore_index=-1),
}
FIELDS = ("logp", "entropy", "lse", "mean_x", "log_sum_p2")


def _inputs(rows=ROWS, vocab=VOCAB, dtype=torch.float32, seed=0, ignore=(), ignore_index=-100):
    logits = make_logits("normal", (rows, vocab), seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[-1] = vocab - 1  # a target in the last lane of the last, partial chunk
    for row in ignore:
        targets[row] = ignore_index
    g_lp = 2 * torch.rand(rows, generator=g) - 1
    g_entropy = 2 * torch.rand(rows, generator=g) - 1
    return logits, targets, g_lp, g_entropy


def _run(logits, targets, params, g_lp, g_entropy, out=None):
    stats = torch_backend.stats(logits, targets, params, with_log_sum_p2=True)
    return stats, torch_backend.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)


def _assert_identical(got, want):
    """Same dtype, device, shape and bits (NaN nowhere)."""
    assert got.dtype == want.dtype and got.device == want.device and got.shape == want.shape, (got, want)
    assert torch.equal(got, want)


def test_chunk_size_rule():
    """A chunk holds as many whole rows as fit in the element budget, never more rows than the input
    has, and at least one row even when a single row is over the budget."""
    rows_per_chunk = torch_backend.rows_per_chunk
    assert rows_per_chunk(ROWS, VOCAB) == 3  # 2^18 // (2^16 + 1)
    assert rows_per_chunk(1, 10) == 1 and rows_per_chunk(3, 10) == 3
    assert rows_per_chunk(7, 10, chunk_elements=40) == 4
    assert rows_per_chunk(100, 1, chunk_elements=64) == 64
    assert rows_per_chunk(10**6, 1) == 1 << 18
    assert rows_per_chunk(5, 1 << 20) == 1  # one row over the budget: one row per chunk
    assert rows_per_chunk(5, 1, chunk_elements=1000) == 5
    for n_rows, vocab in ((1, 1), (2, 1), (1, 3), (9, 1 << 16), (5, VOCAB), (4, (1 << 18) + 1)):
        rows = rows_per_chunk(n_rows, vocab)
        assert 1 <= rows <= n_rows
        assert rows * vocab <= (1 << 18) or rows == 1
        assert rows == n_rows or (rows + 1) * vocab > (1 << 18)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_several_chunks_match_reference(transform, dtype):
    """stats (every field) and grad on 5 rows in chunks of 3 and 2 against the float64 reference;
    an ignored row in the first chunk has logp = entropy = 0 and a zero gradient row; ``out=`` and
    ``out=logits`` (in place) receive the same bits chunk by chunk."""
    params = TRANSFORMS[transform]
    logits, targets, g_lp, g_entropy = _inputs(dtype=dtype, seed=3, ignore=(2,), ignore_index=params.ignore_index)
    stats, grad = _run(logits, targets, params, g_lp, g_entropy)
    ref, ref_grad = reference(logits, targets, params, g_lp, g_entropy)
    valid = targets != params.ignore_index
    for name in FIELDS:
        value = getattr(stats, name)
        assert value.shape == (ROWS,) and value.device == logits.device
        assert value.dtype == (torch.float64 if name in ("lse", "mean_x") else torch.float32), name
        # lse, mean_x and log_sum_p2 of an ignored row are left unspecified (the row need not be read).
        assert_close_to_reference(value[valid], getattr(ref, name).detach()[valid], dtype=dtype, name=name)
    assert torch.equal(stats.logp[~valid], torch.zeros(1)) and torch.equal(stats.entropy[~valid], torch.zeros(1))
    assert grad.dtype == dtype and grad.shape == logits.shape and grad.device == logits.device
    assert_close_to_reference(grad, ref_grad, dtype=dtype, kind="grad", name="grad",
                              row_scale=g_lp.abs() + g_entropy.abs())
    assert torch.equal(grad[2], torch.zeros(VOCAB, dtype=dtype))
    out = torch.full_like(logits, float("nan"))
    assert torch_backend.grad(logits, targets, stats, g_lp, g_entropy, params, out=out) is out
    _assert_identical(out, grad)
    in_place = logits.clone()
    assert torch_backend.grad(in_place, targets, stats, g_lp, g_entropy, params, out=in_place) is in_place
    _assert_identical(in_place, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("transform", ["plain", "softcap"])
def test_float64_default_dtype_changes_nothing(transform, dtype, float64_default):
    """Under torch.set_default_dtype(float64) both primitives give the same dtypes and bits as under
    float32: every buffer they make has an explicit dtype (float32 work buffers, float64 lse / mean_x)."""
    params = TRANSFORMS[transform]
    logits, targets, g_lp, g_entropy = _inputs(dtype=dtype, seed=6, ignore=(1,), ignore_index=params.ignore_index)
    stats, grad = _run(logits, targets, params, g_lp, g_entropy)
    torch.set_default_dtype(torch.float32)
    want_stats, want_grad = _run(logits, targets, params, g_lp, g_entropy)
    for name in FIELDS:
        _assert_identical(getattr(stats, name), getattr(want_stats, name))
    _assert_identical(grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", ["plain", "softcap"])
def test_buffers_follow_the_logits_device(transform, dtype, meta_default_device):
    """With another default device (meta here, as a stand-in for cuda), CPU inputs give CPU outputs equal
    to those of a normal run: every buffer is made on the logits' device."""
    params = TRANSFORMS[transform]
    with torch.device("cpu"):
        logits, targets, g_lp, g_entropy = _inputs(dtype=dtype, seed=7, ignore=(3,), ignore_index=params.ignore_index)
    stats, grad = _run(logits, targets, params, g_lp, g_entropy)
    with torch.device("cpu"):
        want_stats, want_grad = _run(logits, targets, params, g_lp, g_entropy)
    for name in FIELDS:
        _assert_identical(getattr(stats, name), getattr(want_stats, name))
    _assert_identical(grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_warning_on_a_partial_last_chunk(dtype):
    """Chunks of 3 and 2 rows: neither primitive warns, e.g. about an output resized to a chunk's shape."""
    logits, targets, g_lp, g_entropy = _inputs(dtype=dtype, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats, grad = _run(logits, targets, TRANSFORMS["plain"], g_lp, g_entropy)
    assert torch.isfinite(grad).all() and torch.isfinite(stats.lse).all()


class _Traffic(TorchDispatchMode):
    """Counts the elements of the logits read by aten ops (tensor inputs sharing their storage) and the
    bytes of every new storage an op makes (kept alive, so no address is reused and counted twice)."""

    METADATA = {"empty", "empty_like", "new_empty", "view", "_unsafe_view", "slice", "select", "alias",
                "detach", "unsqueeze", "squeeze", "expand", "as_strided", "t", "transpose", "reshape"}

    def __init__(self, logits, *known):
        super().__init__()
        self.logits = logits.untyped_storage().data_ptr()
        self.seen = {t.untyped_storage().data_ptr() for t in (logits, *known) if t is not None}
        self.logits_reads, self.new_bytes, self.keep = 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket.__name__ not in self.METADATA:
            self.logits_reads += sum(t.numel() for t in tree_leaves(args) if isinstance(t, torch.Tensor)
                                     and t.untyped_storage().data_ptr() == self.logits)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.new_bytes += t.untyped_storage().nbytes()
                self.keep.append(t)
        return out


def _stats_traffic(logits, targets, params):
    with _Traffic(logits) as mode:
        torch_backend.stats(logits, targets, params, with_log_sum_p2=True)
    return mode


def _grad_traffic(logits, targets, params, out):
    g_lp, g_entropy = torch.ones(logits.shape[0]), torch.ones(logits.shape[0])
    stats = torch_backend.stats(logits, targets, params)
    with _Traffic(logits, out, *stats[:4], g_lp, g_entropy) as mode:
        torch_backend.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)
    return mode


@pytest.mark.parametrize("transform", ["plain", "softcap"])
def test_each_row_is_read_equally_often_whatever_the_chunks(transform):
    """Elements of the logits read per element are the same for 1 row (one chunk) and for 5 rows
    (chunks of 3 and 2): each row is read in exactly one chunk, by both primitives."""
    params = TRANSFORMS[transform]
    stats_reads, grad_reads = set(), set()
    for rows in (1, ROWS):
        logits, targets, _, _ = _inputs(rows, seed=9)
        stats_reads.add(_stats_traffic(logits, targets, params).logits_reads / logits.numel())
        grad_reads.add(_grad_traffic(logits, targets, params, torch.empty_like(logits)).logits_reads / logits.numel())
    assert len(stats_reads) == 1 and len(grad_reads) == 1, (stats_reads, grad_reads)
    assert 1 <= min(stats_reads) and 1 <= min(grad_reads)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_work_memory_is_one_chunk_per_buffer(dtype, default_dtype):
    """On 5 rows in chunks of 3, grad into a given ``out`` makes one float32 buffer of a chunk when
    ``out`` is float32 (``out`` is its own work buffer) and two otherwise, whatever torch's default
    dtype; everything else it makes is O(N) (without softcap, which needs tanh of the chunk as well)."""
    chunk_bytes = torch_backend.rows_per_chunk(ROWS, VOCAB) * VOCAB * 4
    logits, targets, _, _ = _inputs(dtype=dtype, seed=10)
    small = 4096  # the [N]-sized temporaries of 5 rows, with room to spare
    buffers = 1 if dtype == torch.float32 else 2
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        params = TRANSFORMS["scale_and_temperature"]
        new_bytes = _grad_traffic(logits, targets, params, torch.empty_like(logits)).new_bytes
    finally:
        torch.set_default_dtype(previous)
    assert buffers * chunk_bytes <= new_bytes <= buffers * chunk_bytes + small, new_bytes
