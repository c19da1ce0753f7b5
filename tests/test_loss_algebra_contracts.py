"""Contracts of the loss layer's entry points that adapters and custom losses rely on: the O(N) policy
algebra (``fastrl_kernels.losses.policy``) without a config uses the defaults of ``PolicyLossConfig``;
the fused engine returns a loss function's aux tensors detached."""

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


def test_the_fused_engine_returns_aux_detached():
    """``fused_logits_loss`` hands back the loss function's aux tensors detached: a metric computed with
    gradient (as a user's loss function may) cannot keep the step's graph alive or be backpropagated."""
    from fastrl_kernels.core import CoreParams
    from fastrl_kernels.ops.fused import fused_logits_loss
    from fastrl_kernels.ops.prepare import logits_rows

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (4,), generator=g)

    def loss_fn(logp, entropy, log_sum_p2):
        return -logp.sum(), {"mean_logp": logp.mean(), "count": torch.tensor(4.0)}

    loss, logp, _, aux = fused_logits_loss(logits_rows(logits, targets), loss_fn, params=CoreParams(),
                                           backend="torch", inplace_grad=False, with_log_sum_p2=False)
    assert loss.requires_grad and not aux["mean_logp"].requires_grad
    torch.testing.assert_close(aux["mean_logp"], logp.detach().mean(), rtol=0, atol=0)
    assert aux["count"].item() == 4.0
