"""The lm_head ops' chunks of rows: the chunk-size rule on CPU and CUDA (the free memory of the rows' device,
the caps), the default chunk size on every route, count_gemms' record of it, and the memory of a sweep (one
C x V logits buffer)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastrl_kernels as fk
from fastrl_kernels.ops import linear_chunks
from fastrl_kernels.ops.linear import count_gemms
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear import _problem

BACKENDS = cpu_fused_backends()
CPU = torch.device("cpu")
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------------
# chunk sizes


@pytest.mark.parametrize("dtype, item_bytes", [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 2 + 4),
                                               (torch.float16, 2 + 4)])
@pytest.mark.parametrize("vocab", [151936, 32000, 50257])
def test_cpu_chunk_size_is_the_largest_multiple_of_8_within_64_mib(dtype, item_bytes, vocab):
    """CPU: C x V x (itemsize, plus 4 bytes for the float32 gradient copy of a half precision chunk)
    <= 64 MiB, C the largest such multiple of 8, returned as an int."""
    rows = linear_chunks.choose_chunk_size(1 << 20, vocab, dtype, CPU)
    assert type(rows) is int
    assert rows % 8 == 0 and rows >= 8
    assert rows * vocab * item_bytes <= 64 * MIB < (rows + 8) * vocab * item_bytes


def test_chunk_size_never_exceeds_the_rows():
    choose = linear_chunks.choose_chunk_size
    for n_rows in (1, 2, 3, 7, 9):
        assert choose(n_rows, 1000, torch.float32, CPU) == n_rows
        assert choose(n_rows, 1000, torch.bfloat16, CPU) == n_rows
    assert choose(1, 10**9, torch.float32, CPU) == 1


def _fake_cuda_memory(monkeypatch, free_by_device: dict) -> list:
    """torch.cuda.mem_get_info answering (free, total) per device; returns the devices asked about."""
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return free_by_device[torch.device(device)], 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_chunk_size_uses_an_eighth_of_the_free_memory_of_that_device(monkeypatch, dtype):
    """CUDA: budget min(1 GiB, free / 8) of the device the rows are on; C the largest multiple of 64
    with C x V x itemsize within it (no float32 copy on CUDA)."""
    cuda1 = torch.device("cuda", 1)
    asked = _fake_cuda_memory(monkeypatch, {torch.device("cuda", 0): 64 << 30, cuda1: 2 << 30})
    vocab = 128000
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = linear_chunks.choose_chunk_size(1 << 20, vocab, dtype, cuda1)
    assert asked == [cuda1]
    budget = (2 << 30) // 8  # 256 MiB < 1 GiB
    assert type(rows) is int and rows % 64 == 0
    assert rows * vocab * itemsize <= budget < (rows + 64) * vocab * itemsize
    assert rows == {2: 1024, 4: 512}[itemsize]  # 256 MiB / (128000 x itemsize) = 1048.6 / 524.3


def test_cuda_chunk_size_is_capped_at_1_gib_and_at_64_rows_minimum(monkeypatch):
    cuda0 = torch.device("cuda", 0)
    _fake_cuda_memory(monkeypatch, {cuda0: 64 << 30})
    choose = linear_chunks.choose_chunk_size
    # free / 8 = 8 GiB: the 1 GiB cap applies; 1 GiB / (32000 x 2 bytes) = 16777.2 -> 16768.
    assert choose(1 << 20, 32000, torch.bfloat16, cuda0) == 16768
    assert choose(100, 32000, torch.bfloat16, cuda0) == 100
    # A vocabulary too large for 64 rows still gets one block of 64.
    assert choose(1 << 20, 10**9, torch.float32, cuda0) == 64


def test_default_chunk_size_is_the_chosen_one_on_every_route():
    """chunk_size=None runs the chunk size ``choose_chunk_size`` gives (recorded per sweep by
    count_gemms) and the results of that explicit chunk size."""
    hidden, weight, bias, targets = _problem((4, 5), 6, 30, seed=48)
    expected_chunk = linear_chunks.choose_chunk_size(20, 30, torch.float32, CPU)
    ref_c, ref_r = torch.tensor([-16.0, -15.0]), torch.tensor([-15.5, -16.5])

    def run(**chunk):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        with count_gemms() as counter:
            dpo = fk.linear_dpo_loss(*leaves[:2], targets, None, ref_c, ref_r, bias=leaves[2], backend="torch",
                                     **chunk)
            dpo.loss.backward()
            policy = fk.linear_policy_loss(hidden, *leaves[1:2], targets, torch.full((4, 5), -3.4), torch.randn(
                4, generator=torch.Generator().manual_seed(48)), bias=bias, backend="torch", **chunk)
            policy.loss.backward()
        return counter, [*dpo, *(leaf.grad for leaf in leaves), policy.loss]

    default_counter, default = run()
    explicit_counter, explicit = run(chunk_size=expected_chunk)
    assert default_counter.routes == ["stats", "two_pass", "fused"]
    assert default_counter.chunk_sizes == explicit_counter.chunk_sizes == [expected_chunk] * 3
    for got, want in zip(default, explicit):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type, routes", [("clip", ["fused"]), ("gspo", ["stats", "two_pass"])])
def test_count_gemms_records_the_chunk_size_of_each_sweep(loss_type, routes):
    hidden, weight, bias, targets = _problem((2, 5), 6, 30, seed=49)
    w = weight.clone().requires_grad_(True)
    with count_gemms() as counter:
        fk.linear_policy_loss(hidden, w, targets, torch.full((2, 5), -3.4), torch.ones(2), bias=bias, chunk_size=4,
                              backend="torch", loss_type=loss_type).loss.backward()
    assert counter.routes == routes and counter.chunk_sizes == [4] * len(routes)
    assert counter.logits == 3 * len(routes) and counter.grad_weight == 3 and counter.grad_hidden == 0


# ----------------------------------------------------------------------------------------------------
# Memory: one C x V logits buffer per sweep


@pytest.mark.skipif("native" not in BACKENDS, reason="the native backend is not built here")
@pytest.mark.parametrize("op", ["clip", "gspo", "token_logprobs"])
def test_each_sweep_holds_one_chunk_of_logits_and_writes_the_gradient_over_it(op):
    """The native primitives need no C x V work buffer, so a training step allocates exactly one
    C x V float32 buffer per sweep (the chunk's gradient is written over its logits), however many
    chunks there are."""
    rows, hidden_size, vocab, chunk = 48, 8, 6000, 16  # 3 chunks; weight-sized buffers are half a chunk
    hidden, weight, bias, targets = _problem((1, rows), hidden_size, vocab, seed=50, ignore=False)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with count_gemms() as counter, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if op == "token_logprobs":
            logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], chunk_size=chunk,
                                                     backend="native")
            (logp.sum() + entropy.sum()).backward()
        else:
            fk.linear_policy_loss(*leaves[:2], targets, torch.full((1, rows), -8.7), torch.randn(1, rows),
                                  bias=leaves[2], chunk_size=chunk, backend="native", loss_type=op).loss.backward()
    chunk_bytes = chunk * vocab * 4
    assert vocab * hidden_size * 4 < chunk_bytes
    large = [event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage >= chunk_bytes]
    assert large == [chunk_bytes] * len(counter.routes), (counter.routes, large)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_chunk_of_logits_is_written_into_the_one_buffer(backend):
    """Chunks of 8 rows over 12 (the last one shorter), more rows per chunk than H = 6, and H != V: each
    logits GEMM writes into the sweep's buffer as it is (a GEMM whose `out` has the wrong shape would resize
    it, allocating, with a UserWarning)."""
    hidden, weight, bias, targets = _problem((3, 4), 6, 23, seed=52)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], chunk_size=8, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        for loss_type in ("clip", "gspo"):
            fk.linear_policy_loss(*leaves[:2], targets, torch.full((3, 4), -3.1), torch.randn(3), bias=leaves[2],
                                  chunk_size=8, backend=backend, loss_type=loss_type).loss.backward()
        with torch.no_grad():
            fk.linear_token_logprobs(hidden, weight, targets, bias=bias, chunk_size=8, backend=backend)
