"""Every naive formula (the baseline of each benchmark ratio and the trainer's ``--kernel naive``) equals
the float64 reference on small float32 inputs, in value and in gradient: that is what makes a baseline
trustworthy."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels import reference
from fastrl_kernels.benchmarks import naive
from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.trainer import naive as trainer_naive

B, T, V, H = 4, 6, 37, 16
TOL = dict(rtol=1e-5, atol=1e-6)


def _close(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **(tol or TOL))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    true = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    return dict(
        logits=logits, targets=targets, mask=torch.rand(B, T, generator=g) > 0.3,
        old=true + 0.3 * torch.randn(B, T, generator=g), ref=true + 0.2 * torch.randn(B, T, generator=g),
        adv=torch.randn(B, generator=g),
    )


def _grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves)
    out.backward()
    return out, [x.grad for x in leaves]


def test_token_logprobs_with_and_without_ignored_targets(batch):
    z, t = batch["logits"], batch["targets"].clone()
    logp, entropy = naive.naive_token_logprobs(z, t, 0.7)
    want_lp, want_h = reference.token_logprobs(z.double(), t, temperature=0.7)
    _close(logp, want_lp)
    _close(entropy, want_h)
    t[:, -2:] = -100
    logp, entropy = naive.naive_token_logprobs(z, t, 0.7, ignore_index=-100)
    want_lp, want_h = reference.token_logprobs(z.double(), t, temperature=0.7)
    _close(logp, want_lp)
    _close(entropy, want_h)
    assert naive.naive_token_logprobs(z, batch["targets"], with_entropy=False)[1] is None
    assert trainer_naive.token_logprobs is naive.naive_token_logprobs


@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.1, 0.28)])
def test_policy_loss_matches_reference_with_the_given_clip_bounds(batch, clip):
    low, high = clip
    kw = dict(clip_eps_low=low, clip_eps_high=high, kl_coef=0.04)
    args = (batch["targets"], batch["old"], batch["adv"], batch["mask"])
    loss, (grad,) = _grads(lambda z: naive.naive_policy_loss(z, *args, batch["ref"], temperature=0.7, **kw)[0],
                           batch["logits"])
    want, (want_grad,) = _grads(lambda z: reference.policy_loss(
        z, *args, ref_logprobs=batch["ref"], temperature=0.7, kl_estimator="k3", loss_agg="token-mean", **kw)[0],
        batch["logits"].double())
    _close(loss, want)
    _close(grad, want_grad)


@pytest.mark.parametrize("normalizer", [None, 17.0])
def test_trainer_policy_loss_follows_its_config(batch, normalizer):
    config = PolicyLossConfig(clip_eps_low=0.1, clip_eps_high=0.28, kl_coef=0.04, entropy_coef=0.01, temperature=0.7)
    args = (batch["targets"], batch["old"], batch["adv"], batch["mask"])
    norm = None if normalizer is None else torch.tensor(normalizer)
    loss, (grad,) = _grads(lambda z: trainer_naive.policy_loss(
        z, *args, ref_logprobs=batch["ref"], config=config, normalizer=norm).loss, batch["logits"])
    want, (want_grad,) = _grads(lambda z: reference.policy_loss(
        z, *args, ref_logprobs=batch["ref"], config=config, normalizer=normalizer)[0], batch["logits"].double())
    _close(loss, want)
    _close(grad, want_grad)
    with pytest.raises(NotImplementedError, match="loss_agg"):
        trainer_naive.policy_loss(batch["logits"], *args, ref_logprobs=None, config=PolicyLossConfig(loss_agg="sum"))


def test_linear_policy_loss_matches_reference_on_the_logits(batch):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    args = (batch["targets"], batch["old"], batch["adv"], batch["mask"])
    loss, grads = _grads(lambda h, w: naive.naive_linear_policy_loss(h, w, *args, clip_eps_high=0.28), hidden, weight)
    want, want_grads = _grads(lambda h, w: reference.policy_loss(
        h @ w.T, *args, clip_eps_high=0.28, loss_agg="token-mean")[0], hidden.double(), weight.double())
    _close(loss, want)
    for got, expected in zip(grads, want_grads):  # sums over V (dL/dh) and N (dL/dW) of float32 products
        _close(got, expected, rtol=1e-4, atol=5e-5)


def test_dpo_loss_matches_reference(batch):
    z, t, mask = batch["logits"], batch["targets"], batch["mask"]
    ref_c, ref_r = torch.randn(B // 2) - 20, torch.randn(B // 2) - 20
    out = naive.naive_dpo_loss(z, t, mask, ref_c, ref_r, beta=0.1)
    seq = reference.sequence_logprobs(z.double(), t, mask)
    losses, chosen, rejected = reference.dpo_loss(seq[: B // 2], seq[B // 2:], ref_c, ref_r, beta=0.1)
    _close(out.loss, losses.mean())
    _close(out.chosen_rewards, chosen, rtol=1e-5, atol=1e-5)
    _close(out.rejected_rewards, rejected, rtol=1e-5, atol=1e-5)
    assert trainer_naive.fused_dpo_loss is naive.naive_dpo_loss


def test_advantages_and_value_loss_match_reference():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(12, generator=g)
    _close(naive.group_advantages(rewards, 4), reference.group_advantages(rewards.double(), 4), rtol=1e-5, atol=1e-5)
    r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    adv, ret = naive.gae(r, v, mask, gamma=0.9, lam=0.8)
    want_adv, want_ret = reference.gae(r.double(), v.double(), mask, gamma=0.9, lam=0.8)
    _close(adv, want_adv)
    _close(ret, torch.where(mask, want_ret, 0.0))  # the naive returns are 0 on masked steps
    old, returns = v + 0.3 * torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    for clip, normalizer in ((None, None), (0.2, 11.0)):
        norm = None if normalizer is None else torch.tensor(normalizer)
        got = naive.value_loss(v, old, returns, mask, clip=clip, normalizer=norm)
        _close(got, reference.value_loss(v.double(), old.double(), returns.double(), mask, clip=clip,
                                         normalizer=normalizer))
