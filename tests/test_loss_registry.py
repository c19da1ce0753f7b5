"""The loss registries (policy types, KL estimators, DPO types, aggregations, f-divergences): the config
accepts their names, and the float64 reference has an entry of its own for each."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.config import POLICY_LOSS_TYPES, PolicyLossConfig
from fastrl_kernels.losses.policy_types import POLICY_LOSSES, RATIO_KINDS, policy_loss_type
from fastrl_kernels.reference import policy as ref_policy


def test_config_reference_and_fused_algebra_know_the_same_loss_types():
    assert POLICY_LOSS_TYPES == tuple(POLICY_LOSSES)
    assert set(ref_policy.POLICY_TERMS) == set(POLICY_LOSSES)
    for name, kind in POLICY_LOSSES.items():
        assert kind.ratio in RATIO_KINDS, name
        assert ref_policy.POLICY_TERMS[name][0] == kind.ratio, name  # the same ratio, formed independently


def test_an_unknown_name_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"^loss_type: unknown policy loss 'ppo2'$"):
        policy_loss_type("ppo2")
    with pytest.raises(ValueError, match="loss_type"):
        PolicyLossConfig(loss_type="ppo2")


def test_config_reference_and_fused_algebra_know_the_same_kl_estimators():
    from fastrl_kernels.config import KL_ESTIMATORS
    from fastrl_kernels.losses import kl

    assert KL_ESTIMATORS == kl.KL_ESTIMATORS
    assert tuple(ref_policy.KL_TERMS) == KL_ESTIMATORS


def test_config_reference_and_fused_algebra_know_the_same_dpo_types():
    from fastrl_kernels.config import DPO_LOSS_TYPES
    from fastrl_kernels.losses.dpo_types import DPO_LOSSES, pair_loss
    from fastrl_kernels.reference import dpo as ref_dpo

    assert DPO_LOSS_TYPES == tuple(DPO_LOSSES) == ref_dpo.DPO_LOSS_TYPES
    with pytest.raises(ValueError, match=r"^loss_type: unknown DPO loss 'kto'$"):
        pair_loss("kto", {}, None)


def test_config_reference_and_fused_algebra_know_the_same_aggregations():
    from fastrl_kernels.config import LOSS_AGG_ALIASES, LOSS_AGG_MODES
    from fastrl_kernels.losses.aggregation_modes import AGGREGATIONS

    assert LOSS_AGG_MODES == tuple(AGGREGATIONS) == tuple(ref_policy.AGGREGATIONS)
    assert set(LOSS_AGG_ALIASES.values()) <= set(LOSS_AGG_MODES)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm", "sum"])
@pytest.mark.parametrize("normalizer", [None, 3.5])
def test_every_aggregation_equals_its_reference(mode, normalizer):
    from fastrl_kernels.losses.aggregation import aggregate

    g = torch.Generator().manual_seed(4)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.4).double()
    mask[2] = 0.0  # a sequence with no kept token: its mean is 0, never NaN
    ours = aggregate(values, mask, mode, normalizer)
    expected = ref_policy.aggregate(values, mask, mode, normalizer)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=0)


def test_config_reference_and_fused_algebra_know_the_same_f_divergences():
    from fastrl_kernels.config import F_DIVERGENCES
    from fastrl_kernels.losses.dpo_types import F_DIVERGENCE_SCORES
    from fastrl_kernels.reference import dpo as ref_dpo

    assert F_DIVERGENCES == tuple(F_DIVERGENCE_SCORES) == tuple(ref_dpo.F_DIVERGENCE_SCORES)


@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("f_alpha", [0.5, 1.0, 1.7])
def test_every_f_divergence_equals_its_reference(f_divergence, f_alpha):
    from fastrl_kernels.losses.dpo import f_divergence_scores
    from fastrl_kernels.reference import dpo as ref_dpo

    u = torch.linspace(-6.0, 6.0, 25, dtype=torch.float64)
    ours = f_divergence_scores(u, f_divergence, f_alpha)
    torch.testing.assert_close(ours, ref_dpo.f_divergence_scores(u, f_divergence, f_alpha), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"^f_divergence: unknown 'chi2'$"):
        f_divergence_scores(u, "chi2", f_alpha)
    with pytest.raises(ValueError, match=r"^f_divergence: expected one of reverse_kl, forward_kl, js_divergence, "
                                         r"alpha_divergence, got 'chi2'$"):
        ref_dpo.f_divergence_scores(u, "chi2", f_alpha)
