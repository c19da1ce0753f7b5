"""policy_loss against the float64 reference on every CPU fused backend: each option name on a
deterministic case with every term active, and the clip fractions.

The cases, the reference run and the comparison with its tolerances (``_case``, ``_reference``, ``_compare``,
``_term_scales``, ``_loss_scale``, ``_clip_frac_bounds``) serve the other ``tests/test_policy_loss_*.py`` files.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import (
    ENTROPY_MODES,
    KL_ESTIMATORS,
    LOSS_AGG_ALIASES,
    LOSS_AGG_MODES,
    POLICY_LOSS_TYPES,
    PolicyLossConfig,
)
from fastrl_kernels.testing import assert_close_to_reference, coefficient_scale, tolerances
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()
AGG_NAMES = LOSS_AGG_MODES + tuple(LOSS_AGG_ALIASES)
CLIP_FAMILY = ("clip", "gspo", "gspo_token")
# Every term on, asymmetric clip range: the base of the deterministic cases.
RICH = PolicyLossConfig(clip_eps_low=0.1, clip_eps_high=0.3, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.05)
# A ratio within this relative distance of a clip boundary may round to either side in float32.
RATIO_MARGIN = 1e-4


def _case(seed, batch=3, length=8, vocab=37, *, old_noise=0.5, per_sequence=False, dtype=torch.float32,
          std=2.0, temperature=1.0, logit_scale=1.0, softcap=None, padded=True):
    """Deterministic ``policy_loss`` inputs: N(0, std^2) logits, one ignored target, a few masked tokens
    and (``padded``) a right-padded last sequence; old / ref = logp + N(0, old_noise^2) / N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    logits = (std * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (batch, length), generator=g)
    targets[0, length - 1] = -100
    logp, _ = reference.token_logprobs(logits, targets, temperature=temperature, logit_scale=logit_scale,
                                       softcap=softcap)
    old = (logp + old_noise * torch.randn(batch, length, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)).float()
    advantages = torch.randn((batch,) if per_sequence else (batch, length), generator=g)
    mask = torch.rand(batch, length, generator=g) < 0.85
    if padded:
        mask[-1, length // 2:] = False
    return dict(logits=logits, targets=targets, old_logprobs=old, advantages=advantages, mask=mask,
                ref_logprobs=ref)


def _run(backend, inputs, config, **extra):
    logits = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(
        logits, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend, **extra,
    )
    out.loss.backward()
    return out, logits.grad


def _reference(inputs, config, **extra):
    logits = inputs["logits"].detach().to(torch.float64).requires_grad_(True)
    loss, logp, entropy, metrics = reference.policy_loss(
        logits, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        ref_logprobs=inputs["ref_logprobs"], config=config, **extra,
    )
    loss.backward()
    scale = _term_scales(logp, entropy, inputs["old_logprobs"], inputs["advantages"], _policy_mask(inputs),
                         inputs["ref_logprobs"], config, normalizer=extra.get("normalizer"),
                         is_weights=extra.get("is_weights"))
    loss_scale = _loss_scale(logp, entropy, inputs["old_logprobs"], inputs["advantages"], _policy_mask(inputs),
                             inputs["ref_logprobs"], config, normalizer=extra.get("normalizer"),
                             is_weights=extra.get("is_weights"))
    return SimpleNamespace(loss=loss.detach(), logp=logp.detach(), entropy=entropy.detach(), metrics=metrics,
                           grad=logits.grad, scale=scale, loss_scale=loss_scale)


def _term_scales(logp, entropy, old_logprobs, advantages, mask, ref_logprobs, config, **extra):
    """Sum over the loss's three terms (policy, KL, entropy bonus) of each one's |dL/dlogp| + |dL/dH|
    per token: the size of what float32 algebra adds up, even where the terms cancel (asserts.py)."""
    zero_adv = torch.zeros_like(advantages)
    scale = 0.0
    for adv, kl_coef, entropy_coef in ((advantages, 0.0, 0.0), (zero_adv, config.kl_coef, 0.0),
                                       (zero_adv, 0.0, config.entropy_coef)):
        term = dataclasses.replace(config, kl_coef=kl_coef, entropy_coef=entropy_coef)
        lp = logp.detach().to(torch.float64).requires_grad_(True)
        h = entropy.detach().to(torch.float64).requires_grad_(True)
        loss, _ = reference.policy_loss_from_logprobs(lp, h, old_logprobs, adv, mask, ref_logprobs=ref_logprobs,
                                                      config=term, **extra)
        scale = scale + coefficient_scale(loss, lp, h)
    return scale


def _loss_scale(logp, entropy, old_logprobs, advantages, mask, ref_logprobs, config, normalizer=None,
                is_weights=None):
    """The loss aggregated over |terms|: sum_t w_t (|l_t| + kl_coef |kl_t|) + entropy_coef sum_t w'_t |H_t|.

    A float32 loss is exact to ~1e-7 of this, not of its own value where the terms cancel (mixed-sign
    advantages). |l_t| comes from the reference with is_weights = sign(l_t): sign(l_t) = -sign(A_t),
    or +sign(A_t) for cispo and gpg (l = -c A logp, -A logp with logp <= 0).
    """
    logp = logp.detach().to(torch.float64)
    adv = advantages.to(torch.float64)
    if adv.dim() == 1 and logp.dim() == 2:
        adv = adv[:, None]
    signs = (adv.sign() if config.loss_type in ("cispo", "gpg") else -adv.sign()).expand_as(logp)
    weights = signs if is_weights is None else signs * is_weights.to(torch.float64).abs()
    quiet = dataclasses.replace(config, kl_coef=0.0, entropy_coef=0.0)
    policy, _ = reference.policy_loss_from_logprobs(logp, entropy, old_logprobs, advantages, mask,
                                                    normalizer=normalizer, is_weights=weights, config=quiet)
    scale = policy.abs()
    m = mask.to(torch.float64)
    if ref_logprobs is not None and config.kl_coef != 0.0:
        ref = torch.where(m > 0, ref_logprobs.to(torch.float64), logp)
        kl = reference.kl_penalty(logp, ref, config.kl_estimator, config.kl_clamp, config.kl_value_cap)
        scale = scale + abs(config.kl_coef) * reference.aggregate(kl.abs(), m, config.resolved_kl_agg, normalizer).abs()
    if config.entropy_coef != 0.0:
        h = entropy.detach().to(torch.float64) if config.entropy_mode == "exact" else -logp
        bonus = reference.aggregate(h.abs(), m, config.resolved_entropy_agg, normalizer)
        scale = scale + abs(config.entropy_coef) * bonus.abs()
    return scale


def _assert_loss_close(actual, expected, scale, *, dtype, name):
    """assert_close_to_reference's forward bound rtol |e| + atol with |e| raised to ``scale`` (_loss_scale)."""
    tol = tolerances(dtype, "forward")
    actual, expected = float(actual.detach()), float(expected.detach())
    error = abs(actual - expected)
    allowed = tol["rtol"] * max(abs(expected), float(scale)) + tol["atol"]
    assert error <= allowed, (f"{name}: got {actual:.9g}, expected {expected:.9g}, |error| {error:.3g} > "
                              f"allowed {allowed:.3g} (term scale {float(scale):.3g})")


def _clip_frac_bounds(logp, old, advantages, mask, config):
    """The range of clip fractions a correct float32 computation can report for float64 ``logp [B, T]``
    (or ``[N]``): tokens whose ratio lies within RATIO_MARGIN of a boundary may count or not, the
    others must. The range is a single value when no ratio is that close to a boundary."""
    logp = logp.detach().to(torch.float64)
    if logp.dim() == 1:
        logp, old, mask, advantages = logp[None], old[None], mask[None], advantages[None]
    m = mask.to(torch.float64)
    adv = advantages.to(torch.float64)
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    log_ratio = torch.where(m > 0, logp - old.to(torch.float64), torch.zeros_like(logp))
    if config.loss_type in ("gspo", "gspo_token"):
        per_sequence = (m * log_ratio).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        log_ratio = per_sequence.expand_as(logp)
    r = log_ratio.exp()
    low, high = 1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high

    def fraction(flags):
        return float((m * flags).sum() / m.sum().clamp(min=1.0))

    return {
        "clip_frac_low": (fraction((r < low * (1 - RATIO_MARGIN)) & (adv < 0)),
                          fraction((r < low * (1 + RATIO_MARGIN)) & (adv < 0))),
        "clip_frac_high": (fraction((r > high * (1 + RATIO_MARGIN)) & (adv > 0)),
                           fraction((r > high * (1 - RATIO_MARGIN)) & (adv > 0))),
    }


def _assert_clip_fracs(metrics, bounds, name=""):
    for key, (lowest, highest) in bounds.items():
        value = float(metrics[key])
        assert lowest - 1e-6 <= value <= highest + 1e-6, f"{name} {key}: {value} outside [{lowest}, {highest}]"


def _policy_mask(inputs):
    return inputs["mask"].to(torch.float64) * (inputs["targets"] != -100)


def _compare(backend, inputs, config, expected=None, **extra):
    """policy_loss on ``backend``: loss, logprobs, entropy, every metric and the logits gradient vs the reference."""
    dtype = inputs["logits"].dtype
    expected = expected if expected is not None else _reference(inputs, config, **extra)
    out, grad = _run(backend, inputs, config, **extra)
    name = f"{backend} {config.loss_type}"
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    _assert_loss_close(out.loss, expected.loss, expected.loss_scale, dtype=dtype, name=f"{name} loss")
    assert_close_to_reference(out.logprobs, expected.logp, dtype=dtype, name=f"{name} logprobs")
    assert_close_to_reference(out.entropy, expected.entropy, dtype=dtype, name=f"{name} entropy")
    assert set(out.metrics) == set(expected.metrics)
    bounds = _clip_frac_bounds(expected.logp, inputs["old_logprobs"], inputs["advantages"], _policy_mask(inputs),
                               config)
    _assert_clip_fracs(out.metrics, bounds, name)
    _assert_clip_fracs(expected.metrics, bounds, f"reference {name}")
    for key, value in expected.metrics.items():
        if key not in bounds:
            assert_close_to_reference(out.metrics[key], value, dtype=dtype, name=f"{name} metric {key}")
    assert_close_to_reference(grad, expected.grad, dtype=dtype, kind="grad", name=f"{name} grad",
                              row_scale=expected.scale)
    return out


def _differs(a, b):
    return not torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                              rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every option name, each on a deterministic case with every term active.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", (False, True), ids=("token_adv", "sequence_adv"))
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_each_loss_type_matches_reference(backend, loss_type, per_sequence):
    _compare(backend, _case(1, per_sequence=per_sequence), dataclasses.replace(RICH, loss_type=loss_type))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_clamp", (None, 0.5))
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_each_kl_estimator_matches_reference(backend, kl_estimator, kl_clamp):
    config = dataclasses.replace(RICH, kl_estimator=kl_estimator, kl_clamp=kl_clamp, kl_coef=0.5)
    _compare(backend, _case(2), config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ("clip", "gspo"))
@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_each_entropy_mode_matches_reference(backend, entropy_mode, loss_type):
    # a large bonus: a wrong entropy gradient (sign, scale) dominates the row
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode, entropy_coef=0.5, loss_type=loss_type)
    _compare(backend, _case(3), config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_NAMES)
