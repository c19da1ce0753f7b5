"""policy_loss_from_logprobs of the float64 reference: float32 inputs give the float64 results of their
float64 values to the bit (the loss, every metric, and gradients rounded once to float32), and empty
inputs give a 0-d float64 ratio_max of 0."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.reference import policy as ref

B, T = 3, 16


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    logp = -3.0 * torch.rand(B, T, generator=g)
    x = dict(logp=logp, entropy=torch.rand(B, T, generator=g), old=logp + 1.5 * torch.randn(B, T, generator=g),
             adv=torch.randn(B, T, generator=g), ref=-3.0 * torch.rand(B, T, generator=g),
             is_weights=0.5 + torch.rand(B, T, generator=g), mask=torch.rand(B, T, generator=g) > 0.2)
    return {k: v if k == "mask" else v.to(dtype).requires_grad_(k in ("logp", "entropy")) for k, v in x.items()}


@pytest.mark.parametrize("loss_type", ["clip", "cispo", "gspo_token"])
def test_float32_inputs_give_the_float64_results_and_gradients_rounded_once(loss_type):
    # dual_clip = 3 binds where A < 0 and r > 3 (the inputs hold ratios up to e^4): its bound -3 A is a
    # float64 product, not a float32 one.
    options = dict(loss_type=loss_type, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    results = []
    for dtype in (torch.float32, torch.float64):
        x = _inputs(dtype)
        loss, metrics = ref.policy_loss_from_logprobs(x["logp"], x["entropy"], x["old"], x["adv"], x["mask"],
                                                      ref_logprobs=x["ref"], is_weights=x["is_weights"], **options)
        loss.backward()
        results.append((loss, metrics, x["logp"].grad, x["entropy"].grad))
    (loss32, metrics32, g32, h32), (loss64, metrics64, g64, h64) = results
    assert loss32.dtype == torch.float64
    torch.testing.assert_close(loss32, loss64, rtol=0, atol=0)
    for name, value in metrics64.items():
        assert metrics32[name].dtype == torch.float64
        torch.testing.assert_close(metrics32[name], value, rtol=0, atol=0)
    torch.testing.assert_close(g32, g64.float(), rtol=0, atol=0)
    torch.testing.assert_close(h32, h64.float(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 0), (0,)])
def test_empty_inputs_give_a_zero_ratio_max(shape):
    lp = torch.zeros(shape, dtype=torch.float64)
    adv = torch.zeros(shape[0]) if len(shape) == 2 else lp
    loss, metrics = ref.policy_loss_from_logprobs(lp, lp, lp, adv)
    assert loss.item() == 0.0
    ratio_max = metrics["ratio_max"]
    assert ratio_max.shape == () and ratio_max.dtype == torch.float64 and ratio_max.item() == 0.0
