"""The float64 reference of the policy loss: it computes in float64 whatever the input dtype, defaults
to the k3 estimator, and refuses what it cannot evaluate with the argument's name."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl_kernels.reference import policy as ref


def _batch(dtype, seed=0, b=2, t=4, v=9):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=(3.0 * torch.randn(b, t, v, generator=g)).to(dtype),
                targets=torch.randint(0, v, (b, t), generator=g), old=(-2.0 * torch.rand(b, t, generator=g)).to(dtype),
                ref=(-2.0 * torch.rand(b, t, generator=g)).to(dtype), adv=torch.randn(b, generator=g).to(dtype),
                mask=torch.rand(b, t, generator=g) > 0.3, is_weights=(0.5 + torch.rand(b, t, generator=g)).to(dtype))


def test_float32_inputs_give_the_float64_results_of_their_float64_values():
    """The reference widens every input first: float32 inputs and their exact float64 copies agree to the
    last bit, in the loss, the per-token values and every metric."""
    lo = _batch(torch.float32)
    hi = {k: v.double() if v.is_floating_point() else v for k, v in lo.items()}
    outs = []
    for x in (lo, hi):
        outs.append(ref.policy_loss(x["logits"], x["targets"], x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"],
                                    is_weights=x["is_weights"], kl_coef=0.1, entropy_coef=0.01, temperature=0.7))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in outs[1][3]:
        torch.testing.assert_close(outs[0][3][name], outs[1][3][name], rtol=0, atol=0)


def test_kl_penalty_defaults_to_k3_and_refuses_unknown_estimators_by_name():
    logp, ref_lp = torch.tensor([0.0], dtype=torch.float64), torch.tensor([math.log(2.0)], dtype=torch.float64)
    assert ref.kl_penalty(logp, ref_lp).item() == pytest.approx(1.0 - math.log(2.0), abs=1e-15)  # e^k - k - 1
    with pytest.raises(ValueError, match=r"^estimator: expected one of \('k1', 'abs', 'k2', 'k3', 'k1\+', 'k3\+'\), "
                                         r"got 'k4'$"):
        ref.kl_penalty(logp, ref_lp, "k4")


def test_policy_loss_from_logprobs_refusals_name_the_argument():
    lp = -torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^entropy: required when entropy_mode='exact'; pass it or use "
                                         r"entropy_mode='sampled'$"):
        ref.policy_loss_from_logprobs(lp, None, lp, torch.zeros(2))
    with pytest.raises(ValueError, match=r"^advantages: expected shape \(2, 3\) or \[2\], got \(3,\)$"):
        ref.policy_loss_from_logprobs(lp, lp, lp, torch.zeros(3))


def test_reference_transform_defaults_are_the_identity():
    """Without temperature / logit_scale the reference sees the raw logits: x = z, log softmax of z."""
    from fastrl_kernels.reference import logprobs as ref_logprobs

    z = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(ref_logprobs.transformed_logits(z), z)
    stats = ref_logprobs.token_stats(z, torch.tensor([2]))
    torch.testing.assert_close(stats.logp, torch.log_softmax(z, -1)[:, 2], rtol=0, atol=1e-15)
