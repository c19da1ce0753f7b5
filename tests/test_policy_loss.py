import dataclasses

import pytest
import torch
from hypothesis import given, settings

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.testing import assert_close_to_reference, coefficient_scale, policy_configs, policy_inputs
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()
LOSS_TYPES = ("clip", "gspo", "gspo_token", "cispo", "sapo")


def _run(backend, inputs, config, **extra):
    logits = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(
        logits, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend, **extra,
    )
    out.loss.backward()
    return out, logits.grad


def _reference(inputs, config, **extra):
    logits = inputs["logits"].detach().to(torch.float64).requires_grad_(True)
    loss, logp, entropy, metrics = reference.policy_loss(
        logits, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        ref_logprobs=inputs["ref_logprobs"], config=config, **extra,
    )
    loss.backward()
    return loss, logp, entropy, metrics, logits.grad, _term_scales(inputs, config, **extra)


def _term_scales(inputs, config, **extra):
    """Sum over the loss's three terms (policy, KL, entropy bonus) of each one's |dL/dlogp| + |dL/dH|:
    the size of what float32 algebra adds up per token, even where the terms cancel (asserts.py)."""
    zero_adv = torch.zeros_like(inputs["advantages"])
    scale = 0.0
    for advantages, kl_coef, entropy_coef in ((inputs["advantages"], 0.0, 0.0), (zero_adv, config.kl_coef, 0.0),
                                              (zero_adv, 0.0, config.entropy_coef)):
        term = dataclasses.replace(config, kl_coef=kl_coef, entropy_coef=entropy_coef)
        loss, logp, entropy, _ = reference.policy_loss(
            inputs["logits"].detach().to(torch.float64).requires_grad_(True), inputs["targets"],
            inputs["old_logprobs"], advantages, inputs["mask"], ref_logprobs=inputs["ref_logprobs"], config=term,
            **extra,
        )
        scale = scale + coefficient_scale(loss, logp, entropy)
    return scale


def _compare(backend, inputs, config, **extra):
    dtype = inputs["logits"].dtype
    out, grad = _run(backend, inputs, config, **extra)
    loss, logp, entropy, metrics, ref_grad, scale = _reference(inputs, config, **extra)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_to_reference(out.loss, loss, dtype=dtype, name=f"{backend} {config.loss_type} loss")
    assert_close_to_reference(out.logprobs, logp, dtype=dtype, name="logprobs")
    assert_close_to_reference(out.entropy, entropy, dtype=dtype, name="entropy")
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        if key in ("clip_frac_low", "clip_frac_high"):
            continue  # a ratio within rounding of the clip boundary may fall on either side
        assert_close_to_reference(out.metrics[key], value, dtype=dtype, name=f"metric {key}")
    assert_close_to_reference(grad, ref_grad, dtype=dtype, kind="grad", name=f"{backend} {config.loss_type} grad",
                              row_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@given(inputs=policy_inputs(), config=policy_configs())
def test_fp32_matches_reference_for_every_option(backend, inputs, config):
    _compare(backend, inputs, config)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15)
@given(inputs=policy_inputs(dtypes=(torch.bfloat16,)), config=policy_configs(loss_types=("clip", "cispo", "sapo")))
def test_bf16_logits_match_reference_on_rounded_inputs(backend, inputs, config):
    _compare(backend, inputs, config)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(inputs=policy_inputs(), config=policy_configs())
