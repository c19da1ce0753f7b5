"""Empty and degenerate shapes on every op and backend: N = 0, B = 0, T = 0, V = 1, all-masked batches,
groups of one. Each gives a defined result (loss 0 and a zero gradient of the input's shape, finite
metrics, never NaN) or an error naming the argument; the fused backends agree with the reference."""

import math

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference as ref
from fastrl_kernels.config import LOSS_AGG_MODES, POLICY_LOSS_TYPES
from fastrl_kernels.ops import advantages as ops
from tests.backends_under_test import cpu_fused_backends

# The Triton kernels run here under the interpreter (tests/conftest.py), cheap at these sizes.
FUSED = cpu_fused_backends(interpreted=True)
BACKENDS = FUSED + ["reference"]
V = 7
EMPTY_LEADING = [(0,), (0, 4), (3, 0)]


def _policy_args(leading, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*leading, vocab, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, leading, generator=g)
    old = torch.randn(leading, generator=g) - 2.0
    adv = torch.randn(leading[0] if len(leading) == 2 else leading, generator=g)
    return logits, targets, old, adv


def _assert_zero_metrics(metrics):
    for name, value in metrics.items():
        assert value.shape == () and value.item() == 0.0, f"{name} = {value}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading", EMPTY_LEADING)
def test_token_logprobs_of_no_tokens_is_empty_with_an_empty_gradient(backend, leading):
    logits, targets, _, _ = _policy_args(leading)
    logp, entropy = fk.token_logprobs(logits, targets, backend=backend)
    assert logp.shape == entropy.shape == leading and logp.dtype == entropy.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading", EMPTY_LEADING)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_policy_loss_of_no_tokens_is_zero(backend, leading, loss_type):
    """Every loss type with KL, entropy bonus and importance weights: loss 0, zero metrics, empty grad."""
    logits, targets, old, adv = _policy_args(leading)
    out = fk.policy_loss(logits, targets, old, adv, None, ref_logprobs=old + 0.1, is_weights=torch.ones(leading),
                         backend=backend, loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01)
    assert out.loss.item() == 0.0 and out.loss.dtype == torch.float32
    assert out.logprobs.shape == out.entropy.shape == leading
    _assert_zero_metrics(out.metrics)
    out.loss.backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_from_logprobs_of_no_tokens_is_zero(backend):
    del backend  # O(N) algebra only: the same code under every backend
    logp = torch.zeros(0, 4, requires_grad=True)
    loss, metrics = fk.policy_loss_from_logprobs(logp, torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0),
                                                 torch.ones(0, 4))
    assert loss.item() == 0.0
    _assert_zero_metrics(metrics)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_with_empty_responses_matches_the_reference(backend):
    """T = 0: every sequence log-prob is 0, so the loss is that of zero margins (log 2 for sigmoid)."""
    logits = torch.randn(4, 0, V, requires_grad=True)
    targets = torch.zeros(4, 0, dtype=torch.int64)
    ref_c, ref_r = torch.zeros(2), torch.zeros(2)
    out = fk.fused_dpo_loss(logits, targets, None, ref_c, ref_r, backend=backend)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    out.loss.backward()
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_loss_without_pairs_names_the_logits(backend):
    """B = 0 pairs has no defined mean over pairs here: an error naming logits ([2B, T, V], 2B >= 2)."""
    with pytest.raises(ValueError, match=r"^logits: expected shape \[2B, T, V\] with an even number 2B >= 2"):
        fk.fused_dpo_loss(torch.randn(0, 3, V), torch.zeros(0, 3, dtype=torch.int64), None, torch.zeros(0),
                          torch.zeros(0), backend=backend)


def test_dpo_loss_without_pairs_is_zero():
    empty = torch.zeros(0)
    out = fk.dpo_loss(empty, empty, empty, empty)
    assert out.loss.item() == 0.0 and out.margins.shape == (0,)
    assert math.isfinite(out.accuracy.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading", EMPTY_LEADING)
def test_linear_ops_of_no_tokens(backend, leading):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(*leading, 5, generator=g, requires_grad=True)
    weight = torch.randn(V, 5, generator=g, requires_grad=True)
    targets = torch.randint(0, V, leading, generator=g)
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, backend=backend)
    assert logp.shape == entropy.shape == leading
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == hidden.shape and not weight.grad.any()
    weight.grad = None
    old = torch.zeros(leading)
    adv = torch.zeros(leading[0] if len(leading) == 2 else leading)
    out = fk.linear_policy_loss(hidden, weight, targets, old, adv, None, ref_logprobs=old, kl_coef=0.1,
                                entropy_coef=0.01, backend=backend)
    assert out.loss.item() == 0.0
    _assert_zero_metrics(out.metrics)
    out.loss.backward()
    assert weight.grad is None or not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_dpo_loss_with_empty_responses(backend):
    hidden = torch.randn(2, 0, 5, requires_grad=True)
    weight = torch.randn(V, 5, requires_grad=True)
    out = fk.linear_dpo_loss(hidden, weight, torch.zeros(2, 0, dtype=torch.int64), None, torch.zeros(1),
                             torch.zeros(1), backend=backend)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


