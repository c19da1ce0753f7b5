"""The native C++ backend's two primitives (``fastrl_kernels.native``) against the float64 reference, on the
build the CPU loads by default and (slow) on each narrower build it can run.

The first test to run builds the extension (about 1-2 minutes on 2 cores); later runs load the cache.
"""


from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import native
from fastrl_kernels.core import CoreParams
from fastrl_kernels.reference.logprobs import token_stats
from fastrl_kernels.testing.asserts import assert_close_to_reference
from fastrl_kernels.testing.strategies import IGNORE_INDEX, core_inputs, make_logits

pytestmark = pytest.mark.native

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def _built_extension():
    if not native.is_available():
        try:
            native.load()
        except RuntimeError as error:
            pytest.skip(f"the native extension cannot be built here: {error}")


def _params(inputs: dict) -> CoreParams:
    return CoreParams(
        temperature=inputs["temperature"],
        logit_scale=inputs["logit_scale"],
        softcap=inputs["softcap"],
        ignore_index=inputs["ignore_index"],
    )


def _reference(logits, targets, params, g_lp, g_entropy):
    """float64 stats on the same (rounded) logits and dL/dlogits of sum(g_lp logp + g_entropy H)."""
    z = logits.detach().to(torch.float64).requires_grad_(True)
    ref = token_stats(
        z,
        targets,
        temperature=params.temperature,
        logit_scale=params.logit_scale,
        softcap=params.softcap,
        ignore_index=params.ignore_index,
    )
    (ref.logp * g_lp.double() + ref.entropy * g_entropy.double()).sum().backward()
    return ref, z.grad


def _coefficients(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(n, generator=g) - 1, 2 * torch.rand(n, generator=g) - 1


def _check_against_reference(logits, targets, params, with_p2=True, seed=0):
    """stats and grad vs the float64 reference; the gradient's row scale is |g_lp| + |g_entropy| (the size
    of the terms that cancel in a row)."""
    g_lp, g_entropy = _coefficients(logits.shape[0], seed)
    stats = native.stats(logits, targets, params, with_log_sum_p2=with_p2)
    ref, ref_grad = _reference(logits, targets, params, g_lp, g_entropy)
    dtype = logits.dtype
    assert_close_to_reference(stats.logp, ref.logp, dtype=dtype, name="logp")
    assert_close_to_reference(stats.entropy, ref.entropy, dtype=dtype, name="entropy")
    valid = targets != params.ignore_index
    assert_close_to_reference(stats.lse[valid], ref.lse.detach()[valid], dtype=dtype, name="lse")
    assert_close_to_reference(stats.mean_x[valid], ref.mean_x.detach()[valid], dtype=dtype, name="mean_x")
    if with_p2:
        assert_close_to_reference(
            stats.log_sum_p2[valid], ref.log_sum_p2.detach()[valid], dtype=dtype, name="log_sum_p2"
        )
    else:
        assert stats.log_sum_p2 is None
    grad = native.grad(logits, targets, stats, g_lp, g_entropy, params)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_to_reference(grad, ref_grad, dtype=dtype, kind="grad", name="grad",
                              row_scale=_row_scale(g_lp, g_entropy))
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
    return stats, grad


def _row_scale(g_lp, g_entropy):
    return g_lp.abs() + g_entropy.abs()


@settings(max_examples=40)
@given(inputs=core_inputs(max_rows=300, max_vocab=5000, dtypes=DTYPES, ignore_indices=(IGNORE_INDEX, -1)),
       with_p2=st.booleans(), seed=st.integers(0, 99))
def test_matches_float64_reference(inputs, with_p2, seed):
    _check_against_reference(inputs["logits"], inputs["targets"], _params(inputs), with_p2, seed)


WIDE_TRANSFORMS = {
    "temperature": CoreParams(temperature=0.6),
    "hot_temperature": CoreParams(temperature=1.7),
    "logit_scale": CoreParams(logit_scale=2.5),
    "scale_and_temperature": CoreParams(temperature=1.3, logit_scale=0.5),
    "softcap": CoreParams(softcap=5.0),
    "softcap_scale_temperature": CoreParams(temperature=0.8, logit_scale=1.5, softcap=30.0, ignore_index=-1),
}


def _ramp_logits(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    # N(0, 2^2) plus a ramp of 12 across the row: the running max grows block after block.
    z = make_logits("normal", (rows, vocab), seed=12) + 12.0 * torch.arange(vocab) / vocab
    return z.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", list(WIDE_TRANSFORMS))
@pytest.mark.parametrize("vocab,kind", [(2049, "normal"), (4500, "peaked"), (6151, "ramp")])
def test_vocabularies_of_several_blocks_with_every_transform(vocab, kind, transform, dtype):
    # The kernel walks a row in blocks of 2048 lanes, moving its sums to a new frame when the max grows.
    params = WIDE_TRANSFORMS[transform]
    rows = 12
    logits = _ramp_logits(rows, vocab, dtype) if kind == "ramp" else make_logits(kind, (rows, vocab), seed=13,
                                                                                   dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))
    targets[::5] = params.ignore_index
    targets[1] = vocab - 1  # a target in the last, partial block
    _check_against_reference(logits, targets, params, seed=vocab)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["huge", "all_negative", "peaked"])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.7, 30.0)])