def test_normalizer_and_is_weights(backend, inputs, config):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(inputs["old_logprobs"].shape, generator=g) * 2
    _compare(backend, inputs, config, normalizer=7.0, is_weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_gives_zero_loss_and_zero_grads(backend, loss_type):
    logits = torch.randn(2, 4, 33, requires_grad=True)
    targets = torch.randint(0, 33, (2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "sum"):
        out = fk.policy_loss(logits, targets, torch.randn(2, 4), torch.randn(2), mask, ref_logprobs=torch.randn(2, 4),
                             loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, backend=backend)
        out.loss.backward()
        assert out.loss == 0 and not torch.isnan(out.loss)
        assert (logits.grad == 0).all()
        assert all(torch.isfinite(v) for v in out.metrics.values())
        logits.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_overwrites_logits_with_the_same_gradient(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 301, generator=g)
    targets = torch.randint(0, 301, (3, 7), generator=g)
    args = (targets, torch.randn(3, 7, generator=g) - 5, torch.randn(3, generator=g))
    leaf = logits.clone().requires_grad_(True)
    expected = fk.policy_loss(leaf, *args, backend=backend, entropy_coef=0.1)
    expected.loss.backward()
    buffer = logits.clone()
    hidden = buffer.clone().requires_grad_(True)
    produced = hidden * 1.0  # a non-leaf whose storage the gradient may overwrite
    out = fk.policy_loss(produced, *args, backend=backend, entropy_coef=0.1, inplace_grad=True)
    out.loss.backward()
    assert_close_to_reference(out.loss, expected.loss, dtype=torch.float32)
    assert_close_to_reference(hidden.grad, leaf.grad, dtype=torch.float32, kind="grad")
    assert torch.equal(produced.detach(), hidden.grad)  # the logits now hold the gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_returned_logprobs_can_feed_another_loss(backend):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 40, generator=g)
    targets = torch.randint(0, 40, (2, 5), generator=g)
    old, adv = torch.randn(2, 5, generator=g) - 3, torch.randn(2, generator=g)
    z = logits.clone().requires_grad_(True)
    out = fk.policy_loss(z, targets, old, adv, backend=backend)
    (out.loss + 0.3 * out.logprobs.sum() + 0.2 * out.entropy.sum()).backward()
    z64 = logits.double().requires_grad_(True)
    loss, logp, entropy, _ = reference.policy_loss(z64, targets, old, adv)
    (loss + 0.3 * logp.sum() + 0.2 * entropy.sum()).backward()
    assert_close_to_reference(z.grad, z64.grad, dtype=torch.float32, kind="grad")


def test_second_backward_is_refused():
    z = torch.randn(4, 9, requires_grad=True)
    out = fk.policy_loss(z, torch.randint(0, 9, (4,)), torch.randn(4), torch.randn(4), backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was already run"):
        out.loss.backward()


def test_scaled_backward_scales_the_gradient():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 30, generator=g)
    args = (torch.randint(0, 30, (6,), generator=g), torch.randn(6, generator=g) - 3, torch.randn(6, generator=g))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fk.policy_loss(a, *args, backend="torch").loss.backward()
    (fk.policy_loss(b, *args, backend="torch").loss * 2.5).backward()
    torch.testing.assert_close(b.grad, 2.5 * a.grad)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages: expected shape \(2, 4\) per token or \(2,\)"),
        (dict(old_logprobs=torch.zeros(2, 3)), ValueError, r"old_logprobs: expected shape \(2, 4\)"),
        (dict(mask=torch.ones(2, 5)), ValueError, r"mask: expected shape \(2, 4\)"),
        (dict(kl_coef=0.1), ValueError, "ref_logprobs: required when kl_coef"),
        (dict(loss_type="ppo2"), ValueError, "loss_type: expected one of"),
        (dict(loss_agg="mean"), ValueError, "loss_agg: expected one of"),
        (dict(kl_estimator="k4", ref_logprobs=torch.zeros(2, 4)), ValueError, "kl_estimator"),
        (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low: expected a number >= 0"),
        (dict(bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
        (dict(old_logprobs=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "old_logprobs: expected dtype"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    args = dict(logits=torch.zeros(2, 4, 10), targets=torch.zeros(2, 4, dtype=torch.int64),
                old_logprobs=torch.zeros(2, 4), advantages=torch.zeros(2, 4), mask=None)
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        fk.policy_loss(*args.values(), backend="torch", **options)


def test_trl_and_verl_aggregation_names_are_aliases():
    g = torch.Generator().manual_seed(6)
    inputs = (torch.randn(3, 4, 20, generator=g), torch.randint(0, 20, (3, 4), generator=g),
              torch.randn(3, 4, generator=g) - 3, torch.randn(3, generator=g), torch.rand(3, 4, generator=g) > 0.3)
    for alias, canonical in (("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"), ("dr_grpo",
                             "seq-mean-token-sum-norm")):
        a = fk.policy_loss(*inputs, loss_agg=alias, backend="torch").loss
        b = fk.policy_loss(*inputs, loss_agg=canonical, backend="torch").loss
        assert torch.equal(a, b)


def test_runs_inside_torch_compile_with_one_graph_break():
    """fullgraph=True is not supported (the fused Function differentiates a sub-graph in its forward);
    the op runs eagerly at a graph break and the rest of the compiled function around it still works."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 61, generator=g)
    args = (torch.randint(0, 61, (2, 5), generator=g), torch.randn(2, 5, generator=g) - 4, torch.randn(2, generator=g))
    config = fk.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.01)

    def step(z):
        out = fk.policy_loss(z * 1.5, *args, config=config, backend="torch")
        return out.loss * 2.0

    eager_z = logits.clone().requires_grad_(True)
    step(eager_z).backward()
    compiled_z = logits.clone().requires_grad_(True)
    torch.compile(step, backend="eager")(compiled_z).backward()
    torch.testing.assert_close(compiled_z.grad, eager_z.grad)
