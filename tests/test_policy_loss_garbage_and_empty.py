"""policy_loss_from_logprobs: NaN / inf log-probs and entropies at masked tokens reach neither the loss, the
metrics nor the gradient; empty batches give 0-d zero metrics, with or without the KL term; the
aggregation weights refuse a bad normalizer themselves."""

import math

import pytest
import torch

from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.losses.aggregation import aggregate, aggregation_weights
from fastrl_kernels.losses.policy import policy_loss_from_logprobs


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 5, generator=g) * 2
    old = logp + 0.1 * torch.randn(3, 5, generator=g)
    ref = logp + 0.1 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    entropy = torch.rand(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    mask[2, 1] = 0
    return logp, entropy, old, ref, adv, mask


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("entropy_mode", ["exact", "sampled"])
def test_garbage_log_probs_at_masked_tokens_change_nothing(garbage, entropy_mode):
    logp, entropy, old, ref, adv, mask = _batch()
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, entropy_mode=entropy_mode)
    clean_logp = logp.clone().requires_grad_(True)
    clean_entropy = entropy.clone().requires_grad_(True)
    loss, metrics = policy_loss_from_logprobs(clean_logp, clean_entropy, old, adv, mask, ref, config=cfg)
    loss.backward()
    dirty = torch.where(mask > 0, logp, garbage).requires_grad_(True)
    dirty_entropy = torch.where(mask > 0, entropy, garbage).requires_grad_(True)
    dirty_loss, dirty_metrics = policy_loss_from_logprobs(dirty, dirty_entropy, old, adv, mask, ref, config=cfg)
    dirty_loss.backward()
    assert torch.isfinite(dirty_loss)
    torch.testing.assert_close(dirty_loss, loss, rtol=0, atol=0)
    for name, value in metrics.items():
        torch.testing.assert_close(dirty_metrics[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(dirty.grad, clean_logp.grad, rtol=0, atol=0)
    torch.testing.assert_close(dirty_entropy.grad, clean_entropy.grad, rtol=0, atol=0)
    assert (dirty.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_an_empty_batch_gives_zero_metrics(shape, kl_coef):
    logp = torch.zeros(shape, requires_grad=True)
    cfg = PolicyLossConfig(kl_coef=kl_coef)
    loss, metrics = policy_loss_from_logprobs(logp, torch.zeros(shape), torch.zeros(shape), torch.zeros(shape),
                                              torch.ones(shape), torch.zeros(shape), config=cfg)
    assert loss.shape == () and loss.item() == 0.0
    for name in ("ratio_max", "kl_mean"):
        value = metrics[name]
        assert isinstance(value, torch.Tensor), name
        assert value.shape == () and value.dtype == torch.float32 and value.item() == 0.0, name


@pytest.mark.parametrize("normalizer", [0, -1.0, math.nan, math.inf])
def test_aggregation_weights_refuse_a_bad_normalizer(normalizer):
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="normalizer"):
        aggregation_weights(mask, "token-mean", normalizer)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate(torch.ones(2, 3), mask, "sum", normalizer)