def test_extreme_logits(dtype, kind, temperature, softcap):
    # |z| = 1e4: pass 2 must keep p exact from the float64 lse (a float32 lse is ~5e-4 coarse there).
    logits = make_logits(kind, (33, 3001), seed=3, dtype=dtype)
    targets = torch.randint(0, 3001, (33,), generator=torch.Generator().manual_seed(4))
    targets[::7] = IGNORE_INDEX
    params = CoreParams(temperature=temperature, softcap=softcap, logit_scale=1.0)
    _check_against_reference(logits, targets, params)


@pytest.mark.parametrize("kind", ["flat", "all_equal"])
@pytest.mark.parametrize("vocab", [2, 3, 2049])
def test_uniform_rows(kind, vocab):
    logits = make_logits(kind, (6, vocab), seed=9)
    targets = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(10))
    targets[2] = IGNORE_INDEX
    stats, _ = _check_against_reference(logits, targets, CoreParams(temperature=0.7, logit_scale=2.0))
    valid = targets != IGNORE_INDEX
    # "flat" rows are uniform up to N(0, 1e-3) logits.
    torch.testing.assert_close(stats.entropy[valid], torch.full((5,), math.log(vocab)), rtol=0, atol=5e-3)


def test_single_token_vocabulary():
    logits = torch.randn(5, 1) * 100
    targets = torch.zeros(5, dtype=torch.long)
    stats, grad = _check_against_reference(logits, targets, CoreParams(temperature=0.5))
    assert torch.equal(stats.logp, torch.zeros(5)) and torch.equal(stats.entropy, torch.zeros(5))
    assert torch.equal(grad, torch.zeros(5, 1))


