"""What only the native C++ backend (``fastrl_kernels.native``) has, against the float64 reference: rows of
several 2048-lane blocks, the queue of zeroed ignored rows, and each narrower build the CPU can run (slow).
The primitive contract every backend meets is ``tests/test_backend_contract.py``.

The first test to run builds the extension (about 1-2 minutes on 2 cores); later runs load the cache.
"""


from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrl_kernels import native
from fastrl_kernels.core import CoreParams
from fastrl_kernels.testing.asserts import assert_close_to_reference
from fastrl_kernels.testing.strategies import IGNORE_INDEX, make_logits
from tests.test_backend_contract import check, coefficients, reference

pytestmark = pytest.mark.native

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def _built_extension():
    if not native.is_available():
        try:
            native.load()
        except RuntimeError as error:
            pytest.skip(f"the native extension cannot be built here: {error}")


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
@pytest.mark.parametrize("vocab,kind", [(2049, "normal"), (4500, "peaked"), (6151, "ramp"), (3001, "huge"),
                                        (3001, "all_negative"), (2049, "flat")])
def test_vocabularies_of_several_blocks_with_every_transform(vocab, kind, transform, dtype):
    # The kernel walks a row in blocks of 2048 lanes, moving its sums to a new frame when the max grows;
    # |z| = 1e4 ("huge") keeps float32 accuracy across blocks from the float64 lse.
    params = WIDE_TRANSFORMS[transform]
    rows = 12
    logits = _ramp_logits(rows, vocab, dtype) if kind == "ramp" else make_logits(kind, (rows, vocab), seed=13,
                                                                                   dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(vocab))
    targets[::5] = params.ignore_index
    targets[1] = vocab - 1  # a target in the last, partial block
    check("native", logits, targets, params, seed=vocab)


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
    g_lp, g_entropy = coefficients(n, 3)
    stats = native.stats(logits, targets, params)
    _, ref_grad = reference(logits, targets, params, g_lp, g_entropy)
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
                                  row_scale=g_lp[keep].abs() + g_entropy[keep].abs())
    # The padding columns around the rows are never written.
    if in_place:
        assert torch.isfinite(storage[:, 0]).all() and torch.isfinite(storage[:, vocab + 1:]).all()
    else:
        assert padded[:, :2].isnan().all() and padded[:, vocab + 2:].isnan().all()


def test_loaded_build_is_the_detected_instruction_set():
    # Run under FASTRL_NATIVE_ISA by the per-ISA test below: proves the forced build is the one loaded.
    assert native.load().isa == native.isa()


# The numeric tests of this file and the contract suite's native cases, rerun in a subprocess for each
# build the default run does not load (`-k native`: the marker of both).
_CONTRACT = str(Path(__file__).with_name("test_backend_contract.py"))


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
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, _CONTRACT, "-m", "native",
         "-k", "not every_build"],
        env={**os.environ, "FASTRL_NATIVE_ISA": isa, "HYPOTHESIS_PROFILE": "dev"},
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
