"""The logit transform (temperature, logit_scale, softcap) and ignore_index reach every op on logits or
hidden states: the DPO ops against the float64 formulas of ``reference.dpo`` under a scale and a
softcap, and the temperature given once to the policy ops (config field or keyword, never two
different values)."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.reference import dpo as ref
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()
TRANSFORM = dict(temperature=0.8, logit_scale=1.7, softcap=6.0, ignore_index=-1)


def _pairs(seed, batch=2, steps=5, vocab=53, hidden_size=8):
    """hidden ``[2B, T, H]``, an lm_head (weight, bias), targets with ignored entries, a mask with prompt
    tokens, and reference sequence log-probs near the policy's (rewards of O(1))."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * batch, steps, hidden_size, generator=g)
    weight = 3.0 * torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5
    bias = torch.randn(vocab, generator=g)
    targets = torch.randint(0, vocab, (2 * batch, steps), generator=g)
    targets[0, -1] = targets[-1, 2] = TRANSFORM["ignore_index"]
    mask = torch.ones(2 * batch, steps, dtype=torch.bool)
    mask[:, :2] = False  # prompt tokens
    logits = _logits(hidden.double(), weight.double(), bias.double())
    seq = ref.sequence_logprobs(logits, targets, mask, **TRANSFORM)
    ref_logps = (seq + torch.rand(2 * batch, generator=g, dtype=torch.float64) - 0.5).float()
    return hidden, weight, bias, targets, mask, ref_logps[:batch], ref_logps[batch:]


def _logits(hidden, weight, bias):
    return hidden @ weight.t() + bias


def _reference(logits, targets, mask, ref_c, ref_r, cfg: fk.DPOConfig):
    """(policy sequence log-probs [2B], mean pair loss) of ``reference.dpo`` in float64."""
    seq = ref.sequence_logprobs(logits, targets, mask, ld_alpha=cfg.ld_alpha, **TRANSFORM)
    half = seq.shape[0] // 2
    weights = ref.wpo_weights(logits, targets, mask, **TRANSFORM) if cfg.use_weighting else None
    losses, _, _ = ref.dpo_loss(seq[:half], seq[half:], ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                chosen_weights=None if weights is None else weights[:half],
                                rejected_weights=None if weights is None else weights[half:])
    return seq, losses.mean()


def _check(out, seq, loss, ref_c, ref_r, cfg, name):
    policy = torch.cat([out.chosen_rewards, out.rejected_rewards]).double() / cfg.beta + torch.cat([ref_c, ref_r])
    assert_close_to_reference(policy, seq, dtype=torch.float32, name=f"{name} rewards / beta + ref")
    assert_close_to_reference(out.loss, loss, dtype=torch.float32, name=f"{name} loss")


CONFIGS = [fk.DPOConfig(beta=0.2), fk.DPOConfig(loss_type="ipo", ld_alpha=0.5, use_weighting=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["sigmoid", "ipo_ld_wpo"])
def test_fused_dpo_loss_applies_scale_and_softcap(backend, cfg):
    hidden, weight, bias, targets, mask, ref_c, ref_r = _pairs(seed=1)
    logits = _logits(hidden, weight, bias).detach()
    x = logits.double().requires_grad_(True)
    seq, loss = _reference(x, targets, mask, ref_c, ref_r, cfg)
    loss.backward()
    z = logits.clone().requires_grad_(True)
    out = fk.fused_dpo_loss(z, targets, mask, ref_c, ref_r, config=cfg, backend=backend, **TRANSFORM)
    out.loss.backward()
    _check(out, seq.detach(), loss.detach(), ref_c, ref_r, cfg, f"fused_dpo_loss {backend}")
    assert_close_to_reference(z.grad, x.grad, dtype=torch.float32, kind="grad", name=f"{backend} d/dlogits")
    # the reference route takes the same options
    route = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, config=cfg, backend="reference", **TRANSFORM)
    _check(route, seq.detach(), loss.detach(), ref_c, ref_r, cfg, "fused_dpo_loss reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["sigmoid", "ipo_ld_wpo"])
def test_linear_dpo_loss_applies_scale_and_softcap(backend, cfg):
    hidden, weight, bias, targets, mask, ref_c, ref_r = _pairs(seed=2)
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    seq, loss = _reference(_logits(*leaves64), targets, mask, ref_c, ref_r, cfg)
    loss.backward()
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = fk.linear_dpo_loss(leaves[0], leaves[1], targets, mask, ref_c, ref_r, bias=leaves[2], config=cfg,
                             backend=backend, chunk_size=3, **TRANSFORM)
    out.loss.backward()
    _check(out, seq.detach(), loss.detach(), ref_c, ref_r, cfg, f"linear_dpo_loss {backend}")
    for name, leaf, leaf64 in zip(("hidden", "weight", "bias"), leaves, leaves64):
        assert_close_to_reference(leaf.grad, leaf64.grad, dtype=torch.float32, kind="grad", name=f"{backend} {name}")
    route = fk.linear_dpo_loss(hidden, weight, targets, mask, ref_c, ref_r, bias=bias, config=cfg,
                               backend="reference", **TRANSFORM)
    _check(route, seq.detach(), loss.detach(), ref_c, ref_r, cfg, "linear_dpo_loss reference")


def test_dpo_transform_defaults_are_the_identity():
    hidden, weight, bias, targets, mask, ref_c, ref_r = _pairs(seed=3)
    logits = _logits(hidden, weight, bias)
    plain = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, backend="torch", ignore_index=-1)
    explicit = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, backend="torch", ignore_index=-1,
                                 temperature=1.0, logit_scale=1.0, softcap=None)
    scaled = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, backend="torch", ignore_index=-1,
                               logit_scale=1.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, explicit))
    assert not torch.equal(plain.loss, scaled.loss)


