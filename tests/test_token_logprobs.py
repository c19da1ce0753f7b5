import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels import reference, torch_backend
from fastrl_kernels.testing import assert_close_to_reference, core_inputs, make_logits
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples

BACKENDS = cpu_fused_backends()
HAS_TRITON = importlib.util.find_spec("triton") is not None
OPTIONS = ("temperature", "logit_scale", "softcap", "ignore_index")


def _check_against_reference(backend, inputs, seed=0, with_entropy=True):
    """Forward and logits gradient of ``token_logprobs`` vs the float64 reference on the same logits.

    The backward is driven with random upstream coefficients (g_lp, g_h); they are the row scale of the
    logits gradient (a row whose gradient is small by cancellation is still held to them).
    """
    logits, targets = inputs["logits"], inputs["targets"]
    options = {k: inputs[k] for k in OPTIONS if k in inputs}
    z = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(z, targets, backend=backend, with_entropy=with_entropy, **options)
    # The reference and the comparison run on the CPU, whatever device the backend ran on.
    logp, entropy = logp.cpu(), entropy.cpu() if entropy is not None else None
    z64 = logits.detach().cpu().to(torch.float64).requires_grad_(True)
    ref_logp, ref_entropy = reference.token_logprobs(z64, targets.cpu(), **options)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close_to_reference(logp, ref_logp, dtype=logits.dtype, name=f"{backend} logprobs")
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    if with_entropy:
        assert entropy.dtype == torch.float32
        assert_close_to_reference(entropy, ref_entropy, dtype=logits.dtype, name=f"{backend} entropy")
        ((logp.double() * g_lp).sum() + (entropy.double() * g_h).sum()).backward()
        ((ref_logp * g_lp).sum() + (ref_entropy * g_h).sum()).backward()
        row_scale = g_lp.abs() + g_h.abs()
    else:
        assert entropy is None
        (logp.double() * g_lp).sum().backward()
        (ref_logp * g_lp).sum().backward()
        row_scale = g_lp.abs()
    assert z.grad.dtype == logits.dtype
    assert_close_to_reference(z.grad.cpu(), z64.grad, dtype=logits.dtype, kind="grad", name=f"{backend} grad",
                              row_scale=row_scale)
    ignored = (targets == options.get("ignore_index", -100)).cpu()
    assert bool((logp[ignored] == 0).all()) and bool((z.grad.cpu()[ignored] == 0).all())


def _inputs(rows, vocab, seed, dtype=torch.float32, kind="normal", ignore_index=-100, ignore_every=5, **options):
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::ignore_every] = ignore_index
    return dict(logits=make_logits(kind, (rows, vocab), seed, dtype), targets=targets,
                ignore_index=ignore_index, **options)


# ---------------------------------------------------------------------------------------------
# Property tests: logits with spread, every transform option, -100 and a custom ignore_index.

