"""The lm_head paths (``fk.linear_*``) against the float64 reference on hidden @ W^T + b: linear_token_logprobs
on every CPU fused backend, the reference backend by hand, the chunk-size rule and the input checks.

The problems and the gradient checks (``_problem``, ``_reference_logits``, ``_chain``, ``_chain_scales``,
``_assert_grads``) serve the other ``tests/test_linear_*.py`` files.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.ops import linear_chunks
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.testing import assert_close_to_reference
from fastrl_kernels.testing.strategies import seeds, vocab_sizes
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples
from tests.test_token_logprobs import TRANSFORMS

BACKENDS = cpu_fused_backends()
HIDDEN_SIZES = st.sampled_from((1, 2, 7, 13, 31, 64)) | st.integers(1, 48)


def _problem(leading, hidden_size, vocab, seed, dtype=torch.float32, with_bias=True, ignore=True, ignore_index=-100):
    """hidden ~ N(0, 1), weight ~ N(0, 4 / H), bias ~ N(0, 1): logits of scale ~2 whatever H; ~20% of the
    targets ``ignore_index`` when ``ignore``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*leading, hidden_size), generator=g).to(dtype)
    weight = (2.0 * torch.randn((vocab, hidden_size), generator=g) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, leading, generator=g)
    if ignore:
        targets = targets.masked_fill(torch.rand(leading, generator=g) < 0.2, ignore_index)
    return hidden, weight, bias, targets


def _leaves(hidden, weight, bias):
    return [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]


def _reference_logits(hidden, weight, bias):
    """The logits the op sees: exact products for fp32 inputs; for half precision the same rounded GEMM
    (the chunks round their logits to the hidden dtype, so the reference gets those rounded values)."""
    if hidden.dtype in (torch.float32, torch.float64):
        logits = hidden.double() @ weight.double().t()
        logits = logits if bias is None else logits + bias.double()
    else:
        logits = (hidden @ weight.t() if bias is None else torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]),
                                                                        weight.t()).view(*hidden.shape[:-1], -1))
    return logits.detach().double().requires_grad_(True)


def _chain(logits, hidden, weight, bias, grad=None):
    """Reference grads of hidden, weight, bias (float64) from the reference grad of the logits (``grad``, or
    ``logits.grad``)."""
    g = (logits.grad if grad is None else grad).reshape(-1, logits.shape[-1])
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    grads = [(g @ weight.detach().double()).view(hidden.shape), g.t() @ h]
    return grads + ([g.sum(0)] if bias is not None else [None])


def _chain_scales(logits, targets, coefficient, hidden, weight, ignore_index=-100, temperature=1.0,
                  logit_scale=1.0, softcap=None):
    """Row scales of the hidden, weight and bias gradients: the sizes of the terms their GEMMs add up.

    Row i of dL/dlogits is k g_i (1[j=y] - p_j) + ... with terms of size k c_i (p_ij + 1[j=y_i]), c_i the
    token's |dL/dlogp| + |dL/dH| (``coefficient``) and k = logit_scale / temperature >= |dx/dz|. With A those
    term sizes: hidden row i -> max_h (A |W|)_ih, weight row j -> max_h (A^T |hidden|)_jh, bias j -> sum_i A_ij.
    """
    x = reference.transformed_logits(logits.detach(), temperature=temperature, logit_scale=logit_scale,
                                     softcap=softcap)
    p = torch.softmax(x, dim=-1).reshape(-1, x.shape[-1])
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    onehot = torch.zeros_like(p)
    onehot[valid.nonzero().squeeze(1), flat_targets[valid]] = 1.0
    c = coefficient.detach().double().reshape(-1, 1) * valid.double().unsqueeze(1) * (logit_scale / temperature)
    terms = c * (p + onehot)
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    hidden_scale = (terms @ weight.detach().double().abs()).amax(dim=-1).view(hidden.shape[:-1])
    weight_scale = (terms.t() @ h.abs()).amax(dim=-1)
    return hidden_scale, weight_scale, terms.sum(dim=0)


def _assert_grads(leaves, expected, dtype, name, scales):
    for label, leaf, ref, scale in zip(("hidden", "weight", "bias"), leaves, expected, scales):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"{name}: grad of {label}"
        grad = leaf.grad
        if label == "bias":  # each vocabulary entry is a row of its own
            grad, ref = grad.unsqueeze(-1), ref.unsqueeze(-1)
        assert_close_to_reference(grad, ref, dtype=dtype, kind="grad", name=f"{name} grad {label}", row_scale=scale)


