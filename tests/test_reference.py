"""The float64 reference against independent formulations, hand-derived numbers and gradcheck: token
log-probs and stats, the KL estimators and the aggregation modes (the policy losses are in
``tests/test_reference_policy_loss.py``).

Also covers the shared helpers of ``fastrl_kernels.testing``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import reference as ref
from fastrl_kernels.testing import assert_close_to_reference, tolerances
from fastrl_kernels.testing.strategies import core_inputs

LN2 = math.log(2.0)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# token_stats / token_logprobs


def naive_token_logprobs(logits, targets, temperature, logit_scale, softcap, ignore_index=-100):
    z = logits.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logq = F.log_softmax(z / temperature, dim=-1)
    valid = targets != ignore_index
    logp = logq.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    return logp * valid, entropy * valid


@settings(max_examples=40)
@given(inputs=core_inputs(max_rows=24, max_vocab=3000))
def test_token_logprobs_match_naive_log_softmax(inputs):
    logp, entropy = ref.token_logprobs(**inputs)
    want_logp, want_entropy = naive_token_logprobs(**inputs)
    assert logp.dtype == entropy.dtype == torch.float64
    torch.testing.assert_close(logp, want_logp, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-10, atol=1e-9)


@settings(max_examples=25)
@given(inputs=core_inputs(max_rows=16, max_vocab=500))
def test_token_stats_fields_are_consistent(inputs):
    stats = ref.token_stats(**inputs)
    x = ref.transformed_logits(
        inputs["logits"],
        temperature=inputs["temperature"],
        logit_scale=inputs["logit_scale"],
        softcap=inputs["softcap"],
    )
    p = torch.softmax(x, dim=-1)
    valid = inputs["targets"] != -100
    torch.testing.assert_close(stats.lse, torch.logsumexp(x, -1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.mean_x, (p * x).sum(-1), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(stats.log_sum_p2, torch.log((p * p).sum(-1)), rtol=1e-10, atol=1e-9)
    # entropy = lse - E_p[x] on kept rows; ignored rows give 0 for logp and entropy
    scale = 1.0 + x.abs().amax(-1)
    gap = (stats.entropy - (stats.lse - stats.mean_x)).abs()
    assert bool((gap[valid] <= 1e-9 * scale[valid]).all())
    assert bool((stats.logp[~valid] == 0).all()) and bool((stats.entropy[~valid] == 0).all())


def test_token_logprobs_hand_cases():
    # z = [0, ln 3]: p = [1/4, 3/4]; logp(1) = ln 0.75; H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    z = t64([[0.0, math.log(3.0)]])
    logp, entropy = ref.token_logprobs(z, torch.tensor([1]))
    assert logp.item() == pytest.approx(-0.2876820724517809, abs=1e-14)
    assert entropy.item() == pytest.approx(0.5623351446188083, abs=1e-14)
    # temperature 0.5 doubles x: [0, ln 9], p = [0.1, 0.9]; H = -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.3250829734
    logp, entropy = ref.token_logprobs(z, torch.tensor([1]), temperature=0.5)
    assert logp.item() == pytest.approx(math.log(0.9), abs=1e-14)
    assert entropy.item() == pytest.approx(0.3250829733914482, abs=1e-14)
    # softcap c = 1 with logit_scale 2: x = tanh(2 z); z = [0, atanh(0.5) / 2] gives x = [0, 0.5]
    z = t64([[0.0, math.atanh(0.5) / 2]])
    logp, _ = ref.token_logprobs(z, torch.tensor([0]), logit_scale=2.0, softcap=1.0)
    assert logp.item() == pytest.approx(-math.log(1.0 + math.exp(0.5)), abs=1e-14)
    # |z| = 1e4: lse = 1e4 (the other terms are e^-1e4 = 0), so logp(1) = -2e4 and H = 0 exactly
    logp, entropy = ref.token_logprobs(t64([[1e4, -1e4, 0.0]]), torch.tensor([1]))
    assert logp.item() == -2e4 and entropy.item() == 0.0


@pytest.mark.parametrize("temperature,logit_scale,softcap", [(1.0, 1.0, None), (0.7, 1.5, 3.0), (2.0, 0.5, None)])
def test_token_logprobs_gradcheck(temperature, logit_scale, softcap):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 6])

    def fn(z):
        return ref.token_logprobs(z, targets, temperature=temperature, logit_scale=logit_scale, softcap=softcap)

    assert torch.autograd.gradcheck(fn, (logits,))
    logp, entropy = fn(logits)
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    assert bool((grad[1] == 0).all())


# ---------------------------------------------------------------------------------------------
# KL and aggregation, by hand


@pytest.mark.parametrize(
    "estimator,k,clamp,want",
    [
        # logp = 0, k = ref - logp
        ("k1", LN2, None, -0.6931471805599453),  # -k
        ("abs", -LN2, None, 0.6931471805599453),  # |k|
        ("k2", LN2, None, 0.2402265069591007),  # (ln 2)^2 / 2
        ("k3", LN2, None, 0.3068528194400547),  # e^k - k - 1 = 2 - ln 2 - 1
        ("k3", -LN2, None, 0.1931471805599453),  # 1/2 + ln 2 - 1
        ("k3", LN2, 0.5, 0.1487212707001282),  # k clamped to 0.5: e^0.5 - 1.5
        ("k1+", LN2, None, -0.6931471805599453),  # value of k1
        ("k3+", LN2, None, 0.3068528194400547),  # value of k3
    ],
)
def test_kl_penalty_hand_values(estimator, k, clamp, want):
    value = ref.kl_penalty(t64([0.0]), t64([k]), estimator, clamp)
    assert value.item() == pytest.approx(want, abs=1e-14)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), clamp=st.sampled_from([None, 0.3, 2.0]))
def test_straight_through_kl_has_k2_gradient(seed, clamp):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    ref_lp = logp.detach() + torch.randn(9, generator=g, dtype=torch.float64)
    (grad_k2,) = torch.autograd.grad(ref.kl_penalty(logp, ref_lp, "k2", clamp).sum(), logp)
    if clamp is None:  # d/dlogp (ref - logp)^2 / 2 = logp - ref
        torch.testing.assert_close(grad_k2, logp.detach() - ref_lp, rtol=0, atol=1e-14)
    for straight, plain in (("k1+", "k1"), ("k3+", "k3")):
        value = ref.kl_penalty(logp, ref_lp, straight, clamp)
        torch.testing.assert_close(value, ref.kl_penalty(logp, ref_lp, plain, clamp), rtol=0, atol=1e-14)
        (grad,) = torch.autograd.grad(value.sum(), logp)
        torch.testing.assert_close(grad, grad_k2, rtol=0, atol=1e-14)


VALUES = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode,normalizer,want",
    [
        ("token-mean", None, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-mean", None, 2.75),  # (3/2 + 4/1) / 2 sequences
        ("seq-mean-token-sum", None, 3.5),  # (3 + 4) / 2
        ("seq-mean-token-sum-norm", None, 7 / 6),  # 7 / (B * T = 6)
        ("sum", None, 7.0),
        ("token-mean", 10.0, 0.7),
        ("seq-mean-token-mean", 10.0, 0.55),  # 5.5 / 10
        ("seq-mean-token-sum-norm", torch.tensor(14.0), 0.5),
        ("grpo", None, 2.75),
        ("bnpo", None, 7 / 3),
        ("dapo", 7.0, 1.0),
        ("dr_grpo", None, 7 / 6),
    ],
)
def test_aggregate_hand_values(mode, normalizer, want):
    got = ref.aggregate(VALUES, MASK, mode, normalizer)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(want, abs=1e-14)


def test_aggregate_one_dimensional_is_one_sequence():
    x, m = t64([1.0, 2.0, 6.0]), torch.tensor([True, True, False])
    assert ref.aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx(3.0)  # B = 1
    assert ref.aggregate(x, m, "seq-mean-token-sum-norm").item() == pytest.approx(1.0)  # 3 / T


# ---------------------------------------------------------------------------------------------
# fastrl_kernels.testing


def test_tolerances_by_dtype():
    assert tolerances(torch.float32) == {"rtol": 1e-5, "atol": 1e-6}
    assert tolerances(torch.float64, "grad") == {"rtol": 1e-4, "row_atol": 1e-5, "tensor_atol": 1e-6, "atol": 0.0}
    assert tolerances(torch.bfloat16) == {"rtol": 1e-3, "atol": 1e-3}
    assert tolerances(torch.bfloat16, "grad") == {"rtol": 2e-2, "row_atol": 4e-3, "tensor_atol": 1e-4, "atol": 0.0}
    assert tolerances(torch.float16, "grad")["atol"] == 2.0**-24
    with pytest.raises(ValueError, match="kind"):
        tolerances(torch.float32, "backward")


def test_assert_close_to_reference_names_the_value():
    expected = t64([1.0, 2.0])
    assert_close_to_reference(expected.float() + 1e-6, expected, dtype=torch.float32, name="logp")
    with pytest.raises(AssertionError, match="logp"):
        assert_close_to_reference(expected + 1e-3, expected, dtype=torch.float32, name="logp")
    assert_close_to_reference(expected + 1e-3, expected, dtype=torch.bfloat16, name="logp")
    with pytest.raises(AssertionError, match="entropy"):
        assert_close_to_reference(t64([float("nan"), 2.0]), expected, dtype=torch.float32, name="entropy")


def test_gradient_tolerance_scales_with_the_row_and_catches_small_wrong_terms():
    g = torch.Generator().manual_seed(0)
    # A gradient row like p/N: elements ~1e-6, far below an absolute 1e-5 tolerance.
    expected = torch.softmax(torch.randn(4, 50, generator=g, dtype=torch.float64), -1) * 1e-4
    assert_close_to_reference(expected * (1 + 1e-6), expected, dtype=torch.float32, kind="grad")
    with pytest.raises(AssertionError, match="grad row"):
        assert_close_to_reference(expected * 2, expected, dtype=torch.float32, kind="grad", name="grad row")
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_close_to_reference(-expected, expected, dtype=torch.float32, kind="grad")
    # One row 1e3 smaller than the others is still checked on its own scale.
    wrong = expected.clone()
    expected[2] *= 1e-3
    wrong[2] = expected[2] * 1.5
    with pytest.raises(AssertionError, match=r"worst at \[2, "):
        assert_close_to_reference(wrong, expected, dtype=torch.float32, kind="grad")


def test_row_scale_admits_the_cancellation_float32_cannot_avoid():
    # 1 - p_y with p_y = 1 - 1e-12: float32 gives 0; the terms of the row are of size |g_lp| = 1.
    expected = t64([[-1e-12, 1e-12]])
    actual = torch.zeros(1, 2)
    with pytest.raises(AssertionError):
        assert_close_to_reference(actual, expected, dtype=torch.float32, kind="grad")
    assert_close_to_reference(actual, expected, dtype=torch.float32, kind="grad", row_scale=t64([1.0]))
    with pytest.raises(AssertionError):
        assert_close_to_reference(t64([[-1e-12, 1e-4]]), expected, dtype=torch.float32, kind="grad",
                                  row_scale=t64([1.0]))


def test_infinities_and_nans_must_match_in_place():
    assert_close_to_reference(t64([float("-inf"), 1.0]), t64([float("-inf"), 1.0]), dtype=torch.float32)
    with pytest.raises(AssertionError, match="inf mismatch"):
        assert_close_to_reference(t64([float("inf"), 1.0]), t64([float("-inf"), 1.0]), dtype=torch.float32)
    with pytest.raises(AssertionError, match="NaN mismatch"):
        assert_close_to_reference(t64([1.0, 1.0]), t64([float("nan"), 1.0]), dtype=torch.float32)