@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(inputs=core_inputs(max_rows=48, max_vocab=3000, ignore_indices=(-100, -1)), with_entropy=st.booleans())
def test_fp32_matches_reference(backend, inputs, with_entropy):
    _check_against_reference(backend, inputs, with_entropy=with_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(inputs=core_inputs(max_rows=32, max_vocab=2000, dtypes=(torch.bfloat16, torch.float16),
                          kinds=("normal", "peaked", "all_negative"), ignore_indices=(-100, -1)))
def test_half_precision_matches_reference_on_rounded_inputs(backend, inputs):
    _check_against_reference(backend, inputs)


# ---------------------------------------------------------------------------------------------
# Deterministic cases: each option on its own, on every backend.

TRANSFORMS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "logit_scale": dict(logit_scale=2.5),
    "softcap": dict(softcap=4.0),
    "all": dict(temperature=1.7, logit_scale=0.5, softcap=3.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_transform_options_match_reference(backend, transform):
    # V = 3001 spans two blocks of the native kernel (2048 lanes).
    _check_against_reference(backend, _inputs(7, 3001, seed=21, **TRANSFORMS[transform]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index_rows_are_zero_and_the_rest_match_reference(backend, ignore_index):
    # 3 is a class id: rows whose target is 3 are ignored, whatever their logits.
    inputs = _inputs(10, 1009, seed=22, ignore_index=ignore_index, ignore_every=3, temperature=0.8, softcap=20.0)
    inputs["targets"][1] = 3 if ignore_index != 3 else 4
    _check_against_reference(backend, inputs)
    logp, entropy = fk.token_logprobs(inputs["logits"], inputs["targets"], ignore_index=ignore_index,
                                      backend=backend)
    ignored = inputs["targets"] == ignore_index
    assert int(ignored.sum()) == 4
    assert bool((logp[ignored] == 0).all()) and bool((entropy[ignored] == 0).all())
    assert bool((logp[~ignored] < 0).all()) and bool((entropy[~ignored] > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_ignore_value_is_a_target_error_under_a_custom_ignore_index(backend):
    logits = torch.randn(3, 10)
    targets = torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 10\) or ignore_index=-1, got -100"):
        fk.token_logprobs(logits, targets, ignore_index=-1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_with_entropy_false_matches_reference(backend, transform):
    _check_against_reference(backend, _inputs(9, 2049, seed=23, **TRANSFORMS[transform]), with_entropy=False)


# The torch backend works on chunks of rows_per_chunk(N, V) rows (2^18 elements); each case below has
# several chunks (the last one partial) and distinct targets in each.
MULTI_CHUNK = {
    "3001x200": (200, 3001),  # 87 rows per chunk
    "257x2100": (2100, 257),  # 1020 rows per chunk
    "one_row_per_chunk": (3, (1 << 18) + 7),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MULTI_CHUNK))
def test_several_torch_chunks_match_reference(backend, case):
    rows, vocab = MULTI_CHUNK[case]
    assert torch_backend.rows_per_chunk(rows, vocab) < rows
    inputs = _inputs(rows, vocab, seed=24, kind="peaked", ignore_every=7, temperature=0.9, logit_scale=1.5)
    _check_against_reference(backend, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_several_torch_chunks_half_precision_and_softcap(backend, dtype):
    # Half-precision gradients go through a float32 work buffer in the torch backend (another code path).
    _check_against_reference(backend, _inputs(200, 3001, seed=25, dtype=dtype, softcap=10.0, temperature=1.3))


# ---------------------------------------------------------------------------------------------
# Degenerate rows: uniform distributions and a one-token vocabulary.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["flat", "all_equal"])
@pytest.mark.parametrize("vocab", [2, 3, 2049])
def test_uniform_rows_give_minus_log_v_and_log_v(backend, kind, vocab):
    inputs = _inputs(6, vocab, seed=26, kind=kind, ignore_every=4, temperature=0.7)
    _check_against_reference(backend, inputs)
    logp, entropy = fk.token_logprobs(inputs["logits"], inputs["targets"], backend=backend, temperature=0.7)
    valid = inputs["targets"] != -100
    # "flat" rows are uniform up to N(0, 1e-3) logits: within ~1e-3 of log V.
    torch.testing.assert_close(logp[valid], torch.full_like(logp[valid], -math.log(vocab)), rtol=0, atol=5e-3)
    torch.testing.assert_close(entropy[valid], torch.full_like(entropy[valid], math.log(vocab)), rtol=0, atol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_vocabulary(backend):
    inputs = _inputs(5, 1, seed=27, ignore_every=2, temperature=0.5, softcap=5.0)
    _check_against_reference(backend, inputs)
    logp, entropy = fk.token_logprobs(inputs["logits"], inputs["targets"], backend=backend)
    assert bool((logp == 0).all()) and bool((entropy == 0).all())


# ---------------------------------------------------------------------------------------------
# Layouts and extreme values.

@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 6, 2 * 257, generator=g)
    logits = wide[..., ::2]  # stride 2 in the vocabulary dimension
    transposed = torch.randn(6, 4, 257, generator=g).transpose(0, 1)  # non-contiguous leading dims
    targets = torch.randint(0, 257, (4, 6), generator=g)
    targets[1, 2] = -100
    for z in (logits, transposed):
        _check_against_reference(backend, dict(logits=z, targets=targets, temperature=0.7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite_and_exact(backend):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 1009, generator=g) * 1e4
    logits[1] = -5e3  # all equal and negative
    logits[2, 7] = float("-inf")  # a masked vocabulary entry
    targets = torch.randint(0, 1009, (8,), generator=g)
    targets[2] = 8
    z = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(z, targets, backend=backend)
    # The reference with the banned entry at an exp-underflowing finite value (its p is 0 either way).
    z64 = logits.clamp(min=-1e30).double().requires_grad_(True)
    ref_logp, ref_entropy = reference.token_logprobs(z64, targets)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name="logprobs")
    assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name="entropy")
    (logp.sum() + entropy.sum()).backward()
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert torch.isfinite(z.grad).all() and z.grad[2, 7] == 0
    assert_close_to_reference(z.grad, z64.grad, dtype=torch.float32, kind="grad", name="grad",
                              row_scale=torch.full((8,), 2.0))


# ---------------------------------------------------------------------------------------------
# The Triton kernels at op level, under the interpreter on CPU (small shapes).

@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("transform", ["plain", "all"])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_triton_matches_reference(transform, with_entropy):
    inputs = _inputs(6, 300, seed=28, ignore_index=-1, ignore_every=4, **TRANSFORMS[transform])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    _check_against_reference("triton", inputs, with_entropy=with_entropy)


# ---------------------------------------------------------------------------------------------
# The reference route, validation, compile.

def test_reference_backend_gives_hand_values():
    # Row 0: z = [0, ln 3] at temperature 0.5 -> x = [0, 2 ln 3], p = [1/10, 9/10]; row 1 ignored (-1).
    logits = torch.tensor([[0.0, math.log(3.0)], [5.0, -2.0]])
    targets = torch.tensor([1, -1])
    logp, entropy = fk.token_logprobs(logits, targets, temperature=0.5, ignore_index=-1, backend="reference")
    assert logp.dtype == entropy.dtype == torch.float32
    expected_h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.9), 0.0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy, torch.tensor([expected_h, 0.0]), rtol=1e-6, atol=1e-7)
    # logit_scale 2 and softcap c = 4: x = 4 tanh(2 z / 4), log softmax in float64.
    cap = 4.0
    z = torch.tensor([[0.0, 1.0, -1.0]])
    x = cap * torch.tanh(2.0 * z.double() / cap)
    want = torch.log_softmax(x, -1)[0, 2]
    logp, none = fk.token_logprobs(z, torch.tensor([2]), logit_scale=2.0, softcap=cap, with_entropy=False,
                                   backend="reference")
    assert none is None
    torch.testing.assert_close(logp, want.float().view(1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, "targets: expected dtype torch.int64"),
        (dict(targets=torch.zeros(3, dtype=torch.int64)), ValueError, r"targets: expected shape \(4,\)"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, r"targets: expected values in \[0, 10\)"),
        (dict(temperature=0.0), ValueError, "temperature: expected a number > 0"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(logit_scale=0.0), ValueError, "logit_scale: expected a number > 0"),
        (dict(backend="cuda-magic"), ValueError, "backend: expected one of"),
        (dict(logits=torch.zeros(4, 10, dtype=torch.int64)), TypeError, "logits: expected dtype"),
        (dict(logits=torch.zeros(10)), ValueError, r"logits: expected shape \[N, V\]"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    args = dict(logits=torch.zeros(4, 10), targets=torch.tensor([0, 1, 2, 3]))
    args.update(kwargs)
    logits, targets = args.pop("logits"), args.pop("targets")
    with pytest.raises(error, match=match):
        fk.token_logprobs(logits, targets, **args)


def test_compiles_with_fullgraph_and_matches_eager():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 6, 97, generator=g)
    targets = torch.randint(0, 97, (2, 6), generator=g)

    def objective(z):
        logp, entropy = fk.token_logprobs(z, targets, temperature=0.8, backend="torch")
        return logp.sum() - 0.1 * entropy.sum()

    eager_z = logits.clone().requires_grad_(True)
    objective(eager_z).backward()
    compiled_z = logits.clone().requires_grad_(True)
    torch.compile(objective, fullgraph=True, backend="eager")(compiled_z).backward()
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
