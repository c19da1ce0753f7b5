"""policy_loss passes every argument where it belongs: the backend asked for runs, backend="reference"
gets every option, the checks see ignore_index, is_weights and the normalizer."""

from __future__ import annotations

import math

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import native, reference, torch_backend
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()
EVERY_OPTION = dict(loss_type="clip", clip_eps_low=0.1, clip_eps_high=0.3, kl_coef=0.05, kl_estimator="k1",
                    entropy_coef=0.02, loss_agg="seq-mean-token-sum", temperature=0.8)


def _batch(b=3, t=3, v=31, seed=95, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, 2] = ignore_index
    old = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) \
        + 0.3 * torch.randn(b, t, generator=g)
    mask = torch.ones(b, t)
    mask[1, 0] = 0
    return dict(logits=logits, targets=targets, old=old, adv=torch.randn(b, generator=g), mask=mask,
                ref=old - 0.2, is_weights=torch.rand(b, t, generator=g) + 0.5)


def test_the_reference_route_gets_every_option():
    x = _batch(ignore_index=-1)
    options = dict(ref_logprobs=x["ref"], normalizer=7.0, is_weights=x["is_weights"], ignore_index=-1,
                   logit_scale=0.7, softcap=4.0, **EVERY_OPTION)
    out = fk.policy_loss(x["logits"], x["targets"], x["old"], x["adv"], x["mask"], backend="reference", **options)
    loss, logp, entropy, metrics = reference.policy_loss(x["logits"].double(), x["targets"], x["old"], x["adv"],
                                                         x["mask"], **options)
    torch.testing.assert_close(out.loss, loss.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.logprobs, logp.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.entropy, entropy.float(), rtol=1e-6, atol=1e-7)
    assert set(out.metrics) == set(metrics)
    for name, value in metrics.items():
        torch.testing.assert_close(out.metrics[name], value.float(), rtol=1e-6, atol=1e-7)
    # every option changes this loss: dropping any one of them would be seen
    for name, plain in [("ref_logprobs", None), ("normalizer", None), ("is_weights", None), ("logit_scale", 1.0),
                        ("softcap", None), ("mask", None)]:
        changed = {**options, name: plain} if name != "mask" else options
        mask = None if name == "mask" else x["mask"]
        if name == "ref_logprobs":
            changed["kl_coef"] = 0.0
        other, _, _, _ = reference.policy_loss(x["logits"].double(), x["targets"], x["old"], x["adv"], mask, **changed)
        assert not math.isclose(other.item(), loss.item(), rel_tol=1e-6), name


