"""verl's gpg policy loss (-A logp: no ratio, no clip): its formula, the reference on every CPU backend, and
verl's own function."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.reference import policy as ref_policy
from tests.backends_under_test import cpu_fused_backends
from tests.test_integration_verl import _actor_config, core_algos  # noqa: F401 (a fixture)


def _batch(seed=0, rows=4, length=7):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.5 - 2.0).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, length, generator=g, dtype=torch.float64)
    mask = (torch.rand(rows, length, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    return logp, old, adv, mask


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum"])
def test_gpg_is_minus_advantage_times_logp(backend, loss_agg):
    logp, old, adv, mask = _batch(seed=1)
    is_weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    fn = fk.policy_loss_from_logprobs if backend == "fused" else ref_policy.policy_loss_from_logprobs
    loss, metrics = fn(logp, None, old, adv, mask, is_weights=is_weights, loss_type="gpg", loss_agg=loss_agg,
                       entropy_mode="sampled")
    per_token = -adv * logp * is_weights  # no ratio, no clip: old log-probs enter the metrics only
    if loss_agg == "token-mean":
        expected = (per_token * mask).sum() / mask.sum()
    else:
        expected = (per_token * mask).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss, logp)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=0)
    ratio = torch.exp(logp.detach() - old)
    torch.testing.assert_close(metrics["ratio_mean"].double(), (ratio * mask).sum() / mask.sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", cpu_fused_backends())
def test_gpg_on_logits_matches_the_reference(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 40, generator=g) * 2
    targets = torch.randint(0, 40, (3, 5), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) + 0.2
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    kwargs = dict(loss_type="gpg", kl_coef=0.05, entropy_coef=0.01)
    ref = fk.policy_loss(logits.double().requires_grad_(True), targets, old, adv, mask, ref_logprobs=old - 0.1,
                         backend="reference", **kwargs)
    ours = fk.policy_loss(logits.clone().requires_grad_(True), targets, old, adv, mask, ref_logprobs=old - 0.1,
                          backend=backend, **kwargs)
    torch.testing.assert_close(ours.loss.double(), ref.loss.double(), rtol=1e-5, atol=1e-6)
    for name in ref.metrics:
        torch.testing.assert_close(ours.metrics[name].double(), ref.metrics[name].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gpg_equals_verls_gpg(core_algos, loss_agg):  # noqa: F811 (the fixture)
    logp, old, adv, mask = _batch(seed=4, rows=5, length=9)
    logp32 = logp.detach().float().requires_grad_(True)
    expected, _ = core_algos.compute_policy_loss_gpg(old.float(), logp32, adv.float(), mask.float(), loss_agg,
                                                     _actor_config())
    expected.backward()
    ours = logp.detach().float().requires_grad_(True)
    loss, _ = fk.policy_loss_from_logprobs(ours, None, old.float(), adv.float(), mask.float(), loss_type="gpg",
                                           loss_agg=loss_agg, entropy_mode="sampled")
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.grad, logp32.grad, rtol=1e-5, atol=1e-8)
