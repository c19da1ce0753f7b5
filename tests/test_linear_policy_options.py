"""``fk.linear_policy_loss`` beyond the main value tests: every option reaching the float64 computation of
backend="reference", the default backend and chunk size, a unit entropy coefficient on the fused backends,
and the input checks naming the argument."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear import _chain, _problem, _reference_logits

BACKENDS = cpu_fused_backends()
B, T, H, V = 2, 5, 6, 23


def _inputs(seed, ignore_index=-100):
    hidden, weight, bias, targets = _problem((B, T), H, V, seed=seed, ignore_index=ignore_index)
    g = torch.Generator().manual_seed(seed + 1)
    old = -2.0 - torch.rand((B, T), generator=g)
    adv = torch.randn((B, T), generator=g)
    return hidden, weight, bias, targets, old, adv


def _check_against_reference(out, expected, name):
    loss, logp, entropy, metrics = expected
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert_close_to_reference(out.loss, loss, dtype=torch.float32, name=f"{name} loss")
    assert_close_to_reference(out.logprobs, logp, dtype=torch.float32, name=f"{name} logprobs")
    assert_close_to_reference(out.entropy, entropy, dtype=torch.float32, name=f"{name} entropy")
    assert set(out.metrics) == set(metrics)


def test_reference_backend_passes_every_option_to_the_float64_loss():
    """mask, ref_logprobs (KL), config, normalizer, is_weights, ignore_index, logit_scale, softcap and bias
    all change the loss; backend="reference" equals reference.policy_loss on h W^T + b with all of them."""
    hidden, weight, bias, targets, old, adv = _inputs(seed=71, ignore_index=-1)
    g = torch.Generator().manual_seed(72)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 3] = False
    ref = -2.5 + 0.5 * torch.rand((B, T), generator=g)
    is_weights = 0.5 + torch.rand((B, T), generator=g)
    config = PolicyLossConfig(loss_type="clip", clip_eps_low=0.1, kl_coef=0.3, entropy_coef=0.05,
                              loss_agg="seq-mean-token-sum", temperature=0.8)
    options = dict(ref_logprobs=ref, normalizer=7.0, is_weights=is_weights, ignore_index=-1, logit_scale=1.7,
                   softcap=2.0)
    out = fk.linear_policy_loss(hidden, weight, targets, old, adv, mask, bias=bias, config=config,
                                backend="reference", **options)
    expected = reference.policy_loss(_reference_logits(hidden, weight, bias).detach(), targets, old, adv, mask,
                                     config=config, **options)
    _check_against_reference(out, expected, "reference backend")
    for key, value in expected[3].items():
        assert_close_to_reference(out.metrics[key], value, dtype=torch.float32, name=f"metric {key}")
    # Each option matters here: leaving one out gives another loss.
    variants = {
        "mask": dict(mask=None), "ref_logprobs/kl": dict(config=PolicyLossConfig(
            loss_type="clip", clip_eps_low=0.1, entropy_coef=0.05, loss_agg="seq-mean-token-sum", temperature=0.8),
            ref_logprobs=None), "config": dict(config=None), "normalizer": dict(normalizer=None),
        "is_weights": dict(is_weights=None), "logit_scale": dict(logit_scale=1.0), "softcap": dict(softcap=None),
    }
    base = dict(mask=mask, config=config, **options)
    for name, change in variants.items():
        kwargs = base | change
        m = kwargs.pop("mask")
        other, *_ = reference.policy_loss(_reference_logits(hidden, weight, bias).detach(), targets, old, adv, m,
                                          **kwargs)
        assert abs(other.item() - expected[0].item()) > 1e-4, name
    no_bias, *_ = reference.policy_loss(_reference_logits(hidden, weight, None).detach(), targets, old, adv, mask,
                                        config=config, **options)
    assert abs(no_bias.item() - expected[0].item()) > 1e-4


def test_default_backend_and_chunk_size():
    """Without backend / chunk_size: the same values as backend="auto", chunk_size=None given explicitly,
    and as the float64 reference; the gradient reaches hidden and weight."""
    hidden, weight, bias, targets, old, adv = _inputs(seed=73)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fk.linear_policy_loss(leaves[0], leaves[1], targets, old, adv, bias=leaves[2])
    explicit = fk.linear_policy_loss(hidden, weight, targets, old, adv, bias=bias, backend="auto", chunk_size=None)
    torch.testing.assert_close(out.loss.detach(), explicit.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logprobs.detach(), explicit.logprobs, rtol=0, atol=0)
    expected = reference.policy_loss(_reference_logits(hidden, weight, bias).detach(), targets, old, adv)
    _check_against_reference(out, expected, "default backend")
    out.loss.backward()
    assert leaves[0].grad is not None and leaves[1].grad is not None and leaves[2].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip", "cispo"])
def test_entropy_coefficient_of_one_matches_reference(backend, loss_type):
    """entropy_coef = 1.0 (any value != 0) adds -aggregate(H): the fused one-sweep route equals the reference."""
    hidden, weight, bias, targets, old, adv = _inputs(seed=74)
    config = PolicyLossConfig(loss_type=loss_type, entropy_coef=1.0)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fk.linear_policy_loss(leaves[0], leaves[1], targets, old, adv, bias=leaves[2], config=config,
                                backend=backend, chunk_size=4)
    logits = _reference_logits(hidden, weight, bias)
    expected = reference.policy_loss(logits, targets, old, adv, config=config)
    _check_against_reference(out, expected, f"{backend} entropy_coef=1")
    out.loss.backward()
    expected[0].backward()
    for leaf, want in zip(leaves, _chain(logits, hidden, weight, bias)):
        torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-4, atol=1e-6)
    without, *_ = reference.policy_loss(_reference_logits(hidden, weight, bias).detach(), targets, old, adv,
                                        config=PolicyLossConfig(loss_type=loss_type))
    assert abs(without.item() - expected[0].item()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_checks_name_the_argument(backend):
    hidden, weight, bias, targets, old, adv = _inputs(seed=75)
    call = dict(bias=bias, backend=backend, chunk_size=3)
    with pytest.raises(ValueError, match=r"^bias: expected shape \(23,\)"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, **(call | dict(bias=bias[:5])))
    with pytest.raises(TypeError, match=r"^bias: expected dtype"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, **(call | dict(bias=bias.double())))
    with pytest.raises(ValueError, match=r"^old_logprobs: expected shape \(2, 5\)"):
        fk.linear_policy_loss(hidden, weight, targets, old[:, :3], adv, **call)
    with pytest.raises(ValueError, match=r"^old_logprobs: expected shape \(2, 5\)"):
        fk.linear_policy_loss(hidden, weight, targets, old.t(), adv, **call)
    with pytest.raises(ValueError, match=r"^is_weights: expected shape \(2, 5\)"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, is_weights=torch.ones(5, 2), **call)
    with pytest.raises(ValueError, match=r"^is_weights: expected shape \(2, 5\)"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, is_weights=torch.ones(2, 4), **call)
    with pytest.raises(ValueError, match=r"^normalizer: expected a tensor on cpu like \w+, got meta$"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, normalizer=torch.tensor(4.0, device="meta"), **call)
    with pytest.raises(ValueError, match=r"^normalizer: expected a tensor on cpu like \w+, got meta$"):
        fk.linear_policy_loss(hidden, weight, targets, old, adv, normalizer=torch.tensor(4.0, device="meta"),
                              loss_type="gspo", **call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip", "gspo"])  # the one-sweep and the two-pass route
def test_only_a_loss_input_requiring_grad_gives_the_plain_values(backend, loss_type):
    """hidden, weight and bias constant, old log-probs a leaf that requires grad: the op still runs its
    autograd Function (a stats sweep, no gradient buffers), with the values of the no-grad run; the
    old log-probs are constants of the loss, so they get no gradient."""
    hidden, weight, bias, targets, old, adv = _inputs(seed=61)
    kwargs = dict(bias=bias, backend=backend, chunk_size=4, loss_type=loss_type, kl_coef=0.0, entropy_coef=0.02)
    with torch.no_grad():
        plain = fk.linear_policy_loss(hidden, weight, targets, old, adv, **kwargs)
    leaf = old.clone().requires_grad_(True)
    with count_gemms() as counter:
        out = fk.linear_policy_loss(hidden, weight, targets, leaf, adv, **kwargs)
    n_chunks = -(-B * T // 4)
    assert counter.routes == ["stats"] and counter.total == n_chunks  # one GEMM per chunk, nothing for gradients
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logprobs, plain.logprobs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.entropy, plain.entropy, rtol=1e-6, atol=1e-7)
    for name in plain.metrics:
        torch.testing.assert_close(out.metrics[name], plain.metrics[name], rtol=1e-6, atol=1e-7)
    if out.loss.requires_grad:
        (grad,) = torch.autograd.grad(out.loss, leaf, allow_unused=True)
        assert grad is None or torch.equal(grad, torch.zeros_like(grad))
