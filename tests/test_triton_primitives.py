"""The Triton primitives (``fastrl_kernels.triton.stats`` / ``grad``) against the float64 reference.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes stay small (N <= 64, V <= 3000) and small ``LaunchConfig`` blocks make rows cross several
vocabulary blocks. The same file runs on a GPU (bench/gpu_suite.py), where the CUDA-only tests run too.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed")
pytestmark = pytest.mark.triton

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastrl_kernels.triton as ft  # noqa: E402
from fastrl_kernels.core import CoreParams  # noqa: E402
from fastrl_kernels.reference import token_stats  # noqa: E402
from fastrl_kernels.testing import assert_close_to_reference  # noqa: E402
from fastrl_kernels.testing.strategies import core_inputs, make_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ft.LaunchConfig(block_v=128, rows=4, num_warps=4)
TRANSFORMS = {
    "plain": CoreParams(),
    "temperature": CoreParams(temperature=0.7),
    "scale": CoreParams(temperature=1.3, logit_scale=2.0),
    "negative_scale": CoreParams(logit_scale=-0.5),
    "softcap": CoreParams(temperature=0.8, softcap=30.0),
    # c = 2 puts |logit_scale z / c| on both sides of the tanh series bound (0.4).
    "tight_softcap": CoreParams(softcap=2.0, logit_scale=0.5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _targets(n_rows: int, vocab: int, seed: int, ignore_every: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    targets[::ignore_every] = -100
    return targets


def _upstream(n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, generator=g), torch.randn(n_rows, generator=g)


def _reference(logits, targets, params, g_lp, g_h):
    """Float64 stats of the same (rounded) logits and dL/dz of L = sum g_lp logp + g_h entropy."""
    z = logits.detach().cpu().to(torch.float64).requires_grad_(True)
    kw = dict(temperature=params.temperature, logit_scale=params.logit_scale, softcap=params.softcap)
    ref = token_stats(z, targets.cpu(), ignore_index=params.ignore_index, **kw)
    (ref.logp * g_lp.double() + ref.entropy * g_h.double()).sum().backward()
    return ref, z.grad


def _assert_grad_close(actual, expected, dtype, g_lp, g_h, name="grad"):
    """Pass 2 takes the float64 lse of pass 1 apart (core.CoreStats), so the gradient keeps float32
    accuracy even at |x| = 1e4. A row's scale is |g_lp| + |g_h|, the size of the terms that cancel in it."""
    assert_close_to_reference(actual, expected, dtype=dtype, kind="grad", name=name, row_scale=g_lp.abs() + g_h.abs())


def _check(logits, targets, params, launch=None, inplace=False, seed=0):
    """Run stats (with log sum p^2) and grad, compare every output with the reference."""
    n_rows = logits.shape[0]
    g_lp, g_h = _upstream(n_rows, seed)
    ref, ref_grad = _reference(logits, targets, params, g_lp, g_h)
    dev_targets = targets.to(DEVICE)
    got = ft.stats(logits, dev_targets, params, with_log_sum_p2=True, launch=launch)
    dtype = logits.dtype
    valid = targets != params.ignore_index
    for field in ("logp", "entropy", "lse", "mean_x", "log_sum_p2"):
        value = getattr(got, field)
        wide = field in ("lse", "mean_x")
        assert value.dtype == (torch.float64 if wide else torch.float32) and value.shape == (n_rows,)
        # Ignored rows are not read: logp and entropy are 0 there, the other statistics too.
        rows = slice(None) if field in ("logp", "entropy") else valid
        expected = getattr(ref, field).detach()[rows]
        assert_close_to_reference(value.cpu()[rows], expected, dtype=dtype, name=field)
        assert bool((value.cpu()[~valid] == 0).all()), f"{field} of ignored rows"
    out = logits if inplace else None
    before = logits.detach().clone()
    grad = ft.grad(logits, dev_targets, got, g_lp.to(DEVICE), g_h.to(DEVICE), params, out=out, launch=launch)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if inplace:
        assert grad.data_ptr() == logits.data_ptr()
    else:
        assert torch.equal(logits, before), "grad() modified its input"
    _assert_grad_close(grad, ref_grad, dtype, g_lp, g_h)
    ignored = targets.to(DEVICE) == params.ignore_index
    assert bool((grad[ignored] == 0).all()) and bool((got.logp[ignored] == 0).all())
    assert bool((got.entropy[ignored] == 0).all())
    return got, grad


