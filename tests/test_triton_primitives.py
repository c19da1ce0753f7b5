"""What only the Triton primitives (``fastrl_kernels.triton.stats`` / ``grad``) have: launch
configurations (small blocks that make rows cross several vocabulary blocks, the launch table), a
negative ``logit_scale``, input checks, the compile cache. The primitive contract every backend meets,
on the launch table, is ``tests/test_backend_contract.py``.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes stay small (N <= 64, V <= 3000). The same file runs on a GPU (bench/gpu_suite.py), where the
CUDA-only tests run too.
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
from fastrl_kernels.testing.strategies import core_inputs, make_logits  # noqa: E402
from tests.test_backend_contract import check, targets_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = ft.LaunchConfig(block_v=128, rows=4, num_warps=4)
TRANSFORMS = {
    "plain": CoreParams(),
    "temperature": CoreParams(temperature=0.7),
    "scale": CoreParams(temperature=1.3, logit_scale=2.0),
    "negative_scale": CoreParams(logit_scale=-0.5),  # the ops refuse it; the kernels take it
    "softcap": CoreParams(temperature=0.8, softcap=30.0),
    # c = 2 puts |logit_scale z / c| on both sides of the tanh series bound (0.4).
    "tight_softcap": CoreParams(softcap=2.0, logit_scale=0.5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(logits, targets, params, launch=SMALL, **options):
    return check("triton", logits, targets, params, launch=launch, **options)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_small_blocks_match_reference(dtype, transform):
    """Blocks of 128 lanes, 4 rows per program; out of place and in place."""
    logits = make_logits("normal", (23, 777), seed=1, dtype=DTYPES[dtype]).to(DEVICE)
    _check(logits, targets_for(23, 777, seed=2), TRANSFORMS[transform], in_place_too=True)


@pytest.mark.parametrize("vocab", [1, 2, 17, 128, 129, 1009, 3001])
def test_vocab_sizes_and_block_edges(vocab):
    # 128 is exactly one block of SMALL, 129 spills one lane into a second block.
    logits = make_logits("normal", (9, vocab), seed=vocab, dtype=torch.float32).to(DEVICE)
    got, _ = _check(logits, targets_for(9, vocab, seed=vocab), CoreParams(temperature=0.9))
    if vocab == 1:
        assert bool((got.logp == 0).all()) and bool((got.entropy == 0).all())


@pytest.mark.parametrize("transform", ["plain", "temperature", "softcap"])
@pytest.mark.parametrize("kind", ["all_negative", "huge", "peaked", "flat", "all_equal"])
def test_logit_kinds(kind, transform):
    # "huge" is uniform in [-1e4, 1e4]: logp stays within 1e-5 relative because the shifts are taken on
    # the raw logits (z_y - max z), never as x_y - lse.
    logits = make_logits(kind, (16, 1500), seed=7, dtype=torch.float32).to(DEVICE)
    got, _ = _check(logits, targets_for(16, 1500, seed=8), TRANSFORMS[transform])
    assert bool(torch.isfinite(got.logp).all()) and bool(torch.isfinite(got.entropy).all())


_LAUNCHES = st.builds(
    ft.LaunchConfig,
    block_v=st.sampled_from([16, 64, 256, 1024]),
    rows=st.sampled_from([1, 2, 4]),
    num_warps=st.just(4),
)


@settings(max_examples=8)
@given(
    inputs=core_inputs(max_rows=32, max_vocab=3000, dtypes=tuple(DTYPES.values()), ignore_indices=(-100, -1)),
    launch=_LAUNCHES,
)
def test_hypothesis_matches_reference_on_drawn_launches(inputs, launch):
    if inputs["logits"].shape[1] > 16 * launch.block_v:
        launch = ft.LaunchConfig(block_v=1024, rows=launch.rows)  # bounds interpreter loop trips
    params = CoreParams(temperature=inputs["temperature"], logit_scale=inputs["logit_scale"], softcap=inputs["softcap"],
                        ignore_index=inputs["ignore_index"])
    _check(inputs["logits"].to(DEVICE), inputs["targets"], params, launch)


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
