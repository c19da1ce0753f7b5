"""The O(N) loss algebra of ``fastrl_kernels.losses`` called directly: KL estimators, aggregation, the
per-token policy terms and ``policy_loss_from_logprobs``, against the float64 reference and hand values.

Covers what the fused ops never exercise because they validate and cast first: default arguments,
the errors of the low-level functions, inputs of mixed dtypes (the loss is computed in logp's dtype),
float64 log-probs, a changed default dtype / device, and ratios or advantages exactly on the edges of
the clip-fraction metrics.
"""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import KL_ESTIMATORS, POLICY_LOSS_TYPES, PolicyLossConfig
from fastrl_kernels.losses.aggregation import aggregate, aggregation_weights
from fastrl_kernels.losses.kl import kl_penalty
from fastrl_kernels.losses.policy import (
    SEPARABLE_POLICY_LOSS_TYPES,
    per_token_policy_loss,
    policy_loss_from_logprobs,
    separable_policy_terms,
)
from fastrl_kernels.testing import assert_close_to_reference

# Every term on (policy, KL, entropy bonus), asymmetric clip range.
RICH = PolicyLossConfig(clip_eps_low=0.1, clip_eps_high=0.3, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.05)
METRIC_NAMES = {"clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_mean", "entropy_mean", "approx_kl"}