def test_each_aggregation_matches_reference(backend, loss_agg):
    _compare(backend, _case(4), dataclasses.replace(RICH, loss_agg=loss_agg))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_agg", AGG_NAMES)
def test_each_entropy_aggregation_matches_reference(backend, entropy_agg):
    config = dataclasses.replace(RICH, loss_agg="seq-mean-token-mean", entropy_agg=entropy_agg, entropy_coef=0.3)
    _compare(backend, _case(5), config)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ("dual_clip", "delta"))
@pytest.mark.parametrize("loss_type", CLIP_FAMILY)
def test_dual_clip_and_delta_match_reference(backend, loss_type, option):
    # Both act on negative advantages with a ratio above the cap; sequence 0 gets ratios ~e^1.5 and
    # negative advantages (for gspo the sequence ratio is what counts).
    inputs = _case(6, per_sequence=loss_type != "clip", old_noise=0.3)
    inputs["old_logprobs"][0] -= 1.5
    inputs["advantages"][0] = -inputs["advantages"][0].abs()
    config = dataclasses.replace(RICH, loss_type=loss_type, **{option: 2.0})
    expected = _reference(inputs, config)
    without = _reference(inputs, dataclasses.replace(config, **{option: None}))
    assert _differs(expected.loss, without.loss), f"the case does not reach the {option} cap"
    _compare(backend, inputs, config, expected)


