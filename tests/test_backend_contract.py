"""The primitive contract (``core.Primitives``), one suite for every backend of the registry that runs
here: ``stats`` and ``grad`` against the float64 reference on the same rounded logits.

Every backend (``tests/backends_under_test.every_backend``) runs every case on its test device: torch
and native on CPU, Triton on a GPU or under its interpreter on CPU (one Python call per kernel program,
hence the small shapes). What only one backend has stays in its own file: native (instruction-set
builds, the build cache, threads, rows of several 2048-lane blocks, the queue of zeroed rows), Triton
(launch table and configurations, kernel paths, the interpreter), torch (chunks, traffic, work memory).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels.backends import primitives
from fastrl_kernels.core import CoreParams
from fastrl_kernels.reference.logprobs import token_stats
from fastrl_kernels.testing.asserts import assert_close_to_reference
from fastrl_kernels.testing.strategies import IGNORE_INDEX, core_inputs, make_logits
from tests.backends_under_test import PRIMITIVE_BACKENDS, device_of, every_backend
from tests.conftest import examples

BACKENDS = every_backend()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = ("logp", "entropy", "lse", "mean_x", "log_sum_p2")
TRANSFORMS = {
    "plain": CoreParams(),
    "temperature": CoreParams(temperature=0.6),
    "hot_temperature": CoreParams(temperature=1.7),
    "logit_scale": CoreParams(logit_scale=2.5),
    "scale_and_temperature": CoreParams(temperature=1.3, logit_scale=0.5),
    "softcap": CoreParams(softcap=5.0),
    "softcap_temperature": CoreParams(temperature=0.8, softcap=30.0),
    # c = 2 puts |logit_scale z / c| on both sides of the tanh series bound (0.4) of the Triton kernels.
    "tight_softcap": CoreParams(softcap=2.0, logit_scale=0.5),
    "softcap_scale_temperature": CoreParams(temperature=0.8, logit_scale=1.5, softcap=30.0, ignore_index=-1),
}


def _interpreted(backend: str) -> bool:
    devices = PRIMITIVE_BACKENDS[backend].devices
    return devices is not None and device_of(backend) not in devices


def targets_for(n_rows: int, vocab: int, seed: int, ignore_index: int = IGNORE_INDEX, ignore_every: int = 3):
    """Random targets, every ``ignore_every``-th row ignored, row 1 (when kept) at the last lane."""
    targets = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(seed))
    if n_rows > 1:
        targets[1] = vocab - 1
    targets[::ignore_every] = ignore_index
    return targets


def coefficients(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(n, generator=g) - 1, 2 * torch.rand(n, generator=g) - 1


def reference(logits, targets, params, g_lp, g_entropy):
    """float64 stats of the same (rounded) logits and dL/dlogits of L = sum(g_lp logp + g_entropy H)."""
    z = logits.detach().cpu().to(torch.float64).requires_grad_(True)
    ref = token_stats(z, targets.cpu(), temperature=params.temperature, logit_scale=params.logit_scale,
                      softcap=params.softcap, ignore_index=params.ignore_index)
    (ref.logp * g_lp.double() + ref.entropy * g_entropy.double()).sum().backward()
    return ref, z.grad


def check(backend, logits, targets, params, *, with_p2=True, seed=0, out=None, in_place_too=False,
          ref_logits=None, **options):
    """``stats`` and ``grad`` of ``backend`` (on ``logits``' device; ``options`` go to both) against the
    reference (on ``ref_logits`` when given): every field of the kept rows, zeros on the ignored ones,
    output dtypes, shapes and device, the gradient within the row-scaled bound (the row's scale is
    |g_lp| + |g_entropy|, the terms that cancel in it), zero on ignored rows; ``out`` is written and
    returned, the logits are left as they were; ``in_place_too``: ``out=`` a copy of the logits gives the
    same bits. Returns (stats, grad) on CPU."""
    prims = primitives(backend)
    n, dtype, device = logits.shape[0], logits.dtype, logits.device
    g_lp, g_entropy = coefficients(n, seed)
    ref, ref_grad = reference(logits if ref_logits is None else ref_logits, targets, params, g_lp, g_entropy)
    before = logits.clone()
    dev_targets = targets.to(device)
    stats = prims.stats(logits, dev_targets, params, with_p2, **options)
    valid = targets != params.ignore_index
    for name in FIELDS:
        value = getattr(stats, name)
        if name == "log_sum_p2" and not with_p2:
            assert value is None
            continue
        assert value.shape == (n,) and value.device == device, name
        assert value.dtype == (torch.float64 if name in ("lse", "mean_x") else torch.float32), name
        value = value.cpu()
        assert_close_to_reference(value[valid], getattr(ref, name).detach()[valid], dtype=dtype, name=name)
        assert torch.equal(value[~valid], torch.zeros_like(value[~valid])), f"{name} of ignored rows"
    g_lp_dev, g_entropy_dev = g_lp.to(device), g_entropy.to(device)
    grad = prims.grad(logits, dev_targets, stats, g_lp_dev, g_entropy_dev, params, out=out, **options)
    assert grad.dtype == dtype and grad.shape == logits.shape and grad.device == device
    if out is not None:
        assert grad.data_ptr() == out.data_ptr()
    if out is None or out.data_ptr() != logits.data_ptr():
        assert torch.equal(logits.nan_to_num(), before.nan_to_num()), "grad() modified the logits"
    grad = grad.cpu()
    assert_close_to_reference(grad[valid], ref_grad[valid], dtype=dtype, kind="grad", name="grad",
                              row_scale=(g_lp.abs() + g_entropy.abs())[valid])
    assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid])), "gradient of ignored rows"
    if in_place_too:
        work = before.clone()
        result = prims.grad(work, dev_targets, stats, g_lp_dev, g_entropy_dev, params, out=work, **options)
        assert result.data_ptr() == work.data_ptr() and torch.equal(work.cpu(), grad), "in-place gradient"
    return stats._replace(**{k: v.cpu() for k, v in stats._asdict().items() if v is not None}), grad


def _logits(backend, kind, shape, seed, dtype=torch.float32):
    return make_logits(kind, shape, seed=seed, dtype=dtype).to(device_of(backend))


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_transform_and_dtype(backend, dtype, transform):
    params = TRANSFORMS[transform]
    logits = _logits(backend, "normal", (12, 300), seed=1, dtype=DTYPES[dtype])
    check(backend, logits, targets_for(12, 300, seed=2, ignore_index=params.ignore_index), params)


@pytest.mark.parametrize("transform", ["plain", "temperature", "softcap_temperature"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["huge", "all_negative", "peaked", "flat", "all_equal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_kinds(backend, kind, dtype, transform):
    """"huge" is uniform in [-1e4, 1e4]: the reference holds the backends to float32 accuracy there,
    which they keep by shifting the raw logits and splitting the float64 lse (core.CoreStats)."""
    logits = _logits(backend, kind, (9, 400), seed=3, dtype=DTYPES[dtype])
    stats, _ = check(backend, logits, targets_for(9, 400, seed=4), TRANSFORMS[transform])
    assert torch.isfinite(stats.logp).all() and torch.isfinite(stats.entropy).all()


@pytest.mark.parametrize("vocab", [2, 3, 257])
@pytest.mark.parametrize("kind", ["flat", "all_equal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_rows(backend, kind, vocab):
    logits = _logits(backend, kind, (6, vocab), seed=9)
    targets = targets_for(6, vocab, seed=10, ignore_every=4)
    stats, _ = check(backend, logits, targets, CoreParams(temperature=0.7, logit_scale=2.0))
    valid = targets != IGNORE_INDEX
    # "flat" rows are uniform up to N(0, 1e-3) logits.
    torch.testing.assert_close(stats.entropy[valid], torch.full((4,), math.log(vocab)), rtol=0, atol=5e-3)


@pytest.mark.parametrize("vocab", [1, 2, 17, 128, 129, 1009])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_sizes(backend, vocab):
    scale = 50.0 if vocab == 1 else 1.0  # one token: p = 1 whatever its logit
    logits = _logits(backend, "normal", (7, vocab), seed=vocab) * scale
    stats, grad = check(backend, logits, targets_for(7, vocab, seed=vocab), CoreParams(temperature=0.5))
    if vocab == 1:
        assert torch.equal(stats.logp, torch.zeros(7)) and torch.equal(stats.entropy, torch.zeros(7))
        assert torch.equal(grad, torch.zeros(7, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_p2_only_when_asked(backend):
    prims = primitives(backend)
    logits = _logits(backend, "normal", (5, 300), seed=13)
    targets = targets_for(5, 300, seed=14).to(logits.device)
    params = TRANSFORMS["scale_and_temperature"]
    default, without = prims.stats(logits, targets, params), prims.stats(logits, targets, params, False)
    asked = check(backend, logits, targets.cpu(), params, with_p2=True)[0]
    check(backend, logits, targets.cpu(), params, with_p2=False)
    assert default.log_sum_p2 is None and without.log_sum_p2 is None
    for a, b, c in zip(default[:4], without[:4], asked[:4]):
        assert torch.equal(a, b) and torch.equal(a.cpu(), c)


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, -1])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_never_read(backend, dtype, ignore_index):
    """NaN in every ignored row reaches no output: ignored rows are not read."""
    logits = _logits(backend, "normal", (12, 257), seed=5, dtype=DTYPES[dtype])
    targets = targets_for(12, 257, seed=6, ignore_index=ignore_index)
    targets[1::2] = ignore_index
    poisoned = logits.clone()
    poisoned[(targets == ignore_index).to(logits.device)] = float("nan")
    stats, grad = check(backend, poisoned, targets, CoreParams(ignore_index=ignore_index), ref_logits=logits,
                        in_place_too=True)
    assert all(torch.isfinite(field).all() for field in stats) and torch.isfinite(grad).all()


@pytest.mark.parametrize("ignore_index", [IGNORE_INDEX, -1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend, ignore_index):
    logits = _logits(backend, "normal", (6, 500), seed=11)
    targets = torch.full((6,), ignore_index, dtype=torch.int64)
    stats, grad = check(backend, logits, targets, CoreParams(ignore_index=ignore_index), in_place_too=True)
    assert torch.equal(grad, torch.zeros(6, 500)) and all(torch.equal(f, torch.zeros(6, dtype=f.dtype)) for f in stats)


@pytest.mark.parametrize("with_p2", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend, with_p2):
    prims, device = primitives(backend), device_of(backend)
    logits = torch.empty((0, 50), device=device)
    targets = torch.empty((0,), dtype=torch.int64, device=device)
    stats = prims.stats(logits, targets, CoreParams(), with_p2)
    assert all(field.shape == (0,) for field in stats if field is not None)
    assert (stats.log_sum_p2 is None) is not with_p2
    empty = torch.empty(0, device=device)
    assert prims.grad(logits, targets, stats, empty, empty, CoreParams()).shape == (0, 50)
    assert prims.grad(logits, targets, stats, empty, empty, CoreParams(), out=logits).shape == (0, 50)


@pytest.mark.parametrize("transform", ["plain", "temperature", "softcap"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_lanes(backend, dtype, transform):
    """-inf logits (banned tokens) are lanes of p = 0 (under softcap, of x = -c / temperature) and a zero
    gradient, never NaN: every third lane; a leading run of 2100 lanes, more than a 2048-lane block, so
    the row's frame starts late; a row with one live lane (p = 1, entropy 0)."""
    logits = make_logits("normal", (8, 2200), seed=12, dtype=DTYPES[dtype])
    logits[:, ::3] = float("-inf")
    logits[0, :2100] = float("-inf")
    logits[5, :] = float("-inf")
    logits[5, 7] = 1.5
    targets = torch.arange(8) * 3 + 1
    targets[0], targets[5], targets[3] = 2101, 7, IGNORE_INDEX
    stats, grad = check(backend, logits.to(device_of(backend)), targets, TRANSFORMS[transform], in_place_too=True)
    assert torch.equal(grad[:, ::3], torch.zeros_like(grad[:, ::3])) and torch.isfinite(grad).all()
    if TRANSFORMS[transform].softcap is None:
        assert stats.logp[5] == 0 and stats.entropy[5] == 0


@pytest.mark.parametrize("kind,softcap", [("normal", None), ("normal", 5.0), ("huge", None), ("peaked", 30.0)])
@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float64], ids=[*DTYPES, "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_in_place(backend, dtype, kind, softcap):
    """``out=`` a NaN-filled tensor and ``out=logits`` (the in-place backward) give the bits of a fresh
    gradient. float64 logits run on a float32 copy (``core.float64_on_float32_rows``) where a backend's
    kernels read float32 / bfloat16 / float16 only; the gradient comes back in float64."""
    logits = _logits(backend, kind, (16, 300), seed=6, dtype=dtype)
    targets = targets_for(16, 300, seed=6, ignore_every=5)
    params = CoreParams(temperature=0.7, softcap=softcap)
    _, fresh = check(backend, logits, targets, params, in_place_too=True)
    out = torch.full_like(logits, float("nan"))
    _, into = check(backend, logits, targets, params, out=out)
    assert torch.equal(into, fresh)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend, dtype, in_place):
    """Rows of a wider tensor (row stride 340 > V = 300, unit stride in V) and an ``out`` of row stride
    400: the bits of contiguous rows, and nothing written outside the rows."""
    storage = _logits(backend, "normal", (12, 340), seed=7, dtype=DTYPES[dtype])
    logits = storage[:, 13:313]
    assert not logits.is_contiguous() and logits.stride() == (340, 1)
    targets = targets_for(12, 300, seed=8, ignore_every=4)
    params = CoreParams(temperature=1.3, logit_scale=0.5)
    sink = torch.full((12, 400), 7.0, dtype=DTYPES[dtype], device=storage.device)
    edges = storage[:, :13].clone(), storage[:, 313:].clone()
    out = logits if in_place else sink[:, 50:350]
    dense = check(backend, logits.contiguous(), targets, params)
    strided = check(backend, logits, targets, params, out=out)
    for a, b in zip(strided[0], dense[0]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(strided[1], dense[1])
    assert torch.equal(storage[:, :13], edges[0]) and torch.equal(storage[:, 313:], edges[1])
    assert (sink[:, :50] == 7).all() and (sink[:, 350:] == 7).all()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(25))
@given(data=st.data(), with_p2=st.booleans(), seed=st.integers(0, 99))
def test_property_matches_reference(backend, data, with_p2, seed):
    rows, vocab = (24, 1500) if _interpreted(backend) else (300, 5000)
    inputs = data.draw(core_inputs(max_rows=rows, max_vocab=vocab, dtypes=tuple(DTYPES.values()),
                                   ignore_indices=(IGNORE_INDEX, -1)))
    params = CoreParams(temperature=inputs["temperature"], logit_scale=inputs["logit_scale"],
                        softcap=inputs["softcap"], ignore_index=inputs["ignore_index"])
    check(backend, inputs["logits"].to(device_of(backend)), inputs["targets"], params, with_p2=with_p2, seed=seed)
