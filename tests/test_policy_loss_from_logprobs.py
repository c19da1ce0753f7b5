"""policy_loss_from_logprobs (the O(N) algebra on log-probs and entropies) against the float64 reference:
each option name, the dual clip, per-sequence advantages, and drawn inputs and options."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import ENTROPY_MODES, KL_ESTIMATORS, POLICY_LOSS_TYPES
from fastrl_kernels.testing import assert_close_to_reference, masks, policy_configs, seeds
from tests.conftest import examples
from tests.test_policy_loss import (
    AGG_NAMES,
    CLIP_FAMILY,
    RICH,
    _assert_clip_fracs,
    _assert_loss_close,
    _clip_frac_bounds,
    _differs,
    _loss_scale,
    _term_scales,
)

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