@pytest.mark.parametrize("op", ["fused_dpo_loss", "linear_dpo_loss"])
@pytest.mark.parametrize("option, value", [("logit_scale", 0.0), ("softcap", float("inf")), ("softcap", -2.0)])
def test_dpo_transform_options_are_checked(op, option, value):
    hidden, weight, bias, targets, mask, ref_c, ref_r = _pairs(seed=4)
    first = (_logits(hidden, weight, bias),) if op == "fused_dpo_loss" else (hidden, weight)
    with pytest.raises(ValueError, match=f"^{option}: expected"):
        getattr(fk, op)(*first, targets, mask, ref_c, ref_r, backend="torch", ignore_index=-1, **{option: value})


@pytest.mark.parametrize("op", ["fused_dpo_loss", "linear_dpo_loss"])
def test_dpo_ops_never_read_prompt_rows(op):
    # Prompt tokens are ignored rows: whatever their logits hold, the loss is that of finite ones.
    hidden, weight, bias, targets, mask, ref_c, ref_r = _pairs(seed=5)
    poisoned = hidden.clone()
    poisoned[1, 0] = float("nan")
    assert not mask[1, 0]
    results = []
    for h in (hidden.clone().index_put_((torch.tensor(1), torch.tensor(0)), torch.zeros(8)), poisoned):
        first = (_logits(h, weight, bias),) if op == "fused_dpo_loss" else (h, weight)
        extra = {} if op == "fused_dpo_loss" else dict(bias=bias)
        results.append(getattr(fk, op)(*first, targets, mask, ref_c, ref_r, backend="torch", **extra, **TRANSFORM))
    assert torch.isfinite(results[1].loss)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _policy_problem(seed=6):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(31, 8, generator=g)
    targets = torch.randint(0, 31, (2, 4), generator=g)
    old = torch.randn(2, 4, generator=g) - 3.0
    return hidden, weight, targets, old, torch.randn(2, generator=g)


def _policy_op(op):
    hidden, weight, targets, old, adv = _policy_problem()
    if op == "policy_loss":
        logits = hidden @ weight.t()
        return lambda **kw: fk.policy_loss(logits, targets, old, adv, backend="torch", **kw)
    return lambda **kw: fk.linear_policy_loss(hidden, weight, targets, old, adv, backend="torch", **kw)


@pytest.mark.parametrize("op", ["policy_loss", "linear_policy_loss"])
def test_policy_temperature_given_twice_differently_is_refused(op):
    call = _policy_op(op)
    with pytest.raises(ValueError, match=r"^temperature: given twice with different values, 0\.5 in config and "
                                         r"0\.7 as a keyword; give it once"):
        call(config=fk.PolicyLossConfig(temperature=0.5), temperature=0.7)


@pytest.mark.parametrize("op", ["policy_loss", "linear_policy_loss"])
def test_policy_temperature_keyword_and_config_field_agree(op):
    call = _policy_op(op)
    from_config = call(config=fk.PolicyLossConfig(temperature=0.7, kl_coef=0.0))
    for other in (call(temperature=0.7),                                               # keyword alone
                  call(config=fk.PolicyLossConfig(), temperature=0.7),                 # over the default
                  call(config=fk.PolicyLossConfig(temperature=0.7), temperature=0.7)):  # the same value twice
        assert torch.equal(other.loss, from_config.loss) and torch.equal(other.logprobs, from_config.logprobs)
    assert not torch.equal(call().loss, from_config.loss)
    with pytest.raises(ValueError, match="^temperature: expected a finite number > 0"):
        call(temperature=float("nan"))