# ---------------------------------------------------------------------------------------------
# Clip fractions.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_clip_fractions_hand_case(backend, loss_type):
    # ratios r and advantage signs chosen far from the boundaries 1 - 0.1 and 1 + 0.3:
    #   r    0.5  0.5  0.95  1.2  1.5  1.5  2.0  0.1(masked)
    #   A    -    +    -     +    +    -    +    -
    #   low  1    .    .     .    .    .    .    .      -> 1 of 7 unmasked tokens
    #   high .    .    .     .    1    .    1    .      -> 2 of 7 (1.2 is inside 1 + 0.3, not 1 + 0.1)
    # One token per sequence (T = 1) so that gspo's sequence ratio is the token ratio.
    ratios = torch.tensor([0.5, 0.5, 0.95, 1.2, 1.5, 1.5, 2.0, 0.1], dtype=torch.float64)
    signs = torch.tensor([-1.0, 1, -1, 1, 1, -1, 1, -1])
    g = torch.Generator().manual_seed(7)
    logits = 2.0 * torch.randn(8, 1, 11, generator=g)
    targets = torch.randint(0, 11, (8, 1), generator=g)
    logp, _ = reference.token_logprobs(logits, targets)
    old = (logp - ratios.log()[:, None]).float()
    advantages = signs * (0.5 + torch.rand(8, generator=g))
    mask = torch.tensor([True] * 7 + [False])[:, None]
    config = PolicyLossConfig(loss_type=loss_type, clip_eps_low=0.1, clip_eps_high=0.3)
    out = fk.policy_loss(logits, targets, old, advantages, mask, config=config, backend=backend)
    _, _, _, metrics = reference.policy_loss(logits.double(), targets, old, advantages, mask, config=config)
    for got in (out.metrics, metrics):
        assert float(got["clip_frac_low"]) == pytest.approx(1 / 7, abs=1e-6)
        assert float(got["clip_frac_high"]) == pytest.approx(2 / 7, abs=1e-6)


def test_clip_fraction_bounds_are_exact_away_from_the_boundary_and_widen_next_to_it():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    config = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    far = _clip_frac_bounds(logp, -torch.tensor([[math.log(1.5), math.log(0.5)]]), advantages, mask, config)
    assert far == {"clip_frac_low": (0.5, 0.5), "clip_frac_high": (0.5, 0.5)}
    near = _clip_frac_bounds(logp, -torch.tensor([[math.log(1.2), math.log(0.8)]]).double(), advantages, mask,
                             config)
    assert near == {"clip_frac_low": (0.0, 0.5), "clip_frac_high": (0.0, 0.5)}