def _chunks(n_rows, chunk_size):
    return -(-n_rows // chunk_size)


def _check_token_logprobs(hidden, weight, bias, targets, backend="torch", chunk=None, with_entropy=True, seed=0,
                          **options):
    """linear_token_logprobs forward and hidden / weight / bias gradients vs the float64 reference on the
    logits the op sees, the backward driven by random coefficients (a, b) on (logp, entropy)."""
    rows = targets.numel()
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], backend=backend,
                                                 chunk_size=chunk, with_entropy=with_entropy, **options)
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
        ((a * logp).sum() + ((b * entropy).sum() if with_entropy else 0.0)).backward()
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert counter.routes == ["stats", "logprobs_backward"]
    if chunk is not None:
        n = _chunks(rows, chunk)
        assert (counter.logits, counter.grad_hidden, counter.grad_weight) == (2 * n, n, n)
    logits = _reference_logits(hidden, weight, bias)
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, **options)
    assert_close_to_reference(logp, ref_logp, dtype=hidden.dtype, name=f"{backend} logp")
    if with_entropy:
        assert_close_to_reference(entropy, ref_entropy, dtype=hidden.dtype, name=f"{backend} entropy")
        (a.double() * ref_logp + b.double() * ref_entropy).sum().backward()
        coefficient = a.abs() + b.abs()
    else:
        assert entropy is None
        (a.double() * ref_logp).sum().backward()
        coefficient = a.abs()
    scales = _chain_scales(logits, targets, coefficient, hidden, weight, **options)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), hidden.dtype, f"{backend} token_logprobs", scales)
    ignored = targets == options.get("ignore_index", -100)
    assert bool((logp[ignored] == 0).all()) and bool((leaves[0].grad[ignored] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(rows=st.integers(1, 40), hidden_size=HIDDEN_SIZES, vocab=vocab_sizes(400, min_vocab=2), seed=seeds(),
       chunk=st.integers(1, 45), with_bias=st.booleans(), data=st.data())
def test_token_logprobs_match_reference(backend, rows, hidden_size, vocab, seed, chunk, with_bias, data):
    options = dict(temperature=data.draw(st.sampled_from((1.0, 0.7, 1.6))),
                   logit_scale=data.draw(st.sampled_from((1.0, 2.0, 0.5))),
                   softcap=data.draw(st.sampled_from((None, 3.0))),
                   ignore_index=data.draw(st.sampled_from((-100, -1))))
    hidden, weight, bias, targets = _problem((rows,), hidden_size, vocab, seed, with_bias=with_bias,
                                             ignore_index=options["ignore_index"])
    _check_token_logprobs(hidden, weight, bias, targets, backend, chunk, data.draw(st.booleans()), seed, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_token_logprobs_options_match_reference(backend, transform, ignore_index):
    # V = 2500: two blocks of the native kernel; batched [B, T] leading shape, chunks of 5 rows.
    hidden, weight, bias, targets = _problem((2, 7), 24, 2500, seed=31, ignore_index=ignore_index)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 5, ignore_index=ignore_index,
                          **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_token_logprobs_without_entropy_match_reference(backend, transform):
    hidden, weight, bias, targets = _problem((13,), 16, 301, seed=32)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 4, with_entropy=False, **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_vocabulary(backend):
    hidden, weight, bias, targets = _problem((6,), 5, 1, seed=33)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 4, temperature=0.5, softcap=2.0)
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert bool((logp == 0).all()) and bool((entropy == 0).all())


def test_reference_backend_gives_hand_values():
    # hidden = e_1, e_2 and a one-hot weight give logits [0, ln 3] and [ln 3, 0] (bias 0).
    ln3 = math.log(3.0)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([[0.0, ln3], [ln3, 0.0]])
    targets = torch.tensor([1, 1, -1])
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, ignore_index=-1, backend="reference")
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75), math.log(0.25), 0.0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy, torch.tensor([h, h, 0.0]), rtol=1e-6, atol=1e-7)
    # bias [1, 0] and temperature 0.5: row 0 has logits [1, ln 3], x = [2, 2 ln 3].
    bias = torch.tensor([1.0, 0.0])
    logp, _ = fk.linear_token_logprobs(hidden[:1], weight, targets[:1], bias=bias, temperature=0.5, backend="reference")
    x = torch.tensor([2.0, 2 * ln3], dtype=torch.float64)
    torch.testing.assert_close(logp, torch.log_softmax(x, 0)[1:].float(), rtol=1e-6, atol=1e-7)
    # policy loss at ratio 1 (old = logp): clip loss = -mean(A) over unmasked tokens, gradient-free metrics.
    old = torch.tensor([math.log(0.75), math.log(0.25)])
    out = fk.linear_policy_loss(hidden[:2].unsqueeze(0), weight, targets[:2].unsqueeze(0), old.unsqueeze(0),
                                torch.tensor([[2.0, -1.0]]), backend="reference")
    torch.testing.assert_close(out.loss, torch.tensor(-0.5), rtol=1e-6, atol=1e-7)
    # DPO sigmoid: pair (chosen row 0, rejected row 1), policy log-probs ln 0.75 and ln 0.25, refs 0.
    dpo = fk.linear_dpo_loss(hidden[:2].unsqueeze(1), weight, targets[:2].unsqueeze(1), None, torch.zeros(1),
                             torch.zeros(1), beta=0.5, backend="reference")
    margin = 0.5 * (math.log(0.75) - math.log(0.25))
    torch.testing.assert_close(dpo.loss, torch.tensor(math.log1p(math.exp(-margin)), dtype=torch.float32))


def test_chunk_size_rule():
    choose = linear_chunks.choose_chunk_size
    cpu = torch.device("cpu")
    rows = choose(1 << 20, 151936, torch.float32, cpu)
    assert rows % 8 == 0 and rows * 151936 * 4 <= linear_chunks.CPU_CHUNK_BYTES
    assert choose(1 << 20, 151936, torch.bfloat16, cpu) * 151936 * 6 <= linear_chunks.CPU_CHUNK_BYTES
    assert choose(5, 1000, torch.float32, cpu) == 5
    assert choose(1 << 20, 10**9, torch.float32, cpu) == 8  # at least one GEMM-friendly block of rows


def test_input_validation_names_the_argument():
    hidden, weight, bias, targets = _problem((6,), 8, 30, seed=11)
    with pytest.raises(TypeError, match="weight"):
        fk.linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="weight"):
        fk.linear_token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="bias"):
        fk.linear_token_logprobs(hidden, weight, targets, bias=bias[:3])
    with pytest.raises(ValueError, match="targets"):
        fk.linear_token_logprobs(hidden, weight, targets.clamp(min=0) + 30)
    with pytest.raises(ValueError, match="chunk_size"):
        fk.linear_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        fk.linear_dpo_loss(hidden.view(3, 2, 8), weight, targets.view(3, 2), None, torch.zeros(1), torch.zeros(1))