# --- V = 1: one token, probability 1 -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocabulary_of_one_gives_zero_logprob_entropy_and_gradient(backend):
    """log p = 0 and H = 0 whatever the logit, so every loss is constant in the logits."""
    logits, targets, old, adv = _policy_args((2, 3), vocab=1, seed=5)
    logits.data.mul_(100.0)
    logp, entropy = fk.token_logprobs(logits, targets, backend=backend)
    assert torch.equal(logp, torch.zeros(2, 3)) and torch.equal(entropy, torch.zeros(2, 3))
    out = fk.policy_loss(logits, targets, old, adv, None, backend=backend, ref_logprobs=old, kl_coef=0.1,
                         entropy_coef=0.01)
    want = fk.policy_loss(logits.detach(), targets, old, adv, None, backend="reference", ref_logprobs=old,
                          kl_coef=0.1, entropy_coef=0.01)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    out.loss.backward()
    assert logits.grad.abs().max().item() <= 1e-6


# --- all-masked batches --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_an_all_masked_batch_gives_zero_loss_zero_gradient_zero_metrics(backend, loss_agg):
    logits, targets, old, adv = _policy_args((2, 4), seed=7)
    out = fk.policy_loss(logits, targets, old, adv, torch.zeros(2, 4, dtype=torch.bool), backend=backend,
                         loss_agg=loss_agg, ref_logprobs=old, kl_coef=0.1, entropy_coef=0.01)
    assert out.loss.item() == 0.0
    _assert_zero_metrics(out.metrics)
    out.loss.backward()
    assert not logits.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_masked_dpo_batch_matches_the_reference_with_a_zero_gradient(backend):
    logits = torch.randn(4, 3, V, requires_grad=True)
    targets = torch.randint(0, V, (4, 3))
    mask = torch.zeros(4, 3)
    ref_c, ref_r = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 2.0])
    out = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, backend=backend)
    want = fk.fused_dpo_loss(logits.detach(), targets, mask, ref_c, ref_r, backend="reference")
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    out.loss.backward()
    assert not logits.grad.any()


# --- advantages and the value loss ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [ops.group_advantages, ref.group_advantages], ids=["ops", "reference"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_a_group_of_one_has_zero_advantage(fn, scale):
    """Each reward is its own group mean: A = 0 (scale "std": 0 / (0 + eps), never NaN)."""
    got = fn(torch.tensor([1.0, -3.0, 7.5]), 1, scale=scale)
    assert torch.equal(got, torch.zeros(3, dtype=got.dtype))


@pytest.mark.parametrize("fn", [ops.group_advantages, ref.group_advantages], ids=["ops", "reference"])
def test_a_group_of_one_with_the_sample_std_names_group_size(fn):
    """std_ddof=1 divides by group_size - 1 = 0: refused rather than NaN."""
    with pytest.raises(ValueError, match=r"^group_size: expected > std_ddof=1 for scale='std', got 1$"):
        fn(torch.tensor([1.0, 2.0]), 1, std_ddof=1)


@pytest.mark.parametrize("std_ddof", [0, 1])
def test_a_constant_group_has_zero_advantage(std_ddof):
    got = ops.group_advantages(torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0, -1.0]), 3, std_ddof=std_ddof)
    assert torch.equal(got, torch.zeros(6))


def test_group_advantages_of_no_rewards_is_empty():
    assert ops.group_advantages(torch.zeros(0), 4).shape == (0,)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_gae_of_no_steps_is_empty(shape, whiten):
    adv, ret = ops.gae(torch.zeros(shape), torch.zeros(shape), None, gamma=0.9, lam=0.95, whiten=whiten)
    assert adv.shape == ret.shape == shape


def test_gae_whitening_an_all_masked_batch_gives_zeros():
    adv, _ = ops.gae(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3), whiten=True)
    assert torch.equal(adv, torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)])
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_value_loss_of_no_tokens_is_zero(shape, loss_agg):
    values = torch.zeros(shape, requires_grad=True)
    loss = ops.value_loss(values, torch.zeros(shape), torch.zeros(shape), clip=0.2, loss_agg=loss_agg)
    assert loss.item() == 0.0
    loss.backward()
    assert values.grad.shape == shape
