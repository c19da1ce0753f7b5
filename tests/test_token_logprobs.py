import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.testing import assert_close_to_reference, core_inputs
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()


def _check_against_reference(backend, inputs, seed=0):
    logits = inputs["logits"]
    options = {k: inputs[k] for k in ("temperature", "logit_scale", "softcap")}
    z = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(z, inputs["targets"], backend=backend, **options)
    z64 = logits.detach().to(torch.float64).requires_grad_(True)
    ref_logp, ref_entropy = reference.token_logprobs(z64, inputs["targets"], **options)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert_close_to_reference(logp, ref_logp, dtype=logits.dtype, name=f"{backend} logprobs")
    assert_close_to_reference(entropy, ref_entropy, dtype=logits.dtype, name=f"{backend} entropy")
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(logp.shape, generator=g, dtype=torch.float64)
    ((logp.double() * g_lp).sum() + (entropy.double() * g_h).sum()).backward()
    ((ref_logp * g_lp).sum() + (ref_entropy * g_h).sum()).backward()
    assert z.grad.dtype == logits.dtype
    assert_close_to_reference(z.grad, z64.grad, dtype=logits.dtype, kind="grad", name=f"{backend} grad",
                              row_scale=g_lp.abs() + g_h.abs())


@pytest.mark.parametrize("backend", BACKENDS)
@given(inputs=core_inputs(max_rows=48, max_vocab=3000))
def test_fp32_matches_reference(backend, inputs):
    _check_against_reference(backend, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(inputs=core_inputs(max_rows=32, max_vocab=2000, dtypes=(torch.bfloat16, torch.float16),
                          kinds=("normal", "peaked", "flat", "all_equal", "all_negative")))
def test_half_precision_matches_reference_on_rounded_inputs(backend, inputs):
    _check_against_reference(backend, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 6, 2 * 257, generator=g)
    logits = wide[..., ::2]  # stride 2 in the vocabulary dimension
    transposed = torch.randn(6, 4, 257, generator=g).transpose(0, 1)  # non-contiguous leading dims
    targets = torch.randint(0, 257, (4, 6), generator=g)
    for z in (logits, transposed):
        logp, entropy = fk.token_logprobs(z, targets, temperature=0.7, backend=backend)
        ref_logp, ref_entropy = reference.token_logprobs(z.double(), targets, temperature=0.7)
        assert logp.shape == (4, 6)
        assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name="logprobs")
        assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name="entropy")


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
    ref_logp, ref_entropy = reference.token_logprobs(logits.double(), targets)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name="logprobs")
    assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name="entropy")
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_and_zero_grad(backend):
    logits = torch.randn(5, 50, requires_grad=True)
    targets = torch.tensor([1, -100, 3, -100, 49])
    logp, entropy = fk.token_logprobs(logits, targets, backend=backend)
    assert logp[1] == 0 and logp[3] == 0 and entropy[1] == 0 and entropy[3] == 0
    (logp.sum() + entropy.sum()).backward()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2, 4]] != 0).any()


def test_with_entropy_false_and_reference_backend():
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    logp, entropy = fk.token_logprobs(logits, targets, with_entropy=False, backend="reference")
    assert entropy is None and logp.dtype == torch.float32 and logp.shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(targets=torch.zeros(4, dtype=torch.int32)), TypeError, "targets: expected dtype torch.int64"),
        (dict(targets=torch.zeros(3, dtype=torch.int64)), ValueError, r"targets: expected shape \(4,\)"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, r"targets: expected values in \[0, 10\)"),
        (dict(temperature=0.0), ValueError, "temperature: expected a number > 0"),
        (dict(softcap=-1.0), ValueError, "softcap"),
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


@given(vocab=st.integers(1, 5))
def test_tiny_vocabularies(vocab):
    logits = torch.randn(3, vocab)
    targets = torch.randint(0, vocab, (3,))
    for backend in BACKENDS:
        logp, entropy = fk.token_logprobs(logits, targets, backend=backend)
        ref_logp, ref_entropy = reference.token_logprobs(logits.double(), targets)
        assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name="logprobs")
        assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name="entropy")


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
