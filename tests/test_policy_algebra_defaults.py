"""The O(N) policy-loss algebra (``fastrl_kernels.losses.policy``) called the way an adapter calls it:
without a config it uses the defaults of ``PolicyLossConfig`` and gives what the public op gives."""

from __future__ import annotations

import torch

import fastrl_kernels as fk
from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.losses import policy as policy_algebra


def test_no_config_means_the_default_config():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 6, generator=g) - 2.0).requires_grad_(True)
    entropy = torch.rand(3, 6, generator=g) * 3
    old = logp.detach() + 0.2 * torch.randn(3, 6, generator=g)
    adv = torch.randn(3, 6, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.3).float()
    loss, metrics = policy_algebra.policy_loss_from_logprobs(logp, entropy, old, adv, mask)
    want, want_metrics = policy_algebra.policy_loss_from_logprobs(logp, entropy, old, adv, mask,
                                                                  config=PolicyLossConfig())
    public, public_metrics = fk.policy_loss_from_logprobs(logp, entropy, old, adv, mask)
    for other, other_metrics in ((want, want_metrics), (public, public_metrics)):
        torch.testing.assert_close(loss, other, rtol=0, atol=0)
        assert metrics.keys() == other_metrics.keys()
        for name in metrics:
            torch.testing.assert_close(metrics[name], other_metrics[name], rtol=0, atol=0)