def _case(seed, batch=3, length=7, dtype=torch.float32):
    """Per-token inputs ``[B, T]`` in ``dtype``: logp in (-4, 0), old / ref = logp + noise, mixed-sign
    advantages, a float32 {0, 1} mask with a right-padded last sequence."""
    g = torch.Generator().manual_seed(seed)
    logp = -4.0 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    entropy = 3.0 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, length, generator=g, dtype=torch.float64)
    is_weights = 2.0 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    mask = (torch.rand(batch, length, generator=g) < 0.85).float()
    mask[0, 0] = 1.0
    mask[-1, length // 2:] = 0.0
    tensors = dict(logp=logp, entropy=entropy, old_logprobs=old, advantages=advantages, ref_logprobs=ref,
                   is_weights=is_weights)
    return {k: v.to(dtype) for k, v in tensors.items()} | {"mask": mask}


def _reference(case, config, **extra):
    """The float64 reference on the same values (``case`` already rounded to the dtype under test)."""
    return reference.policy_loss_from_logprobs(
        case["logp"].double(), case["entropy"].double(), case["old_logprobs"].double(), case["advantages"].double(),
        case["mask"], ref_logprobs=case["ref_logprobs"].double(),
        is_weights=None if extra.get("is_weights") is None else extra["is_weights"].double(),
        normalizer=extra.get("normalizer"), config=config,
    )


def _call(case, config, *, old=None, adv=None, ref=None, is_weights=None, mask=None):
    return policy_loss_from_logprobs(
        case["logp"], case["entropy"], case["old_logprobs"] if old is None else old,
        case["advantages"] if adv is None else adv, case["mask"] if mask is None else mask,
        case["ref_logprobs"] if ref is None else ref, is_weights, None, config,
    )


def _assert_matches_reference(loss, metrics, want, want_metrics, dtype, name):
    assert loss.dim() == 0
    assert_close_to_reference(loss, want, dtype=dtype, name=f"{name} loss")
    assert set(metrics) == METRIC_NAMES == set(want_metrics)
    for key, value in want_metrics.items():
        assert_close_to_reference(metrics[key], value, dtype=dtype, name=f"{name} metric {key}")


# ---------------------------------------------------------------------------------------------
# kl_penalty


def test_kl_penalty_default_estimator_is_k3():
    """Without ``estimator`` the KL is k3 = e^k - k - 1 (k = ref - logp), TRL's GRPO KL: the reference's k3."""
    g = torch.Generator().manual_seed(0)
    logp = -3.0 * torch.rand(11, generator=g, dtype=torch.float64)
    ref_lp = logp + torch.randn(11, generator=g, dtype=torch.float64)
    got = kl_penalty(logp, ref_lp)
    torch.testing.assert_close(got, kl_penalty(logp, ref_lp, "k3"), rtol=0, atol=0)
    k = ref_lp - logp
    torch.testing.assert_close(got, torch.exp(k) - k - 1.0, rtol=1e-12, atol=1e-14)
    assert_close_to_reference(got, reference.kl_penalty(logp, ref_lp, "k3"), dtype=torch.float64, name="kl k3")


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_penalty_values_and_gradients_match_reference(estimator):
    g = torch.Generator().manual_seed(1)
    logp = (-3.0 * torch.rand(13, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref_lp = logp.detach() + torch.randn(13, generator=g, dtype=torch.float64)
    logp64 = logp.detach().clone().requires_grad_(True)
    got = kl_penalty(logp, ref_lp, estimator, 0.8)
    want = reference.kl_penalty(logp64, ref_lp, estimator, 0.8)
    assert got.dtype == torch.float64 and got.shape == logp.shape
    assert_close_to_reference(got, want, dtype=torch.float64, name=f"kl {estimator}")
    got.sum().backward()
    want.sum().backward()
    assert_close_to_reference(logp.grad, logp64.grad, dtype=torch.float64, kind="grad", name=f"kl {estimator} grad")


@pytest.mark.parametrize("estimator", ("k4", "K3", "k3X", "kl", "abs-", ""))
def test_kl_penalty_unknown_estimator_names_kl_estimator(estimator):
    with pytest.raises(ValueError, match=rf"^kl_estimator: unknown estimator {re.escape(repr(estimator))}$"):
        kl_penalty(torch.zeros(3), torch.zeros(3), estimator)


# ---------------------------------------------------------------------------------------------
# aggregation


@pytest.mark.parametrize("mode", ("mean", "grpo", "Token-Mean", ""))
def test_aggregation_unknown_mode_names_loss_agg(mode):
    """Canonical names only at this level (config.py maps TRL's names): anything else is refused."""
    mask = torch.ones(2, 3)
    pattern = rf"^loss_agg: unknown mode {re.escape(repr(mode))}$"
    with pytest.raises(ValueError, match=pattern):
        aggregation_weights(mask, mode)
    with pytest.raises(ValueError, match=pattern):
        aggregate(torch.ones(2, 3), mask, mode)


# ---------------------------------------------------------------------------------------------
# Errors of the per-token functions


def test_per_token_policy_loss_refuses_an_unknown_loss_type_naming_it():
    """A config that skipped PolicyLossConfig's validation (a namespace with its fields) still cannot
    select a formula that does not exist."""
    config = SimpleNamespace(**{**dataclasses.asdict(PolicyLossConfig()), "loss_type": "ppo2"})
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^loss_type: unknown policy loss 'ppo2'$"):
        per_token_policy_loss(x, x.exp(), x, config)


@pytest.mark.parametrize("loss_type", sorted(set(POLICY_LOSS_TYPES) - set(SEPARABLE_POLICY_LOSS_TYPES)))
def test_separable_terms_refuse_sequence_level_loss_types(loss_type):
    x = torch.zeros(4)
    pattern = (rf"^loss_type: separable terms exist for {re.escape(str(SEPARABLE_POLICY_LOSS_TYPES))} only, "
               rf"got '{loss_type}'$")
    with pytest.raises(ValueError, match=pattern):
        separable_policy_terms(x, x, x, x, None, None, torch.ones(4), None, PolicyLossConfig(loss_type=loss_type))


def test_separable_terms_need_entropy_weights_with_an_entropy_bonus():
    x = torch.zeros(4)
    config = PolicyLossConfig(entropy_coef=0.01)
    with pytest.raises(ValueError, match=r"^entropy_weights: required when entropy_coef != 0, got None$"):
        separable_policy_terms(x, x, x, x, None, None, torch.ones(4), None, config)
    # without the bonus, no entropy weights are needed
    terms = separable_policy_terms(x, x, x, x, None, None, torch.ones(4), None, PolicyLossConfig())
    assert terms.shape == (4,)


def test_from_logprobs_kl_coef_without_ref_logprobs_names_ref_logprobs():
    case = _case(2)
    with pytest.raises(ValueError, match=r"^ref_logprobs: required when kl_coef != 0 \(got None\)$"):
        policy_loss_from_logprobs(case["logp"], case["entropy"], case["old_logprobs"], case["advantages"],
                                  case["mask"], None, None, None, PolicyLossConfig(kl_coef=0.1))


# ---------------------------------------------------------------------------------------------
# Defaults


def test_from_logprobs_without_config_uses_the_default_config():
    """config=None is PolicyLossConfig(): clip 0.2 / 0.2, no KL term, no entropy bonus, token-mean."""
    case = _case(3)
    loss, metrics = fk.policy_loss_from_logprobs(case["logp"], case["entropy"], case["old_logprobs"],
                                                 case["advantages"], case["mask"])
    explicit, explicit_metrics = fk.policy_loss_from_logprobs(
        case["logp"], case["entropy"], case["old_logprobs"], case["advantages"], case["mask"],
        config=PolicyLossConfig())
    torch.testing.assert_close(loss, explicit, rtol=0, atol=0)
    assert set(metrics) == set(explicit_metrics)
    for key in metrics:
        torch.testing.assert_close(metrics[key], explicit_metrics[key], rtol=0, atol=0)
    want, want_metrics = reference.policy_loss_from_logprobs(
        case["logp"].double(), case["entropy"].double(), case["old_logprobs"].double(),
        case["advantages"].double(), case["mask"])
    _assert_matches_reference(loss, metrics, want, want_metrics, torch.float32, "default config")
    assert float(metrics["kl_mean"]) == 0.0


# ---------------------------------------------------------------------------------------------
# dtypes: the loss is computed in logp's dtype


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_from_logprobs_computes_in_logp_dtype_whatever_the_dtype_of_the_other_inputs(loss_type):
    """float64 old / ref log-probs, advantages and is_weights with float32 logp: they are rounded to
    float32, the loss and every metric are float32 and equal the reference on the rounded values."""
    case = _case(4)
    wide = _case(4, dtype=torch.float64)
    config = dataclasses.replace(RICH, loss_type=loss_type)
    loss, metrics = _call(case, config, old=wide["old_logprobs"], adv=wide["advantages"], ref=wide["ref_logprobs"],
                          is_weights=wide["is_weights"])
    assert loss.dtype == torch.float32
    assert {key: value.dtype for key, value in metrics.items()} == dict.fromkeys(METRIC_NAMES, torch.float32)
    want, want_metrics = _reference(case, config, is_weights=case["is_weights"])
    _assert_matches_reference(loss, metrics, want, want_metrics, torch.float32, loss_type)


@pytest.mark.parametrize("loss_type", SEPARABLE_POLICY_LOSS_TYPES)
def test_separable_terms_are_in_logp_dtype_and_add_up_to_the_reference_loss(loss_type):
    """c_t from float32 logp with float64 old / ref / advantages / is_weights: float32 terms whose sum is
    the reference loss (token-mean weights, entropy bonus with its own seq-mean-token-mean weights)."""
    case = _case(5)
    wide = _case(5, dtype=torch.float64)
    config = dataclasses.replace(RICH, loss_type=loss_type, entropy_agg="seq-mean-token-mean")
    weights = aggregation_weights(case["mask"], config.loss_agg)
    entropy_weights = aggregation_weights(case["mask"], config.resolved_entropy_agg)
    assert weights.dtype == entropy_weights.dtype == torch.float32
    # masked tokens have weight 0 in both weight vectors, so their (finite) terms add nothing
    terms = separable_policy_terms(case["logp"], case["entropy"], wide["old_logprobs"], wide["advantages"],
                                   wide["ref_logprobs"], wide["is_weights"], weights, entropy_weights, config)
    assert terms.dtype == torch.float32 and terms.shape == case["logp"].shape
    want, _ = _reference(case, config, is_weights=case["is_weights"])
    assert_close_to_reference(terms.sum(), want, dtype=torch.float32, name=f"{loss_type} sum of terms")


@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_float64_logprobs_give_float64_loss_and_metrics(loss_type):
    """float64 log-probs (with the float32 {0, 1} mask policy_loss builds): loss and every metric are
    float64 and match the reference to float64 precision (every constant, sapo's temperatures too, taken
    in float64), with and without a reference policy."""
    case = _case(6, dtype=torch.float64)
    for with_ref in (True, False):
        config = dataclasses.replace(RICH, loss_type=loss_type, kl_coef=RICH.kl_coef if with_ref else 0.0)
        ref = case["ref_logprobs"] if with_ref else None
        loss, metrics = policy_loss_from_logprobs(case["logp"], case["entropy"], case["old_logprobs"],
                                                  case["advantages"], case["mask"], ref, None, None, config)
        assert loss.dtype == torch.float64
        assert {key: value.dtype for key, value in metrics.items()} == dict.fromkeys(METRIC_NAMES, torch.float64)
        want, want_metrics = reference.policy_loss_from_logprobs(
            case["logp"], case["entropy"], case["old_logprobs"], case["advantages"], case["mask"],
            ref_logprobs=ref, config=config)
        for key in want_metrics:
            torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)




def _results(case, config, with_ref):
    logp = case["logp"].clone().requires_grad_(True)
    entropy = case["entropy"].clone().requires_grad_(True)
    loss, metrics = policy_loss_from_logprobs(logp, entropy, case["old_logprobs"], case["advantages"], case["mask"],
                                              case["ref_logprobs"] if with_ref else None, None, None, config)
    loss.backward()
    return loss, metrics, logp.grad


def _configs():
    return [(dataclasses.replace(RICH, loss_type=t), True) for t in POLICY_LOSS_TYPES] + [
        (dataclasses.replace(RICH, loss_type=t, kl_coef=0.0), False) for t in POLICY_LOSS_TYPES]


def _assert_same_results(got, expected):
    (loss, metrics, grad), (loss0, metrics0, grad0) = got, expected
    for a, b in [(loss, loss0), (grad, grad0)] + [(metrics[k], metrics0[k]) for k in metrics0]:
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(metrics) == set(metrics0)


@pytest.mark.parametrize("default", ["float64_default", "meta_default_device"])
@pytest.mark.parametrize("config, with_ref", _configs(), ids=[f"{c.loss_type}-{'ref' if r else 'noref'}"
                                                               for c, r in _configs()])
def test_from_logprobs_ignores_the_default_dtype_and_device(config, with_ref, default, request):
    """float32 CPU inputs under torch.set_default_dtype(float64) or another default device: the same float32
    loss, metrics and gradient, every result on the inputs' device."""
    case = _case(7)
    expected = _results(case, config, with_ref)
    request.getfixturevalue(default)
    _assert_same_results(_results(case, config, with_ref), expected)


# ---------------------------------------------------------------------------------------------
# Clip fractions on their edges


def test_ratio_exactly_one_with_a_zero_clip_range_is_not_clipped():
    """clip_eps_low = clip_eps_high = 0 and logp == old (the first on-policy step): every ratio is
    exactly 1, neither below 1 - 0 nor above 1 + 0, so both clip fractions are 0 for either sign of A."""
    case = _case(9)
    config = PolicyLossConfig(clip_eps_low=0.0, clip_eps_high=0.0)
    adv = torch.tensor([[1.0, -1.0, 2.0, -0.5, 1.0, -1.0, 3.0]]).expand(3, 7)
    loss, metrics = _call(case, config, old=case["logp"].clone(), adv=adv)
    assert float(metrics["clip_frac_low"]) == 0.0 and float(metrics["clip_frac_high"]) == 0.0
    assert float(metrics["ratio_mean"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    # with r = 1 the clip loss is -A per token: token-mean of -A over the mask
    want = -(adv * case["mask"]).sum() / case["mask"].sum()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    _, want_metrics = reference.policy_loss_from_logprobs(case["logp"].double(), None, case["logp"].double(),
                                                          adv.double(), case["mask"], config=config,
                                                          entropy_mode="sampled")
    assert float(want_metrics["clip_frac_low"]) == 0.0 and float(want_metrics["clip_frac_high"]) == 0.0


def test_tokens_with_zero_advantage_never_count_as_clipped():
    """GRPO groups with equal rewards give A = 0: such tokens are not clipped whatever their ratio.

    One sequence of 6 tokens, eps 0.2: ratios 2, 0.5 with A = 0 (not counted), 2 with A > 0 (high),
    0.5 with A < 0 (low), 2 with A < 0 and 0.5 with A > 0 (neither): 1/6 low, 1/6 high.
    """
    ratios = torch.tensor([[2.0, 0.5, 2.0, 0.5, 2.0, 0.5]])
    adv = torch.tensor([[0.0, 0.0, 1.0, -1.0, -1.0, 1.0]])
    logp = torch.full((1, 6), -1.5)
    old = logp - ratios.log()
    mask = torch.ones(1, 6)
    config = PolicyLossConfig()
    loss, metrics = policy_loss_from_logprobs(logp, None, old, adv, mask, None, None, None,
                                              dataclasses.replace(config, entropy_mode="sampled"))
    torch.testing.assert_close(metrics["clip_frac_low"], torch.tensor(1 / 6), rtol=0, atol=1e-7)
    torch.testing.assert_close(metrics["clip_frac_high"], torch.tensor(1 / 6), rtol=0, atol=1e-7)
    # per token max(-A r, -A clip(r, 0.8, 1.2)): 0, 0, -1.2, 0.8, 2, -0.5 -> mean 1.1 / 6
    torch.testing.assert_close(loss, torch.tensor(1.1 / 6), rtol=1e-6, atol=1e-7)
    _, want_metrics = reference.policy_loss_from_logprobs(logp.double(), None, old.double(), adv.double(), mask,
                                                          config=config, entropy_mode="sampled")
    for key in ("clip_frac_low", "clip_frac_high"):
        assert_close_to_reference(metrics[key], want_metrics[key], dtype=torch.float32, name=key)
