"""policy_loss and policy_loss_from_logprobs against the float64 reference, on every CPU fused backend."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
from fastrl_kernels.testing import (
    assert_close_to_reference,
    coefficient_scale,
    make_logits,
    masks,
    policy_configs,
    policy_inputs,
    seeds,
    tolerances,
)
from fastrl_kernels.torch_backend import rows_per_chunk
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples

BACKENDS = cpu_fused_backends()
AGG_NAMES = LOSS_AGG_MODES + tuple(LOSS_AGG_ALIASES)
CLIP_FAMILY = ("clip", "gspo", "gspo_token")
# Inputs of the main property tests: logits with spread (x - E far from 0 at most tokens, so the exact
# entropy's gradient is not ~0), V >= 2, at least one unmasked token, and ratios up to e^+-2 in some
# draws (past delta and dual clip). Degenerate inputs have their own deterministic tests below.
SPREAD = dict(kinds=("normal",), min_vocab=2, nonempty_mask=True, with_ignore=True, old_noise=(0.2, 1.0))
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
    or +sign(A_t) for cispo (l = -c A logp with logp <= 0).
    """
    logp = logp.detach().to(torch.float64)
    adv = advantages.to(torch.float64)
    if adv.dim() == 1 and logp.dim() == 2:
        adv = adv[:, None]
    signs = (adv.sign() if config.loss_type == "cispo" else -adv.sign()).expand_as(logp)
    weights = signs if is_weights is None else signs * is_weights.to(torch.float64).abs()
    quiet = dataclasses.replace(config, kl_coef=0.0, entropy_coef=0.0)
    policy, _ = reference.policy_loss_from_logprobs(logp, entropy, old_logprobs, advantages, mask,
                                                    normalizer=normalizer, is_weights=weights, config=quiet)
    scale = policy.abs()
    m = mask.to(torch.float64)
    if ref_logprobs is not None and config.kl_coef != 0.0:
        ref = torch.where(m > 0, ref_logprobs.to(torch.float64), logp)
        kl = reference.kl_penalty(logp, ref, config.kl_estimator, config.kl_clamp)
        scale = scale + abs(config.kl_coef) * reference.aggregate(kl.abs(), m, config.loss_agg, normalizer).abs()
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


