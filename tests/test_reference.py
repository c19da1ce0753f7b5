"""The float64 reference against independent formulations, hand-derived numbers and gradcheck.

Also covers the shared helpers of ``fastrl_kernels.testing``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import reference as ref
from fastrl_kernels.config import LOSS_AGG_MODES, POLICY_LOSS_TYPES
from fastrl_kernels.testing import assert_close_to_reference, tolerances
from fastrl_kernels.testing.strategies import core_inputs, policy_configs, policy_inputs

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
# Policy losses, by hand


def loss_of(logp, old, adv, mask=None, **cfg):
    cfg.setdefault("entropy_mode", "sampled")
    loss, metrics = ref.policy_loss_from_logprobs(t64(logp), None, t64(old), t64(adv), mask, **cfg)
    return loss.item(), metrics


L15, L05 = math.log(1.5), math.log(0.5)


@pytest.mark.parametrize(
    "logp,adv,cfg,want",
    [
        # r = 1.5, A = 1: -min(1.5, 1.2) = -1.2; r = 0.5, A = -2: -min(-1, -1.6) = 1.6; mean 0.2
        ([L15, L05], [1.0, -2.0], {}, 0.2),
        # DAPO clip-higher: r = 1.25 < 1.28 stays unclipped: -1.25; with eps_high 0.2: -1.2
        ([math.log(1.25)], [1.0], {"clip_eps_high": 0.28}, -1.25),
        ([math.log(1.25)], [1.0], {}, -1.2),
        # r = 4, A = -1: -min(-4, -1.2) = 4; dual clip c = 3 caps at -c A = 3
        ([math.log(4.0)], [-1.0], {}, 4.0),
        ([math.log(4.0)], [-1.0], {"dual_clip": 3.0}, 3.0),
        # delta = 3 caps the unclipped ratio: max(-A min(4, 3), -A 1.2) = 3
        ([math.log(4.0)], [-1.0], {"delta": 3.0}, 3.0),
        # gspo: log-ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2; eps_high 0.5 leaves it: -sqrt 2
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo", "clip_eps_high": 0.5}, -math.sqrt(2.0)),
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo"}, -1.2),  # sqrt 2 clipped to 1.2
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo_token", "clip_eps_high": 0.5}, -math.sqrt(2.0)),
        # cispo: -sg(clip(1.5, 0.8, 1.2)) A logp = -1.2 ln 1.5
        ([L15], [1.0], {"loss_type": "cispo"}, -1.2 * 0.4054651081081644),
        # sapo, A > 0, tau = 1: -sigmoid(0.5) * 4 = -4 / (1 + e^-0.5)
        ([L15], [1.0], {"loss_type": "sapo"}, -4.0 / (1.0 + math.exp(-0.5))),
        # sapo, A = -1, tau = 1.05: -sigmoid(1.05 * -0.5) (4 / 1.05) (-1)
        ([L05], [-1.0], {"loss_type": "sapo"}, (4.0 / 1.05) / (1.0 + math.exp(0.525))),
        # is_weights multiply the policy term: 0.5 * -1.2
        ([L15], [1.0], {"is_weights": t64([0.5])}, -0.6),
    ],
)
def test_policy_loss_hand_values(logp, adv, cfg, want):
    is_weights = cfg.pop("is_weights", None)
    got, _ = loss_of(logp, [0.0] * len(logp), adv, is_weights=is_weights, **cfg)
    assert got == pytest.approx(want, abs=1e-12)


def test_gspo_sequence_ratio_uses_only_unmasked_tokens():
    # mask [1, 0]: s = exp(ln 2 / 1) = 2, clipped to 1.5 on the one kept token
    got, metrics = loss_of(
        [LN2, 5.0], [0.0, 0.0], [1.0, 1.0], torch.tensor([1, 0]), loss_type="gspo", clip_eps_high=0.5
    )
    assert got == pytest.approx(-1.5, abs=1e-12)
    assert metrics["ratio_mean"].item() == pytest.approx(2.0)


def test_kl_and_entropy_terms_by_hand():
    # r = 1 and A = 0: the policy term is 0; k3 of k = ln 2 is 1 - ln 2; times kl_coef 0.1
    got, metrics = loss_of([0.0], [0.0], [0.0], ref_logprobs=t64([LN2]), kl_coef=0.1)
    assert got == pytest.approx(0.1 * 0.3068528194400547, abs=1e-14)
    assert metrics["kl_mean"].item() == pytest.approx(0.3068528194400547, abs=1e-14)
    # exact entropy [1, 3] (mean 2) with coef 0.1 subtracts 0.2; sampled uses -logp = [1, 3] too
    for mode, entropy in (("exact", t64([1.0, 3.0])), ("sampled", None)):
        loss, metrics = ref.policy_loss_from_logprobs(
            t64([-1.0, -3.0]), entropy, t64([-1.0, -3.0]), t64([0.0, 0.0]), entropy_coef=0.1, entropy_mode=mode
        )
        assert loss.item() == pytest.approx(-0.2, abs=1e-14)
        assert metrics["entropy_mean"].item() == pytest.approx(2.0, abs=1e-14)
    # entropy_agg differs from loss_agg: loss "sum" of zeros, entropy token-mean of [1, 3] -> -0.1 * 2
    loss, _ = ref.policy_loss_from_logprobs(
        t64([-1.0, -3.0]), None, t64([-1.0, -3.0]), t64([0.0, 0.0]),
        entropy_coef=0.1, entropy_mode="sampled", loss_agg="sum", entropy_agg="token-mean",
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.2, abs=1e-14)


def test_metrics_by_hand():
    # r = [1.5, 0.5], A = [1, -2], eps 0.2: both tokens clip (one high, one low)
    # approx_kl = mean((r - 1) - ln r) = ((0.5 - ln 1.5) + (-0.5 - ln 0.5)) / 2 = ln(4/3) / 2
    _, metrics = loss_of([L15, L05], [0.0, 0.0], [1.0, -2.0])
    want = {"clip_frac_low": 0.5, "clip_frac_high": 0.5, "ratio_mean": 1.0, "ratio_max": 1.5}
    want.update(kl_mean=0.0, approx_kl=0.5 * math.log(4.0 / 3.0), entropy_mean=-0.5 * math.log(0.75))
    for name, value in want.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-14), name
    _, metrics = loss_of([L15, L05], [0.0, 0.0], [1.0, -2.0], torch.tensor([True, False]))
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.5) and metrics["ratio_max"].item() == pytest.approx(1.5)


def test_kl_coef_without_ref_names_ref_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        loss_of([0.0], [0.0], [1.0], kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        ref.policy_loss_from_logprobs(t64([0.0]), None, t64([0.0]), t64([1.0]), entropy_mode="exact")


# ---------------------------------------------------------------------------------------------
# Gradients and masking


def random_policy_case(seed, batch=2, length=4):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(batch, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    entropy = (torch.rand(batch, length, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref_lp = logp.detach() + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length)
    mask[1, -1] = 0
    return logp, entropy, old, ref_lp, adv, mask


SMOOTH_CONFIG = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.05, entropy_mode="exact")


@pytest.mark.parametrize(
    "loss_type,extra",
    [("clip", {"dual_clip": 3.0, "delta": 2.0}), ("clip", {}), ("gspo", {}), ("sapo", {})],
)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_gradcheck(loss_type, extra, loss_agg):
    # losses without stop-gradients: the analytic gradient is the numerical one
    logp, entropy, old, ref_lp, adv, mask = random_policy_case(1)

    def fn(lp, h):
        loss, _ = ref.policy_loss_from_logprobs(
            lp, h, old, adv, mask, ref_logprobs=ref_lp, loss_type=loss_type, loss_agg=loss_agg,
            **SMOOTH_CONFIG, **extra,
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(fn, (logp, entropy))


def test_cispo_gradient_is_the_clipped_weight():
    # d/dlogp_t of token-mean(-sg(clip(r)) A logp) = -clip(r_t) A_t m_t / sum(m)
    logp, _, old, _, adv, mask = random_policy_case(2)
    loss, _ = ref.policy_loss_from_logprobs(logp, None, old, adv, mask, loss_type="cispo", entropy_mode="sampled")
    (grad,) = torch.autograd.grad(loss, logp)
    weight = torch.exp(logp.detach() - old).clamp(0.8, 1.2)
    torch.testing.assert_close(grad, -weight * adv * mask / mask.sum(), rtol=1e-12, atol=1e-14)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), cfg=policy_configs(loss_types=("gspo",), with_entropy=False))
def test_gspo_token_equals_gspo_for_sequence_advantages(seed, cfg):
    # GSPO paper: with one advantage per sequence the token variant has the same value and gradient
    logp, _, old, ref_lp, _, mask = random_policy_case(seed, batch=3, length=5)
    adv = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = []
    for loss_type in ("gspo", "gspo_token"):
        loss, _ = ref.policy_loss_from_logprobs(
            logp, None, old, adv, mask, ref_logprobs=ref_lp, config=cfg, loss_type=loss_type, entropy_mode="sampled"
        )
        results.append((loss, *torch.autograd.grad(loss, logp)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_empty_mask_gives_zero_loss_and_zero_grads(loss_type, loss_agg):
    logp, entropy, old, ref_lp, adv, mask = random_policy_case(3)
    old = torch.full_like(old, -1e4)  # padding garbage: exp(logp - old) would overflow if it were used
    loss, metrics = ref.policy_loss_from_logprobs(
        logp, entropy, old, adv, torch.zeros_like(mask), ref_logprobs=ref_lp - 1e4, loss_type=loss_type,
        loss_agg=loss_agg, **SMOOTH_CONFIG,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, (logp, entropy))
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)
    assert all(value.item() == 0.0 for value in metrics.values())


@settings(max_examples=25)
@given(inputs=policy_inputs(max_batch=3, max_len=6, max_vocab=40), cfg=policy_configs())
def test_policy_loss_is_finite_and_ignores_masked_tokens(inputs, cfg):
    logits = inputs.pop("logits").double().requires_grad_()
    loss, logp, entropy, metrics = ref.policy_loss(logits, config=cfg, **inputs)
    (grad,) = torch.autograd.grad(loss, logits)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in metrics.values())
    assert bool((grad[~inputs["mask"]] == 0).all())


def test_policy_loss_shapes_and_ignore_index():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) - 2.0
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    cfg = dict(loss_agg="seq-mean-token-mean", loss_type="gspo")
    base, *_ = ref.policy_loss(logits, targets, old, adv, **cfg)
    # per-sequence advantages [B] broadcast over T
    expanded, *_ = ref.policy_loss(logits, targets, old, adv[:, None].expand(2, 5), **cfg)
    assert expanded.item() == pytest.approx(base.item(), abs=1e-14)
    # a 1-D leading shape is one sequence
    one, *_ = ref.policy_loss(logits[0], targets[0], old[0], adv[0].expand(5), **cfg)
    batch_of_one, *_ = ref.policy_loss(logits[:1], targets[:1], old[:1], adv[:1], **cfg)
    assert one.item() == pytest.approx(batch_of_one.item(), abs=1e-14)
    # ignore_index targets count as masked
    ignored = targets.clone()
    ignored[0, 3:] = -100
    mask = ignored != -100
    with_ignore, logp, _, _ = ref.policy_loss(logits, ignored, old, adv, **cfg)
    with_mask, *_ = ref.policy_loss(logits, targets, old, adv, mask, **cfg)
    assert with_ignore.item() == pytest.approx(with_mask.item(), abs=1e-14)
    assert bool((logp[0, 3:] == 0).all())


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
