"""verl integration: helpers on the core op, and policy losses equal to verl 0.9.1's registered ones.

verl is imported by ``tests/verl_import.py`` (stand-ins for its ray and orjson imports when they are
missing).
"""

from __future__ import annotations

import types

import pytest
import torch

from fastrl_kernels.integrations import verl as fk_verl
from tests.docs_examples import doc_example
from tests.verl_import import import_core_algos

MODES = ["vanilla", "gspo", "sapo", "cispo", "gpg"]
AGGS = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def core_algos():
    return import_core_algos()


def _actor_config(**fields):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, **fields)


def _batch(seed=0, batch=5, length=9):
    gen = torch.Generator().manual_seed(seed)
    log_prob = (torch.randn(batch, length, generator=gen) * 0.5 - 2.0).requires_grad_(True)
    old = log_prob.detach() + 0.4 * torch.randn(batch, length, generator=gen)
    adv = torch.randn(batch, length, generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).float()
    mask[1] = 0.0  # an empty sequence: verl's seq-mean modes do not count it
    weights = torch.rand(batch, length, generator=gen) + 0.5
    return old, log_prob, adv, mask, weights


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "global-batch-info"])
def test_policy_loss_matches_verl(core_algos, mode, agg, global_info):
    config = _actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
    if global_info:
        config.global_batch_info.update(dp_size=2, batch_num_tokens=61, global_batch_size=9, loss_scale_factor=12)
    old, log_prob, adv, mask, weights = _batch(seed=MODES.index(mode))
    expected_fn = core_algos.get_policy_loss_fn(mode)
    ours_fn = fk_verl.make_policy_loss_fn(mode)
    results = []
    for fn in (expected_fn, ours_fn):
        log_prob.grad = None
        loss, metrics = fn(old, log_prob, adv, mask, agg, config, weights)
        loss.backward()
        results.append((loss.detach(), log_prob.grad.clone(), metrics))
    (expected, expected_grad, expected_metrics), (loss, grad, metrics) = results
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert metrics == pytest.approx(expected_metrics, rel=1e-5, abs=1e-7)
    assert grad.abs().max() > 0


def test_register_with_verl(core_algos):
    names = fk_verl.register_verl_policy_losses()
    assert names == [f"fastrl_{m}" for m in MODES]
    old, log_prob, adv, mask, _ = _batch()
    config = _actor_config()
    loss, _ = core_algos.get_policy_loss_fn("fastrl_vanilla")(old, log_prob, adv, mask, "token-mean", config)
    expected, _ = core_algos.get_policy_loss_fn("vanilla")(old, log_prob, adv, mask, "token-mean", config)
    torch.testing.assert_close(loss, expected)


def test_helpers_match_verl(core_algos):
    import verl.utils.torch_functional as verl_F

    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 50, generator=gen) * 3).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 4), generator=gen)
    for ours, theirs in ((fk_verl.logprobs_from_logits(logits, labels), verl_F.logprobs_from_logits(logits, labels)),
                         (fk_verl.entropy_from_logits(logits), verl_F.entropy_from_logits(logits))):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        g_ours, = torch.autograd.grad(ours.sum(), logits)
        g_theirs, = torch.autograd.grad(theirs.sum(), logits)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)


def test_helpers_match_formulas():
    """verl's documented formulas: log_softmax gather, and H = logsumexp(z) - sum softmax(z) z."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 6, 70, generator=gen) * 4).double().float()
    labels = torch.randint(0, 70, (2, 6), generator=gen)
    z = logits.double() / 0.7
    logp, entropy = fk_verl.logprobs_and_entropy_from_logits(logits, labels, temperature=0.7)
    expected_logp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected_entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fk_verl.entropy_from_logits(logits, temperature=0.7), entropy)


@pytest.mark.parametrize("mode", MODES)
def test_fused_policy_loss_equals_logprob_path(mode):
    """From logits: the same loss and logits gradient as the O(N) loss on our log-probs."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 40, generator=gen, requires_grad=True)
    responses = torch.randint(0, 40, (4, 6), generator=gen)
    old, _, adv, mask, weights = _batch(seed=4, batch=4, length=6)
    config = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_high=0.3, clip_ratio_c=3.0, tau_pos=1.0, tau_neg=1.05,
                                   global_batch_info={})
    out = fk_verl.fused_policy_loss(logits, responses, old, adv, mask, "seq-mean-token-mean", config, weights,
                                    loss_mode=mode, temperature=0.9)
    grad, = torch.autograd.grad(out.loss, logits)
    log_prob = fk_verl.logprobs_from_logits(logits / 0.9, responses)
    expected, _ = fk_verl.make_policy_loss_fn(mode)(old, log_prob, adv, mask, "seq-mean-token-mean", config, weights)
    expected_grad, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_bad_names():
    with pytest.raises(ValueError, match="loss_mode"):
        fk_verl.make_policy_loss_fn("clip_cov")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fk_verl.policy_config(None, "vanilla", "mean")


def test_docs_example():
    namespace: dict = {}
    exec(compile(doc_example("verl"), "docs/integrations.md:verl", "exec"), namespace)
    assert namespace["logits"].grad is not None and namespace["logits"].grad.abs().max() > 0