# ---------------------------------------------------------------------------------------------
# Property tests: random options and inputs.


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(inputs=policy_inputs(**SPREAD), config=policy_configs())
def test_fp32_matches_reference_for_every_option(backend, inputs, config):
    expected = _reference(inputs, config)
    assume(bool(expected.grad.abs().max() > 0))  # e.g. every unmasked token clipped with no KL or bonus
    _compare(backend, inputs, config, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(inputs=policy_inputs(dtypes=(torch.bfloat16,), **SPREAD),
       config=policy_configs(loss_types=("clip", "cispo", "sapo")))
def test_bf16_logits_match_reference_on_rounded_inputs(backend, inputs, config):
    expected = _reference(inputs, config)
    assume(bool(expected.grad.abs().max() > 0))
    _compare(backend, inputs, config, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(inputs=policy_inputs(**SPREAD), config=policy_configs(),
       normalizer=st.sampled_from((None, 7.0, 0.5, 64))
       | st.floats(0.5, 100.0).map(lambda x: torch.tensor(x, dtype=torch.float32)))
def test_normalizer_and_is_weights(backend, inputs, config, normalizer):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(inputs["old_logprobs"].shape, generator=g) * 2
    _compare(backend, inputs, config, normalizer=normalizer, is_weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ("token-mean", "seq-mean-token-mean"))
@pytest.mark.parametrize("normalizer", (None, 7.0, torch.tensor(0.5)), ids=("none", "float", "tensor"))
def test_normalizer_and_is_weights_match_reference(backend, normalizer, loss_agg):
    inputs = _case(17)
    weights = 2.0 * torch.rand(inputs["old_logprobs"].shape, generator=torch.Generator().manual_seed(17))
    config = dataclasses.replace(RICH, loss_agg=loss_agg)
    expected = _reference(inputs, config, normalizer=normalizer, is_weights=weights)
    assert _differs(expected.loss, _reference(inputs, config, normalizer=normalizer).loss)
    _compare(backend, inputs, config, expected, normalizer=normalizer, is_weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", (1.0, 0.7))
@pytest.mark.parametrize("logit_scale, softcap", [(0.5, None), (2.0, None), (1.0, 3.0), (1.7, 4.0)])
def test_logit_scale_and_softcap_match_reference(backend, logit_scale, softcap, temperature):
    # std 3 logits under softcap 3-4: tanh is well off its linear range, so its derivative matters
    transform = dict(logit_scale=logit_scale, softcap=softcap)
    inputs = _case(8, std=3.0, temperature=temperature, **transform)
    config = dataclasses.replace(RICH, temperature=temperature)
    expected = _reference(inputs, config, **transform)
    assert _differs(expected.logp, _reference(inputs, config).logp)
    _compare(backend, inputs, config, expected, **transform)


# The torch backend works through the rows in chunks of 2^18 // V rows: these span several chunks
# (the last one partial) and one chunk per row.
CHUNKED_CASES = [
    pytest.param((2, 65, 4099), dict(), id="clip-3chunks"),
    pytest.param((2, 65, 4099), dict(loss_type="gspo", temperature=0.7), id="gspo-3chunks"),
    pytest.param((2, 65, 4099), dict(loss_type="sapo", softcap=6.0, logit_scale=1.3), id="sapo-softcap-3chunks"),
    pytest.param((2, 2, 2**18 + 3), dict(loss_type="cispo"), id="cispo-row-per-chunk"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, options", CHUNKED_CASES)
def test_several_chunks_match_reference(backend, shape, options):
    batch, length, vocab = shape
    assert rows_per_chunk(batch * length, vocab) < batch * length
    transform = {k: options.pop(k) for k in ("softcap", "logit_scale") if k in options}
    config = dataclasses.replace(RICH, **options)
    # no padding: every chunk, the last one included, holds unmasked tokens
    inputs = _case(9, batch, length, vocab, temperature=config.temperature, padded=False, **transform)
    rows = rows_per_chunk(batch * length, vocab)
    assert bool(_policy_mask(inputs).reshape(-1)[(batch * length - 1) // rows * rows:].any())
    _compare(backend, inputs, config, **transform)


# ---------------------------------------------------------------------------------------------
# inplace_grad, extra uses of the outputs, scaling.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_inplace_grad_matches_reference_and_overwrites_the_logits(backend, entropy_mode, dtype):
    inputs = _case(10, dtype=dtype)
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode, entropy_coef=0.3)
    expected = _reference(inputs, config)
    hidden = inputs["logits"].clone().requires_grad_(True)
    produced = hidden * 1.0  # a non-leaf whose storage the gradient may overwrite
    out = fk.policy_loss(produced, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend, inplace_grad=True)
    out.loss.backward()
    _assert_loss_close(out.loss, expected.loss, expected.loss_scale, dtype=dtype, name="inplace loss")
    assert_close_to_reference(hidden.grad, expected.grad, dtype=dtype, kind="grad", name="inplace grad",
                              row_scale=expected.scale)
    assert torch.equal(produced.detach(), hidden.grad)  # the logits now hold the gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace_grad", (False, True))
def test_returned_logprobs_can_feed_another_loss(backend, inplace_grad):
    # their gradients join the loss's before the logits gradient is written (in place or not)
    inputs = _case(11)
    config = dataclasses.replace(RICH, entropy_coef=0.0)
    z = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(z * 1.0, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend,
                         inplace_grad=inplace_grad)
    (out.loss + 0.3 * out.logprobs.sum() + 0.2 * out.entropy.sum()).backward()
    z64 = inputs["logits"].double().requires_grad_(True)
    loss, logp, entropy, _ = reference.policy_loss(z64, inputs["targets"], inputs["old_logprobs"],
                                                   inputs["advantages"], inputs["mask"],
                                                   ref_logprobs=inputs["ref_logprobs"], config=config)
    (loss + 0.3 * logp.sum() + 0.2 * entropy.sum()).backward()
    assert_close_to_reference(z.grad, z64.grad, dtype=torch.float32, kind="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_adds_the_reference_gradient_again(backend):
    inputs = _case(18)
    expected = _reference(inputs, RICH)
    z = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(z, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=RICH, backend=backend)
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    assert_close_to_reference(z.grad, 2.0 * expected.grad, dtype=torch.float32, kind="grad",
                              row_scale=2.0 * expected.scale)


def test_second_backward_after_inplace_grad_is_refused():
    # the first backward overwrote the logits the second one would read
    produced = torch.randn(4, 9, requires_grad=True) * 1.0
    out = fk.policy_loss(produced, torch.randint(0, 9, (4,)), torch.randn(4), torch.randn(4), backend="torch",
                         inplace_grad=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_loss_gives_the_scaled_reference_gradient(backend):
    inputs = _case(12)
    expected = _reference(inputs, RICH)
    z = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(z, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=RICH, backend=backend)
    (out.loss * 2.5).backward()
    assert_close_to_reference(z.grad, 2.5 * expected.grad, dtype=torch.float32, kind="grad",
                              row_scale=2.5 * expected.scale)


# ---------------------------------------------------------------------------------------------
# Degenerate inputs (kept out of the property tests).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_all_masked_gives_zero_loss_and_zero_grads(backend, loss_type):
    logits = torch.randn(2, 4, 33, requires_grad=True)
    targets = torch.randint(0, 33, (2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for agg in LOSS_AGG_MODES:
        out = fk.policy_loss(logits, targets, torch.randn(2, 4), torch.randn(2), mask, ref_logprobs=torch.randn(2, 4),
                             loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, backend=backend)
        out.loss.backward()
        assert out.loss == 0 and not torch.isnan(out.loss)
        assert (logits.grad == 0).all()
        assert all(float(v) == 0.0 for v in out.metrics.values()), out.metrics
        logits.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_vocabulary_of_one_gives_zero_logprobs_entropy_and_grads(backend, entropy_mode):
    # p = 1 for the only token: logp = H = 0, and neither depends on the logit
    inputs = _case(13, vocab=1)
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode)
    out = _compare(backend, inputs, config)
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("flat", "all_equal", "peaked", "all_negative", "huge"))
def test_degenerate_logits_match_reference(backend, kind):
    inputs = _case(14)
    inputs["logits"] = make_logits(kind, inputs["logits"].shape, seed=14)
    if kind == "huge":
        # a random target has logp ~ -1e4, which float32 holds to ~1e-3 only: the ratio exp(logp - old)
        # would be off by that much whatever the backend. The row's top token has logp ~ 0.
        top = inputs["logits"].argmax(dim=-1)
        inputs["targets"] = torch.where(inputs["targets"] == -100, inputs["targets"], top)
    logp, _ = reference.token_logprobs(inputs["logits"], inputs["targets"])
    g = torch.Generator().manual_seed(15)
    inputs["old_logprobs"] = (logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    inputs["ref_logprobs"] = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    _compare(backend, inputs, RICH)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_padding_garbage_in_masked_positions_is_ignored(backend, loss_type):
    # masked tokens may hold anything in old / ref log-probs (padding): ratio and KL there must not
    # reach the loss, the metrics or the gradient as inf * 0 = NaN
    inputs = _case(16)
    masked = ~inputs["mask"]
    inputs["old_logprobs"] = inputs["old_logprobs"].masked_fill(masked, -1e4)
    inputs["ref_logprobs"] = inputs["ref_logprobs"].masked_fill(masked, 1e4)
    _compare(backend, inputs, dataclasses.replace(RICH, loss_type=loss_type))


# ---------------------------------------------------------------------------------------------
# policy_loss_from_logprobs (the O(N) algebra on log-probs) against the reference's.


def _logprob_case(seed, batch=3, length=9, *, per_sequence=False, old_noise=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -4.0 * torch.rand(batch, length, generator=g)
    entropy = 3.0 * torch.rand(batch, length, generator=g)
    old = logp + old_noise * torch.randn(batch, length, generator=g)
    ref = logp + 0.3 * torch.randn(batch, length, generator=g)
    advantages = torch.randn((batch,) if per_sequence else (batch, length), generator=g)
    mask = (torch.rand(batch, length, generator=g) < 0.85).float()
    mask[-1, length // 2:] = 0.0
    return dict(logp=logp, entropy=entropy, old_logprobs=old, advantages=advantages, mask=mask, ref_logprobs=ref)


def _compare_from_logprobs(case, config, **extra):
    logp = case["logp"].clone().requires_grad_(True)
    entropy = case["entropy"].clone().requires_grad_(True)
    advantages = case["advantages"]
    loss, metrics = fk.policy_loss_from_logprobs(
        logp, entropy, case["old_logprobs"], advantages, case["mask"], case["ref_logprobs"],
        extra.get("is_weights"), extra.get("normalizer"), config,
    )
    loss.backward()
    logp64 = case["logp"].double().requires_grad_(True)
    entropy64 = case["entropy"].double().requires_grad_(True)
    want, want_metrics = reference.policy_loss_from_logprobs(
        logp64, entropy64, case["old_logprobs"], advantages, case["mask"], ref_logprobs=case["ref_logprobs"],
        config=config, **extra,
    )
    want.backward()
    name = f"policy_loss_from_logprobs {config.loss_type}"
    loss_scale = _loss_scale(logp64, entropy64, case["old_logprobs"], advantages, case["mask"], case["ref_logprobs"],
                             config, **extra)
    _assert_loss_close(loss, want, loss_scale, dtype=torch.float32, name=f"{name} loss")
    assert set(metrics) == set(want_metrics)
    bounds = _clip_frac_bounds(logp64, case["old_logprobs"], advantages, case["mask"], config)
    _assert_clip_fracs(metrics, bounds, name)
    _assert_clip_fracs(want_metrics, bounds, f"reference {name}")
    for key, value in want_metrics.items():
        if key not in bounds:
            assert_close_to_reference(metrics[key], value, dtype=torch.float32, name=f"{name} metric {key}")
    # rows of dL/dlogp are sequences: their scale is the largest term size in the sequence
    scale = _term_scales(case["logp"], case["entropy"], case["old_logprobs"], advantages, case["mask"],
                         case["ref_logprobs"], config, **extra).amax(dim=-1)
    for got, expected, what in ((logp.grad, logp64.grad, "logp"), (entropy.grad, entropy64.grad, "entropy")):
        assert (got is None) == (expected is None), f"{name} d/d{what}: {got} vs {expected}"
        if expected is not None:
            assert_close_to_reference(got, expected, dtype=torch.float32, kind="grad", name=f"{name} d/d{what}",
                                      row_scale=scale)
    return loss


@pytest.mark.parametrize("per_sequence", (False, True), ids=("token_adv", "sequence_adv"))
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_from_logprobs_each_loss_type_matches_reference(loss_type, per_sequence):
    _compare_from_logprobs(_logprob_case(20, per_sequence=per_sequence), dataclasses.replace(RICH, loss_type=loss_type))


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_from_logprobs_each_kl_estimator_matches_reference(kl_estimator):
    _compare_from_logprobs(_logprob_case(21), dataclasses.replace(RICH, kl_estimator=kl_estimator, kl_coef=0.5))


@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_from_logprobs_each_entropy_mode_matches_reference(entropy_mode):
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode, entropy_coef=0.5)
    _compare_from_logprobs(_logprob_case(22), config)


@pytest.mark.parametrize("loss_agg", AGG_NAMES)
def test_from_logprobs_each_aggregation_matches_reference(loss_agg):
    _compare_from_logprobs(_logprob_case(23), dataclasses.replace(RICH, loss_agg=loss_agg, entropy_agg="sum"))


@pytest.mark.parametrize("loss_type", CLIP_FAMILY)
def test_from_logprobs_dual_clip_matches_reference(loss_type):
    case = _logprob_case(24, per_sequence=True, old_noise=0.3)
    case["old_logprobs"][0] -= 1.5
    case["advantages"][0] = -case["advantages"][0].abs()
    config = dataclasses.replace(RICH, loss_type=loss_type, dual_clip=2.0)
    loss = _compare_from_logprobs(case, config)
    without = _compare_from_logprobs(case, dataclasses.replace(config, dual_clip=None))
    assert _differs(loss, without), "the case does not reach the dual clip"


def test_from_logprobs_per_sequence_advantages_of_shape_b_match_reference():
    # [B] advantages belong to sequences even when B == T (no broadcast along T)
    case = _logprob_case(25, batch=4, length=4, per_sequence=True)
    _compare_from_logprobs(case, RICH)
    with_column = dict(case, advantages=case["advantages"][:, None])
    _compare_from_logprobs(with_column, RICH)


@st.composite
def logprob_cases(draw):
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    case = _logprob_case(draw(seeds()), batch, length, per_sequence=draw(st.booleans()),
                         old_noise=draw(st.sampled_from((0.2, 1.0))))
    mask = draw(masks((batch, length))).float()
    if not bool(mask.any()):
        mask[0, 0] = 1.0
    case["mask"] = mask
    return case


@settings(max_examples=examples(200))
@given(case=logprob_cases(), config=policy_configs(),
       extra=st.fixed_dictionaries({}, optional={"normalizer": st.sampled_from((3.0, 0.5)), "is_weights": st.just(0)}))
def test_from_logprobs_matches_reference_for_every_option(case, config, extra):
    if "is_weights" in extra:
        extra["is_weights"] = 2.0 * torch.rand(case["logp"].shape, generator=torch.Generator().manual_seed(1))
    _compare_from_logprobs(case, config, **extra)


# ---------------------------------------------------------------------------------------------
# Argument checking and integration.


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages: expected shape \(2, 4\) per token or \(2,\)"),
        (dict(old_logprobs=torch.zeros(2, 3)), ValueError, r"old_logprobs: expected shape \(2, 4\)"),
        (dict(mask=torch.ones(2, 5)), ValueError, r"mask: expected shape \(2, 4\)"),
        (dict(kl_coef=0.1), ValueError, "ref_logprobs: required when kl_coef"),
        (dict(loss_type="ppo2"), ValueError, "loss_type: expected one of"),
        (dict(loss_agg="mean"), ValueError, "loss_agg: expected one of"),
        (dict(kl_estimator="k4", ref_logprobs=torch.zeros(2, 4)), ValueError, "kl_estimator"),
        (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low: expected a number >= 0"),
        (dict(bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
        (dict(old_logprobs=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "old_logprobs: expected dtype"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    args = dict(logits=torch.zeros(2, 4, 10), targets=torch.zeros(2, 4, dtype=torch.int64),
                old_logprobs=torch.zeros(2, 4), advantages=torch.zeros(2, 4), mask=None)
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        fk.policy_loss(*args.values(), backend="torch", **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias, canonical", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                              ("dapo", "token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")])
def test_trl_aggregation_names_give_the_reference_loss_of_their_verl_mode(backend, alias, canonical):
    assert PolicyLossConfig(loss_agg=alias).loss_agg == canonical
    inputs = _case(30)
    out, grad = _run(backend, inputs, dataclasses.replace(RICH, loss_agg=alias, entropy_agg=alias))
    expected = _reference(inputs, dataclasses.replace(RICH, loss_agg=canonical, entropy_agg=canonical))
    _assert_loss_close(out.loss, expected.loss, expected.loss_scale, dtype=torch.float32, name=f"{alias} loss")
    assert_close_to_reference(grad, expected.grad, dtype=torch.float32, kind="grad", name=f"{alias} grad",
                              row_scale=expected.scale)


def test_runs_inside_torch_compile_with_one_graph_break():
    """fullgraph=True is not supported (the fused Function differentiates a sub-graph in its forward);
    the op runs eagerly at a graph break and the rest of the compiled function around it still works."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 61, generator=g)
    args = (torch.randint(0, 61, (2, 5), generator=g), torch.randn(2, 5, generator=g) - 4, torch.randn(2, generator=g))
    config = fk.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.01)

    def step(z):
        out = fk.policy_loss(z * 1.5, *args, config=config, backend="torch")
        return out.loss * 2.0

    compiled_z = logits.clone().requires_grad_(True)
    torch.compile(step, backend="eager")(compiled_z).backward()
    z64 = logits.double().requires_grad_(True)
    loss, *_ = reference.policy_loss(z64 * 1.5, *args, config=config)
    (loss * 2.0).backward()
    assert_close_to_reference(compiled_z.grad, z64.grad, dtype=torch.float32, kind="grad", name="compiled grad")
