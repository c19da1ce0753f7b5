"""What sits at masked positions never reaches a policy loss, and the no-grad inputs stay constants.

Real batches pad old / ref log-probs, advantages and importance weights with anything (0, +-1e4, +-inf,
NaN). For every loss type, the logits and lm_head paths on every CPU backend, and
``policy_loss_from_logprobs``: the loss, its gradient and the metrics with garbage at masked positions
equal those with clean values there, while NaN at an unmasked position still gives a NaN loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels.config import POLICY_LOSS_TYPES
from fastrl_kernels.testing.strategies import seeds
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends() + ["reference"]
GARBAGE = (0.0, -1e4, 1e4, -math.inf, math.inf, math.nan)
FIELDS = ("old_logprobs", "ref_logprobs", "advantages", "is_weights")
LOSS_TYPES = POLICY_LOSS_TYPES
OPTIONS = dict(kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)


def _batch(seed: int, b: int = 3, t: int = 6, v: int = 37, h: int = 8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) > 0.35
    mask[:, 0] = True
    mask[-1, t // 2:] = False  # a padded tail, as in a real batch
    old = -3.0 * torch.rand(b, t, generator=g)
    return dict(
        logits=2.0 * torch.randn(b, t, v, generator=g), hidden=torch.randn(b, t, h, generator=g),
        weight=torch.randn(v, h, generator=g) / math.sqrt(h), targets=torch.randint(0, v, (b, t), generator=g),
        mask=mask, old_logprobs=old, ref_logprobs=old + 0.2 * torch.randn(b, t, generator=g),
        advantages=torch.randn(b, t, generator=g), is_weights=0.5 + torch.rand(b, t, generator=g),
    )


def _run(path: str, backend: str, batch: dict, loss_type: str):
    """(loss, gradients, metrics) of one policy loss on ``batch``."""
    args = {k: batch[k] for k in FIELDS}
    if path == "logits":
        leaf = batch["logits"].clone().requires_grad_(True)
        out = fk.policy_loss(leaf, batch["targets"], mask=batch["mask"], backend=backend, loss_type=loss_type,
                             **args, **OPTIONS)
        leaves = (leaf,)
    else:
        hidden = batch["hidden"].clone().requires_grad_(True)
        weight = batch["weight"].clone().requires_grad_(True)
        out = fk.linear_policy_loss(hidden, weight, batch["targets"], mask=batch["mask"], backend=backend,
                                    loss_type=loss_type, **args, **OPTIONS)
        leaves = (hidden, weight)
    grads = torch.autograd.grad(out.loss, leaves)
    return out.loss.detach(), grads, out.metrics


def _assert_same(clean, dirty, what):
    assert torch.equal(clean[0], dirty[0]), f"{what}: loss {dirty[0]} vs {clean[0]}"
    for a, b in zip(clean[1], dirty[1]):
        assert torch.equal(a, b), f"{what}: gradient differs"
    for key, value in clean[2].items():
        assert torch.equal(value, dirty[2][key]), f"{what}: metric {key} {dirty[2][key]} vs {value}"


@pytest.mark.parametrize("path", ["logits", "lm_head"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_garbage_value_at_masked_positions_is_ignored(path, backend, loss_type):
    """Each field, each garbage value, one at a time: the same loss, gradient and metrics, bit for bit."""
    batch = _batch(1)
    clean = _run(path, backend, batch, loss_type)
    assert torch.isfinite(clean[0])
    for field in FIELDS:
        for garbage in GARBAGE:
            dirty_batch = dict(batch, **{field: batch[field].masked_fill(~batch["mask"], garbage)})
            _assert_same(clean, _run(path, backend, dirty_batch, loss_type), f"{field}={garbage}")


@settings(max_examples=30)
@given(seed=seeds(), backend=st.sampled_from(BACKENDS), loss_type=st.sampled_from(LOSS_TYPES),
       path=st.sampled_from(["logits", "lm_head"]),
       garbage=st.fixed_dictionaries({f: st.sampled_from(GARBAGE) for f in FIELDS}),
       per_sequence=st.booleans())
def test_garbage_in_every_field_at_once_is_ignored(seed, backend, loss_type, path, garbage, per_sequence):
    """Every field padded at once, per-token or per-sequence advantages (a fully masked sequence may
    carry a garbage advantage)."""
    batch = _batch(seed)
    if per_sequence:
        batch["advantages"] = batch["advantages"][:, 0].clone()
        batch["mask"][-1] = False  # the last sequence is all padding
    clean = _run(path, backend, batch, loss_type)
    _assert_same(clean, _run(path, backend, padded_with(batch, garbage, per_sequence), loss_type), str(garbage))


def padded_with(batch: dict, garbage: dict, per_sequence: bool) -> dict:
    """``batch`` with ``garbage[field]`` at every masked position of each field (per-sequence
    advantages: in the last, fully masked sequence)."""
    dirty = dict(batch)
    for field, value in garbage.items():
        if field == "advantages" and per_sequence:
            dirty[field] = batch[field].clone()
            dirty[field][-1] = value
        else:
            dirty[field] = batch[field].masked_fill(~batch["mask"], value)
    return dirty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field", FIELDS)
def test_nan_at_an_unmasked_position_gives_a_nan_loss(backend, field):
    batch = _batch(2)
    batch[field] = batch[field].clone()
    batch[field][0, 0] = math.nan  # mask[:, 0] is True
    loss, _, _ = _run("logits", backend, batch, "clip")
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_without_gradient_stay_constants_when_they_require_grad(backend):
    """old / ref log-probs, advantages and is_weights are constants of the loss: their requires_grad
    is ignored and the logits gradient is the one of detached inputs."""
    batch = _batch(3)
    clean = _run("logits", backend, batch, "clip")
    live = dict(batch, **{k: batch[k].clone().requires_grad_(True) for k in FIELDS})
    leaf = batch["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(leaf, batch["targets"], mask=batch["mask"], backend=backend, loss_type="clip",
                         **{k: live[k] for k in FIELDS}, **OPTIONS)
    assert out.loss.grad_fn is not None
    out.loss.backward()
    for field in FIELDS:
        assert live[field].grad is None, f"{field} received a gradient"
    assert torch.equal(leaf.grad, clean[1][0])


# policy_loss_from_logprobs: garbage in logp / entropy too, and the checks of policy_loss.


def _logprob_batch(seed=4):
    batch = _batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    logp = -3.0 * torch.rand(batch["mask"].shape, generator=g)
    return logp, 2.0 * torch.rand(logp.shape, generator=g), batch


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_from_logprobs_ignores_garbage_at_masked_positions(loss_type, garbage):
    logp, entropy, batch = _logprob_batch()
    mask = batch["mask"]

    def run(lp, h, fields):
        lp, h = lp.clone().requires_grad_(True), h.clone().requires_grad_(True)
        loss, metrics = fk.policy_loss_from_logprobs(lp, h, fields["old_logprobs"], fields["advantages"], mask,
                                                     fields["ref_logprobs"], fields["is_weights"],
                                                     loss_type=loss_type, **OPTIONS)
        return loss.detach(), torch.autograd.grad(loss, (lp, h), allow_unused=True), metrics

    clean_fields = {k: batch[k] for k in FIELDS}
    clean = run(logp, entropy, clean_fields)
    dirty_fields = {k: v.masked_fill(~mask, garbage) for k, v in clean_fields.items()}
    dirty = run(logp.masked_fill(~mask, garbage), entropy.masked_fill(~mask, garbage), dirty_fields)
    assert torch.equal(clean[0], dirty[0])
    for a, b in zip(clean[1], dirty[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    for key, value in clean[2].items():
        assert torch.equal(value, dirty[2][key]), key


def test_from_logprobs_without_mask_means_every_token():
    logp, entropy, batch = _logprob_batch()
    args = (logp, entropy, batch["old_logprobs"], batch["advantages"])
    loss, _ = fk.policy_loss_from_logprobs(*args)
    ones, _ = fk.policy_loss_from_logprobs(*args, torch.ones_like(logp, dtype=torch.bool))
    assert torch.equal(loss, ones)


def test_from_logprobs_per_sequence_advantages_when_b_equals_t():
    """[B] advantages are per sequence also when B == T, as in policy_loss."""
    g = torch.Generator().manual_seed(5)
    logp, old = -torch.rand(4, 4, generator=g), -torch.rand(4, 4, generator=g)
    adv = torch.randn(4, generator=g)
    loss, _ = fk.policy_loss_from_logprobs(logp, logp.abs(), old, adv)
    per_token, _ = fk.policy_loss_from_logprobs(logp, logp.abs(), old, adv[:, None].expand(4, 4))
    transposed, _ = fk.policy_loss_from_logprobs(logp, logp.abs(), old, adv[None, :].expand(4, 4))
    assert torch.equal(loss, per_token) and not torch.equal(loss, transposed)


@pytest.mark.parametrize("bad, match", [
    (dict(old_logprobs=torch.zeros(3, 5)), r"^old_logprobs: expected shape \(3, 6\)"),
    (dict(ref_logprobs=torch.zeros(6, 3)), r"^ref_logprobs: expected shape \(3, 6\)"),
    (dict(is_weights=torch.zeros(3)), r"^is_weights: expected shape \(3, 6\)"),
    (dict(advantages=torch.zeros(6)), r"^advantages: expected shape \(3, 6\) per token or \(3,\) per sequence"),
    (dict(mask=torch.ones(3, 5)), r"^mask: expected shape \(3, 6\)"),
    (dict(entropy=torch.zeros(3, 5)), r"^entropy: expected shape \(3, 6\)"),
    (dict(entropy=None), r"^entropy: required when entropy_mode='exact'"),
    (dict(kl_coef=0.1, ref_logprobs=None), r"^ref_logprobs: required when kl_coef != 0"),
    (dict(old_logprobs=torch.zeros(3, 6, dtype=torch.long)), r"^old_logprobs: expected dtype"),
    (dict(logp=torch.zeros(2, 3, 6)), r"^logp: expected shape \[B, T\] or \[N\]"),
])
def test_from_logprobs_checks_like_policy_loss(bad, match):
    logp, entropy, batch = _logprob_batch()
    kwargs = dict(logp=logp, entropy=entropy, old_logprobs=batch["old_logprobs"], advantages=batch["advantages"],
                  mask=batch["mask"], ref_logprobs=batch["ref_logprobs"])
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fk.policy_loss_from_logprobs(**kwargs)


def test_from_logprobs_sampled_entropy_needs_no_entropy():
    logp, _, batch = _logprob_batch()
    loss, metrics = fk.policy_loss_from_logprobs(logp, None, batch["old_logprobs"], batch["advantages"],
                                                 batch["mask"], entropy_mode="sampled", entropy_coef=0.1)
    with_h, _ = fk.policy_loss_from_logprobs(logp, -logp, batch["old_logprobs"], batch["advantages"],
                                             batch["mask"], entropy_mode="exact", entropy_coef=0.1)
    assert torch.equal(loss, with_h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_weighting", [False, True])
def test_fused_dpo_ignores_any_logits_at_masked_positions(backend, use_weighting):
    """Padding tokens of a DPO batch may hold any logits (NaN included): loss and gradient unchanged."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 6, 30, generator=g)
    targets = torch.randint(0, 30, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:, 0] = True
    results = []
    for z in (logits, logits.masked_fill(~mask[..., None], math.nan)):
        leaf = z.clone().requires_grad_(True)
        out = fk.fused_dpo_loss(leaf, targets, mask, torch.zeros(2), torch.zeros(2), backend=backend,
                                use_weighting=use_weighting)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        results.append((out.loss.detach(), grad.masked_fill(~mask[..., None], 0.0), grad[~mask]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert bool((results[1][2] == 0).all())


def test_reference_dpo_without_smoothing_has_a_zero_loss_at_an_impossible_rejected_answer():
    """-log sigmoid(h) -> 0 as h -> +inf (rejected log-prob -inf); no 0 * log sigmoid(-inf) = NaN."""
    from fastrl_kernels.reference.dpo import dpo_loss as reference_dpo_loss

    zero = torch.zeros(1, dtype=torch.float64)
    losses = reference_dpo_loss(zero, torch.full((1,), -math.inf, dtype=torch.float64), zero, zero)[0]
    assert torch.equal(losses, torch.zeros_like(losses))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip", "gspo"])
def test_policy_loss_ignores_any_logits_at_masked_positions(backend, loss_type):
    batch = _batch(8)
    clean = _run("logits", backend, batch, loss_type)
    dirty = _run("logits", backend, dict(batch, logits=batch["logits"].masked_fill(~batch["mask"][..., None],
                                                                                   math.nan)), loss_type)
    _assert_same(clean, dirty, "NaN logits at masked tokens")