@pytest.mark.parametrize("asked", BACKENDS)
def test_the_backend_asked_for_runs(asked, monkeypatch):
    calls = []
    for name, module in (("torch", torch_backend), ("native", native)):
        for primitive in ("stats", "grad"):
            original = getattr(module, primitive)
            monkeypatch.setattr(module, primitive,
                                lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    x = _batch()
    leaf = x["logits"].clone().requires_grad_(True)
    fk.policy_loss(leaf, x["targets"], x["old"], x["adv"], x["mask"], backend=asked).loss.backward()
    assert calls and set(calls) == {asked}


def test_the_checks_see_ignore_index_is_weights_and_the_normalizer():
    x = _batch(ignore_index=-1)
    out = fk.policy_loss(x["logits"], x["targets"], x["old"], x["adv"], x["mask"], ignore_index=-1, backend="torch")
    assert torch.isfinite(out.loss)  # -1 targets accepted as ignore_index
    with pytest.raises(ValueError, match="^is_weights: "):
        fk.policy_loss(x["logits"], x["targets"].clamp(min=0), x["old"], x["adv"], x["mask"],
                       is_weights=x["is_weights"][:, :2], backend="torch")
    with pytest.raises(ValueError, match="^normalizer: "):
        fk.policy_loss(x["logits"], x["targets"].clamp(min=0), x["old"], x["adv"], x["mask"], normalizer=float("nan"),
                       backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_strided_along_the_vocabulary_give_the_contiguous_results(backend):
    # Every other column of a wider tensor: rows of stride 2 in V, which the kernels read as a contiguous copy.
    x = _batch()
    wide = torch.randn(3, 3, 62, generator=torch.Generator().manual_seed(96))
    wide[..., ::2] = x["logits"]
    strided = wide[..., ::2]
    assert strided.stride(-1) == 2
    results = []
    for logits in (strided, strided.contiguous()):
        leaf = logits.detach().clone() if logits.is_contiguous() else wide.clone()[..., ::2]
        leaf.requires_grad_(True)
        out = fk.policy_loss(leaf, x["targets"].clamp(min=0), x["old"], x["adv"], x["mask"], backend=backend,
                             kl_coef=0.05, ref_logprobs=x["ref"])
        (grad,) = torch.autograd.grad(out.loss, leaf)
        dpo = fk.fused_dpo_loss(leaf.detach()[:2], x["targets"].clamp(min=0)[:2], None, torch.zeros(1),
                                torch.zeros(1), backend=backend)
        results.append((out.loss, out.logprobs, grad, dpo.loss))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_gradient_lands_in_logits_whose_rows_are_strided(backend):
    # The first 31 columns of a wider tensor: unit stride along V, rows 62 apart; no copy is needed, so
    # inplace_grad writes the gradient into the caller's tensor itself.
    x = _batch()
    wide = torch.zeros(3, 3, 62)
    wide[..., :31] = x["logits"]
    view = wide[..., :31]
    kwargs = dict(backend=backend, kl_coef=0.05, ref_logprobs=x["ref"])
    leaf = x["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(leaf, x["targets"].clamp(min=0), x["old"], x["adv"], x["mask"], **kwargs)
    (expected,) = torch.autograd.grad(out.loss, leaf)
    view.requires_grad_(True)
    out = fk.policy_loss(view, x["targets"].clamp(min=0), x["old"], x["adv"], x["mask"], inplace_grad=True, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, view)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(wide[..., :31], expected, rtol=1e-6, atol=1e-8)  # written over the logits
    assert torch.equal(wide[..., 31:], torch.zeros(3, 3, 31))


def test_shape_errors_name_the_tensor_and_the_shapes_it_may_have():
    x = _batch()
    targets = x["targets"].clamp(min=0)
    with pytest.raises(ValueError, match=r"^ref_logprobs: expected shape \(3, 3\) \(the leading shape of logits\), "
                                         r"got \(3, 2\)$"):
        fk.policy_loss(x["logits"], targets, x["old"], x["adv"], x["mask"], ref_logprobs=x["ref"][:, :2],
                       backend="torch")
    with pytest.raises(ValueError, match=r"^advantages: expected shape \(3, 3\) per token or \(3,\) per sequence, "
                                         r"got \(2,\)$"):
        fk.policy_loss(x["logits"], targets, x["old"], x["adv"][:2], x["mask"], backend="torch")
    # flat tokens [N, V]: no sequences, so per token only
    with pytest.raises(ValueError, match=r"^advantages: expected shape \(9,\) per token, got \(3,\)$"):
        fk.policy_loss(x["logits"].reshape(9, 31), targets.reshape(9), x["old"].reshape(9), x["adv"], None,
                       backend="torch")


def test_advantages_of_a_wrong_dtype_or_device_are_refused_by_name():
    x = _batch()
    targets = x["targets"].clamp(min=0)
    with pytest.raises(TypeError, match=r"^advantages: expected dtype in .*, got torch\.int64$"):
        fk.policy_loss(x["logits"], targets, x["old"], x["adv"].long(), x["mask"], backend="torch")
    with pytest.raises(ValueError, match=r"^advantages: expected a tensor on cpu like logits, got meta$"):
        fk.policy_loss(x["logits"], targets, x["old"], x["adv"].to("meta"), x["mask"], backend="torch")


def test_device_errors_name_the_tensor_to_follow_on_every_entry_point():
    # logits for policy_loss, logp for policy_loss_from_logprobs, hidden for linear_policy_loss
    x = _batch()
    meta_adv = x["adv"].to("meta")
    with pytest.raises(ValueError, match=r"like logp, got meta$"):
        fk.policy_loss_from_logprobs(x["old"], None, x["old"], meta_adv, x["mask"], entropy_mode="sampled")
    hidden, weight = torch.randn(3, 3, 5), torch.randn(31, 5)
    with pytest.raises(ValueError, match=r"like hidden, got meta$"):
        fk.linear_policy_loss(hidden, weight, x["targets"].clamp(min=0), x["old"], meta_adv, backend="torch")


@pytest.mark.parametrize("name", ["old_logprobs", "ref_logprobs", "is_weights", "normalizer"])
def test_each_loss_input_on_another_device_is_refused_by_name(name):
    x = _batch()
    args = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], is_weights=x["is_weights"], normalizer=torch.tensor(7.0))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on cpu like logits, got meta$"):
        fk.policy_loss(x["logits"], x["targets"].clamp(min=0), args["old_logprobs"], x["adv"], x["mask"],
                       ref_logprobs=args["ref_logprobs"], is_weights=args["is_weights"], normalizer=args["normalizer"],
                       backend="torch")