def test_masked_vocabulary_entries():
    # -inf logits (banned tokens) get p = 0 and a zero gradient, never NaN (0 * -inf).
    logits = torch.randn(16, 4500) * 3
    logits[:, ::3] = float("-inf")
    logits[0, :2100] = float("-inf")  # a whole leading block of -inf: the row's frame starts later
    targets = torch.arange(16) * 3 + 1
    targets[0] = 2101
    finite = logits.clamp(min=-1e30)  # the reference with the banned entries at an exp-underflowing value
    g_lp, g_entropy = _coefficients(16, 1)
    params = CoreParams()
    stats = native.stats(logits, targets, params, with_log_sum_p2=True)
    ref, ref_grad = _reference(finite, targets, params, g_lp, g_entropy)
    for name in ("logp", "entropy", "lse", "mean_x", "log_sum_p2"):
        assert_close_to_reference(getattr(stats, name), getattr(ref, name), dtype=torch.float32, name=name)
    grad = native.grad(logits, targets, stats, g_lp, g_entropy, params)
    assert_close_to_reference(grad, ref_grad, dtype=torch.float32, kind="grad", name="grad",
                              row_scale=_row_scale(g_lp, g_entropy))
    assert torch.equal(grad[:, ::3], torch.zeros_like(grad[:, ::3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows_are_zero_and_not_read(dtype):
    logits = make_logits("normal", (12, 257), seed=5, dtype=dtype)
    targets = torch.randint(0, 257, (12,))
    targets[1::2] = IGNORE_INDEX
    logits[1::2] = float("nan")  # never read: no NaN may reach any output
    g = torch.ones(12)
    stats = native.stats(logits, targets, CoreParams(), with_log_sum_p2=True)
    for field in stats:
        assert torch.isfinite(field).all()
        assert torch.equal(field[1::2], torch.zeros(6))
    grad = native.grad(logits, targets, stats, g, g, CoreParams())
    assert torch.equal(grad[1::2], torch.zeros(6, 257, dtype=dtype))
    assert torch.isfinite(grad).all()


# Ignored rows are zeroed a few cache lines at a time from inside the kept rows' sweeps (a queue per
# thread task, csrc/row_kernels.h ZeroRows): runs of ignored rows longer than the queue, rows shorter than
# a cache line, rows not aligned to one, ignored rows first and last, a task with no kept row at all.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [5, 33, 1000, 4099])
@pytest.mark.parametrize("pattern", ["alternate", "long_runs", "first_and_last", "all", "random"])
@pytest.mark.parametrize("in_place", [False, True])
def test_ignored_rows_zeroed_between_kept_rows(dtype, vocab, pattern, in_place):
    n = 300
    g = torch.Generator().manual_seed(vocab)
    # Rows of an odd stride: no row starts on a cache line boundary but by chance.
    storage = make_logits("normal", (n, vocab + 3), seed=vocab, dtype=dtype)
    logits = storage[:, 1:vocab + 1]
    targets = torch.randint(0, vocab, (n,), generator=g)
    ignored = {
        "alternate": torch.arange(n) % 2 == 1,
        "long_runs": (torch.arange(n) // 90) % 2 == 0,  # 90 ignored rows in a row: more than the queue holds
        "first_and_last": (torch.arange(n) < 7) | (torch.arange(n) >= n - 7),
        "all": torch.ones(n, dtype=torch.bool),
        "random": torch.rand(n, generator=g) < 0.4,
    }[pattern]
    targets[ignored] = IGNORE_INDEX
    params = CoreParams(temperature=0.9)
    g_lp, g_entropy = _coefficients(n, 3)
    stats = native.stats(logits, targets, params)
    _, ref_grad = _reference(logits, targets, params, g_lp, g_entropy)
    if in_place:
        out = logits
    else:
        padded = torch.full((n, vocab + 5), float("nan"), dtype=dtype)  # bytes not written stay NaN
        out = padded[:, 2:vocab + 2]
    result = native.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result[ignored], torch.zeros(int(ignored.sum()), vocab, dtype=dtype))
    assert torch.isfinite(result).all()
    if not bool(ignored.all()):
        keep = ~ignored
        assert_close_to_reference(result[keep], ref_grad[keep], dtype=dtype, kind="grad", name="kept rows",
                                  row_scale=_row_scale(g_lp[keep], g_entropy[keep]))
    # The padding columns around the rows are never written.
    if in_place:
        assert torch.isfinite(storage[:, 0]).all() and torch.isfinite(storage[:, vocab + 1:]).all()
    else:
        assert padded[:, :2].isnan().all() and padded[:, vocab + 2:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,softcap,vocab", [("normal", None, 1001), ("normal", 5.0, 1001), ("huge", None, 1001),
                                                ("peaked", 30.0, 3001)])
def test_in_place_gradient(dtype, kind, softcap, vocab):
    logits = make_logits(kind, (40, vocab), seed=6, dtype=dtype)
    targets = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(6))
    targets[3] = IGNORE_INDEX
    params = CoreParams(temperature=0.7, softcap=softcap)
    g_lp, g_entropy = _coefficients(40, 2)
    stats = native.stats(logits, targets, params)
    expected = native.grad(logits, targets, stats, g_lp, g_entropy, params)
    work = logits.clone()
    result = native.grad(work, targets, stats, g_lp, g_entropy, params, out=work)
    assert result.data_ptr() == work.data_ptr()
    assert torch.equal(work, expected)
    _, ref_grad = _reference(logits, targets, params, g_lp, g_entropy)
    assert_close_to_reference(work, ref_grad, dtype=dtype, kind="grad", name="in-place grad",
                              row_scale=_row_scale(g_lp, g_entropy))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    # A slice of a wider tensor: row stride 1040, last-dim stride 1; the out buffer is strided too.
    wide = make_logits("normal", (24, 1040), seed=7, dtype=dtype)
    logits = wide[:, 13:1013]
    assert not logits.is_contiguous() and logits.stride(-1) == 1
    targets = torch.randint(0, 1000, (24,))
    params = CoreParams(temperature=1.3, logit_scale=0.5)
    g_lp, g_entropy = _coefficients(24, 3)
    stats = native.stats(logits, targets, params)
    dense = native.stats(logits.contiguous(), targets, params)
    for a, b in zip(stats, dense):
        assert (a is None and b is None) or torch.equal(a, b)
    out_wide = torch.full((24, 1100), 7.0, dtype=dtype)
    out = out_wide[:, 50:1050]
    native.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)
    expected = native.grad(logits.contiguous(), targets, dense, g_lp, g_entropy, params)
    assert torch.equal(out, expected)
    assert (out_wide[:, :50] == 7).all() and (out_wide[:, 1050:] == 7).all()
    _, ref_grad = _reference(logits, targets, params, g_lp, g_entropy)
    assert_close_to_reference(out, ref_grad, dtype=dtype, kind="grad", name="strided grad",
                              row_scale=_row_scale(g_lp, g_entropy))


def test_loaded_build_is_the_detected_instruction_set():
    # Run under FASTRL_NATIVE_ISA by the per-ISA test below: proves the forced build is the one loaded.
    assert native.load().isa == native.isa()


# The numeric tests of this file, rerun in a subprocess for each build the default run does not load.
_NUMERIC_TESTS = " or ".join([
    "loaded_build_is_the_detected", "matches_float64_reference", "several_blocks", "extreme_logits",
    "uniform_rows", "single_token", "masked_vocabulary", "ignored_rows", "in_place_gradient", "strided_rows",
])


@pytest.mark.slow
@pytest.mark.parametrize("isa", native.ISAS)
def test_every_build_the_cpu_runs_matches_reference(isa, monkeypatch):
    # The default run tests the widest build the CPU has; the narrower ones (the scalar build of CPUs
    # without AVX2, the AVX2 build of CPUs without AVX-512) get the same numeric tests here.
    monkeypatch.delenv("FASTRL_NATIVE_ISA", raising=False)
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    if isa == native.isa():
        pytest.skip(f"{isa} is this CPU's default build, which the rest of this file tests")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", _NUMERIC_TESTS],
        env={**os.environ, "FASTRL_NATIVE_ISA": isa, "HYPOTHESIS_PROFILE": "dev"},
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