@pytest.mark.parametrize("launch", [SMALL, None], ids=["block128x4", "table"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matches_reference(dtype, transform, launch):
    logits = make_logits("normal", (23, 777), seed=1, dtype=DTYPES[dtype]).to(DEVICE)
    _check(logits, _targets(23, 777, seed=2), TRANSFORMS[transform], launch=launch)


@pytest.mark.parametrize("vocab", [1, 2, 17, 128, 129, 1009, 3001])
def test_vocab_sizes_and_block_edges(vocab):
    # 128 is exactly one block of SMALL, 129 spills one lane into a second block.
    logits = make_logits("normal", (9, vocab), seed=vocab, dtype=torch.float32).to(DEVICE)
    targets = _targets(9, vocab, seed=vocab)
    got, grad = _check(logits, targets, CoreParams(temperature=0.9), launch=SMALL)
    if vocab == 1:
        valid = targets.to(DEVICE) != -100
        assert bool((got.logp == 0).all()) and bool((got.entropy[valid] == 0).all())


@pytest.mark.parametrize("transform", ["plain", "temperature", "softcap"])
@pytest.mark.parametrize("kind", ["all_negative", "huge", "peaked", "flat", "all_equal"])
def test_logit_kinds(kind, transform):
    # "huge" is uniform in [-1e4, 1e4]: logp stays within 1e-5 relative because the shifts are taken on
    # the raw logits (z_y - max z), never as x_y - lse.
    logits = make_logits(kind, (16, 1500), seed=7, dtype=torch.float32).to(DEVICE)
    got, _ = _check(logits, _targets(16, 1500, seed=8), TRANSFORMS[transform], launch=SMALL)
    assert bool(torch.isfinite(got.logp).all()) and bool(torch.isfinite(got.entropy).all())


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_inplace_grad(dtype):
    logits = make_logits("peaked", (21, 1000), seed=3, dtype=DTYPES[dtype]).to(DEVICE)
    _check(logits, _targets(21, 1000, seed=4), CoreParams(temperature=0.7), launch=SMALL, inplace=True)


def test_inplace_grad_with_table_launch():
    logits = make_logits("normal", (64, 300), seed=5, dtype=torch.bfloat16).to(DEVICE)
    _check(logits, _targets(64, 300, seed=6), CoreParams(softcap=30.0), inplace=True)


def test_strided_rows_and_strided_out():
    wide = make_logits("normal", (20, 1300), seed=9, dtype=torch.float32).to(DEVICE)
    logits = wide[:, 7:1007]
    assert not logits.is_contiguous()
    targets = _targets(20, 1000, seed=10)
    params = CoreParams(temperature=1.2)
    got, grad = _check(logits, targets, params, launch=SMALL)
    sink = torch.full((20, 1200), 5.0, device=DEVICE)
    out = sink[:, 100:1100]
    g_lp, g_h = _upstream(20, 0)
    result = ft.grad(logits, targets.to(DEVICE), got, g_lp.to(DEVICE), g_h.to(DEVICE), params, out=out, launch=SMALL)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, grad, rtol=0, atol=0)
    assert bool((sink[:, :100] == 5).all()) and bool((sink[:, 1100:] == 5).all())


def test_all_rows_ignored():
    logits = make_logits("normal", (6, 500), seed=11, dtype=torch.float32).to(DEVICE)
    targets = torch.full((6,), -1, dtype=torch.int64)
    params = CoreParams(ignore_index=-1)
    got, grad = _check(logits, targets, params, launch=SMALL)
    assert bool((grad == 0).all()) and bool(torch.isfinite(got.lse).all())


def test_masked_vocabulary_entries():
    # -inf logits (banned tokens) take no probability and get a zero gradient; the rest match the
    # reference on the vocabulary without them.
    logits = make_logits("normal", (10, 700), seed=12, dtype=torch.float32)
    banned = torch.zeros(700, dtype=torch.bool)
    banned[::5] = True
    banned[650:] = True
    logits[:, banned] = float("-inf")
    keep = (~banned).nonzero().squeeze(1)
    targets = keep[torch.randint(0, keep.numel(), (10,), generator=torch.Generator().manual_seed(0))]
    targets[3] = -100
    params = CoreParams(temperature=0.8)
    got = ft.stats(logits.to(DEVICE), targets.to(DEVICE), params, with_log_sum_p2=True, launch=SMALL)
    remap = torch.full((700,), -1, dtype=torch.int64)
    remap[keep] = torch.arange(keep.numel())
    live_targets = torch.where(targets == -100, targets, remap[targets.clamp(min=0)])
    g_lp, g_h = _upstream(10, 1)
    ref, ref_grad = _reference(logits[:, keep], live_targets, params, g_lp, g_h)
    valid = targets != -100
    for field in ("logp", "entropy", "lse", "mean_x", "log_sum_p2"):
        assert_close_to_reference(getattr(got, field).cpu()[valid], getattr(ref, field).detach()[valid],
                                  dtype=torch.float32, name=field)
    grad = ft.grad(logits.to(DEVICE), targets.to(DEVICE), got, g_lp.to(DEVICE), g_h.to(DEVICE), params, launch=SMALL)
    assert bool((grad[:, banned] == 0).all())
    _assert_grad_close(grad[:, keep], ref_grad, torch.float32, g_lp, g_h)


def test_zero_rows():
    logits = torch.empty((0, 50), device=DEVICE)
    targets = torch.empty((0,), dtype=torch.int64, device=DEVICE)
    got = ft.stats(logits, targets, CoreParams())
    assert got.logp.shape == (0,) and got.log_sum_p2 is None
    empty = torch.empty(0, device=DEVICE)
    assert ft.grad(logits, targets, got, empty, empty, CoreParams()).shape == (0, 50)


def test_log_sum_p2_only_when_asked():
    logits = make_logits("normal", (5, 300), seed=13).to(DEVICE)
    targets = _targets(5, 300, seed=14)
    without = ft.stats(logits, targets.to(DEVICE), CoreParams(), launch=SMALL)
    with_p2 = ft.stats(logits, targets.to(DEVICE), CoreParams(), with_log_sum_p2=True, launch=SMALL)
    assert without.log_sum_p2 is None and with_p2.log_sum_p2 is not None
    for a, b in zip(without[:4], with_p2[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_LAUNCHES = st.builds(
    ft.LaunchConfig,
    block_v=st.sampled_from([16, 64, 256, 1024]),
    rows=st.sampled_from([1, 2, 4]),
    num_warps=st.just(4),
)


@settings(max_examples=8)
@given(
    inputs=core_inputs(max_rows=32, max_vocab=3000, dtypes=tuple(DTYPES.values()), ignore_indices=(-100, -1)),
    launch=st.none() | _LAUNCHES,
)
def test_hypothesis_matches_reference(inputs, launch):
    if launch is not None and inputs["logits"].shape[1] > 16 * launch.block_v:
        launch = ft.LaunchConfig(block_v=1024, rows=launch.rows)  # bounds interpreter loop trips
    params = CoreParams(temperature=inputs["temperature"], logit_scale=inputs["logit_scale"], softcap=inputs["softcap"],
                        ignore_index=inputs["ignore_index"])
    _check(inputs["logits"].to(DEVICE), inputs["targets"], params, launch=launch)


def test_launch_table():
    for vocab in (1, 7, 100, 1000, 4096, 5000, 32000, 128256, 151936):
        for dtype in DTYPES.values():
            cfg = ft.launch_config(vocab, dtype)
            tile_bytes = cfg.rows * cfg.block_v * torch.empty((), dtype=dtype).element_size()
            assert cfg.block_v & (cfg.block_v - 1) == 0 and cfg.rows & (cfg.rows - 1) == 0
            assert tile_bytes <= 16384 and cfg.num_warps in (2, 4, 8)
            assert cfg.rows == 1 or cfg.block_v >= vocab  # several rows only when a row is one block
    assert ft.launch_config(151936, torch.bfloat16).block_v == 8192
    assert ft.launch_config(100, torch.float32).rows == 16


def test_input_validation():
    logits = torch.randn(4, 64, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="unit stride"):
        ft.stats(logits.t(), torch.zeros(64, dtype=torch.int64, device=DEVICE), CoreParams())
    with pytest.raises(ValueError, match="logits"):
        ft.stats(logits.to(torch.int32), targets, CoreParams())  # float64 runs on a float32 copy
    with pytest.raises(ValueError, match="targets"):
        ft.stats(logits, targets[:3], CoreParams())
    with pytest.raises(ValueError, match="launch.block_v"):
        ft.stats(logits, targets, CoreParams(), launch=ft.LaunchConfig(block_v=100))
    got = ft.stats(logits, targets, CoreParams())
    g = torch.zeros(4, device=DEVICE)
    with pytest.raises(ValueError, match="out"):
        ft.grad(logits, targets, got, g, g, CoreParams(), out=torch.empty(4, 64, dtype=torch.bfloat16))


def test_import_fastrl_kernels_does_not_import_triton():
    code = "import sys, fastrl_kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _compiled_count(kernel) -> int:
    # triton 3.x: JITFunction.device_caches[device] = (kernel_cache, ...), one entry per compiled variant
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile cache and host syncs exist on CUDA only")
def test_runtime_scalars_do_not_recompile_and_never_sync():
    # the package exports functions named stats and grad: the modules are reached by their full names
    grad_module = importlib.import_module("fastrl_kernels.triton.grad")
    stats_module = importlib.import_module("fastrl_kernels.triton.stats")

    kernels = (stats_module._stats_kernel, grad_module._grad_kernel)
    logits = torch.randn(64, 3000, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 3000, (64,), device="cuda")
    g = torch.randn(64, device="cuda")

    def run(params: CoreParams) -> None:
        got = ft.stats(logits, targets, params)
        ft.grad(logits, targets, got, g, g, params)

    run(CoreParams(temperature=0.7, softcap=30.0))
    run(CoreParams(temperature=1.0, logit_scale=2.0))
    torch.cuda.synchronize()
    counts = [_compiled_count(k) for k in kernels]
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(CoreParams(temperature=0.3, softcap=12.0, ignore_index=-1))
        run(CoreParams(temperature=1.9, logit_scale=0.5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    after = [_compiled_count(k) for k in kernels]
    assert counts == after, f"new temperature / scale / softcap values recompiled: {counts} -> {after}"
