"""linear_policy_loss (the lm_head policy loss) against reference.policy_loss on the logits and against the
logits path: routes and GEMM counts, every option, half precision, logit transforms and ignore_index, masked
batches, incoming gradients, extra uses of the outputs, constant loss inputs, a frozen weight, torch.no_grad,
and the Triton kernels under the interpreter."""

import dataclasses
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.losses.policy_types import POLICY_LOSSES
from fastrl_kernels.ops import linear_chunks
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.testing import assert_close_to_reference, coefficient_scale, policy_configs
from fastrl_kernels.testing.strategies import masks, seeds, vocab_sizes
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples
from tests.test_linear import (
    HIDDEN_SIZES,
    TRANSFORMS,
    _assert_grads,
    _chain,
    _chain_scales,
    _check_token_logprobs,
    _chunks,
    _leaves,
    _problem,
    _reference_logits,
)
from tests.test_policy_loss import _assert_loss_close, _loss_scale

BACKENDS = cpu_fused_backends()
# Types with a per-token ratio take the one-sweep route: the loss is a sum of per-token terms.
SEPARABLE = tuple(name for name, kind in POLICY_LOSSES.items() if kind.ratio == "token")


def _policy_case(data, dtype=torch.float32, loss_types=fk.config.POLICY_LOSS_TYPES):
    batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    hidden_size, vocab, seed = data.draw(HIDDEN_SIZES), data.draw(vocab_sizes(300)), data.draw(seeds())
    hidden, weight, bias, targets = _problem((batch, length), hidden_size, vocab, seed, dtype,
                                             with_bias=data.draw(st.booleans()))
    logits = _reference_logits(hidden, weight, bias)
    g = torch.Generator().manual_seed(seed + 1)
    logp, _ = reference.token_logprobs(logits.detach(), targets)
    old = (logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    per_sequence = data.draw(st.booleans())
    advantages = torch.randn((batch,) if per_sequence else (batch, length), generator=g)
    extra = {}
    if data.draw(st.booleans()):
        extra["is_weights"] = torch.rand((batch, length), generator=g) + 0.5
    if data.draw(st.booleans()):
        extra["normalizer"] = float(data.draw(st.integers(1, 50)))
    inputs = dict(targets=targets, old_logprobs=old, advantages=advantages, mask=data.draw(masks((batch, length))),
                  ref_logprobs=ref, **extra)
    config = data.draw(policy_configs(loss_types=loss_types))
    chunk = data.draw(st.integers(1, batch * length + 3))
    return hidden, weight, bias, inputs, config, chunk


def _policy_coefficient_scale(logits, config, inputs, **options):
    """Per token, |dL/dlogp| + |dL/dH| of the policy, KL and entropy terms computed one at a time (they can
    cancel in the sum)."""
    zero_adv = torch.zeros_like(inputs["advantages"])
    scale = 0.0
    for advantages, kl_coef, entropy_coef in ((inputs["advantages"], 0.0, 0.0), (zero_adv, config.kl_coef, 0.0),
                                              (zero_adv, 0.0, config.entropy_coef)):
        term = dataclasses.replace(config, kl_coef=kl_coef, entropy_coef=entropy_coef)
        loss, logp, entropy, _ = reference.policy_loss(logits.detach().requires_grad_(True), config=term,
                                                       **(inputs | {"advantages": advantages}), **options)
        scale = scale + coefficient_scale(loss, logp, entropy)
    return scale


def _check_policy(hidden, weight, bias, inputs, config, chunk, backend="torch", **options):
    """linear_policy_loss vs reference.policy_loss on the logits: routes and GEMM counts, loss, logprobs,
    entropy, metrics and the hidden / weight / bias gradients. ``options``: ignore_index, logit_scale, softcap."""
    dtype = hidden.dtype
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_policy_loss(*leaves[:2], config=config, bias=leaves[2], backend=backend, chunk_size=chunk,
                                    **inputs, **options)
        out.loss.backward()
    n = _chunks(hidden.shape[0] * hidden.shape[1], chunk)
    if config.loss_type in SEPARABLE:
        assert counter.routes == ["fused"] and counter.total == 3 * n
    else:
        assert counter.routes == ["stats", "two_pass"] and counter.total == 4 * n
    logits = _reference_logits(hidden, weight, bias)
    loss, logp, entropy, metrics = reference.policy_loss(logits, config=config, **inputs, **options)
    loss.backward()
    name = f"{backend} {config.loss_type}/{config.loss_agg}"
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    # The loss is held to the size of its terms: the policy, KL and entropy terms can cancel in it.
    kept = inputs["mask"].to(torch.float64) * (inputs["targets"] != options.get("ignore_index", -100))
    loss_scale = _loss_scale(logp, entropy, inputs["old_logprobs"], inputs["advantages"], kept, inputs["ref_logprobs"],
                             config, normalizer=inputs.get("normalizer"), is_weights=inputs.get("is_weights"))
    _assert_loss_close(out.loss, loss, loss_scale, dtype=dtype, name=f"{name} loss")
    assert_close_to_reference(out.logprobs, logp, dtype=dtype, name="logprobs")
    assert_close_to_reference(out.entropy, entropy, dtype=dtype, name="entropy")
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        if key not in ("clip_frac_low", "clip_frac_high"):  # a ratio at the clip boundary may go either way
            assert_close_to_reference(out.metrics[key], value, dtype=dtype, name=f"metric {key}")
    coefficient = _policy_coefficient_scale(logits, config, inputs, **options)
    scales = _chain_scales(logits, inputs["targets"], coefficient, hidden, weight, temperature=config.temperature,
                           **options)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), dtype, name, scales)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(data=st.data())
def test_policy_loss_matches_reference_every_option(backend, data):
    _check_policy(*_policy_case(data), backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["clip", "gspo"])
def test_half_precision_matches_reference_on_rounded_logits(dtype, loss_type):
    hidden, weight, bias, targets = _problem((3, 11), 24, 317, seed=5, dtype=dtype)
    logits = _reference_logits(hidden, weight, bias).detach()
    logp, _ = reference.token_logprobs(logits, targets)
    inputs = dict(targets=targets, old_logprobs=(logp + 0.1).float(), advantages=torch.randn(3),
                  mask=torch.rand(3, 11) > 0.3, ref_logprobs=logp.float())
    config = fk.PolicyLossConfig(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01)
    _check_policy(hidden, weight, bias, inputs, config, chunk=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip", "gspo"])
@pytest.mark.parametrize("transform", ["logit_scale", "softcap", "all"])
def test_policy_loss_transform_and_ignore_index_match_reference(backend, loss_type, transform):
    options = dict(TRANSFORMS[transform])
    temperature = options.pop("temperature", 1.0)
    hidden, weight, bias, targets = _problem((3, 7), 16, 2100, seed=34, ignore_index=-1)
    logits = _reference_logits(hidden, weight, bias).detach()
    logp, _ = reference.token_logprobs(logits, targets, ignore_index=-1, temperature=temperature, **options)
    g = torch.Generator().manual_seed(34)
    inputs = dict(targets=targets, old_logprobs=(logp + 0.2 * torch.randn(3, 7, generator=g)).float(),
                  advantages=torch.randn(3, generator=g), mask=torch.rand(3, 7, generator=g) > 0.2,
                  ref_logprobs=(logp + 0.3 * torch.randn(3, 7, generator=g)).float())
    config = fk.PolicyLossConfig(loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, temperature=temperature)
    out = _check_policy(hidden, weight, bias, inputs, config, chunk=5, backend=backend, ignore_index=-1, **options)
    assert bool((out.logprobs[targets == -1] == 0).all())


def test_policy_loss_equals_logits_path_in_value():
    """Same stats code, same O(N) loss code: loss, logprobs and metrics equal the logits path's (fp32, torch)."""
    hidden, weight, bias, targets = _problem((2, 9), 16, 101, seed=3)
    old, adv = torch.full((2, 9), -4.6), torch.randn(2, generator=torch.Generator().manual_seed(3))
    kwargs = dict(mask=torch.rand(2, 9) > 0.2, ref_logprobs=old + 0.1, kl_coef=0.1, loss_type="sapo", backend="torch")
    out = fk.linear_policy_loss(hidden, weight, targets, old, adv, bias=bias, chunk_size=4, **kwargs)
    logits = torch.addmm(bias, hidden.view(18, 16), weight.t()).view(2, 9, -1)
    expected = fk.policy_loss(logits, targets, old, adv, **kwargs)
    torch.testing.assert_close(out.logprobs, expected.logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-7)
    for key, value in expected.metrics.items():
        torch.testing.assert_close(out.metrics[key], value, rtol=1e-6, atol=1e-7)


def test_all_masked_gives_zero_loss_and_zero_grads():
    hidden, weight, bias, targets = _problem((2, 5), 8, 50, seed=1)
    leaves = _leaves(hidden, weight, bias)
    out = fk.linear_policy_loss(*leaves[:2], targets, torch.zeros(2, 5), torch.ones(2), torch.zeros(2, 5),
                                bias=leaves[2], chunk_size=3, backend="torch")
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(bool((leaf.grad == 0).all()) for leaf in leaves)


def test_incoming_gradient_scales_and_second_backward_fails():
    hidden, weight, bias, targets = _problem((2, 6), 8, 40, seed=2)
    old, adv = torch.full((2, 6), -3.7), torch.randn(2)
    grads = []
    for scale in (1.0, 3.0):
        leaves = _leaves(hidden, weight, bias)
        out = fk.linear_policy_loss(*leaves[:2], targets, old, adv, bias=leaves[2], chunk_size=5, backend="torch")
        (scale * out.loss).backward(retain_graph=True)
        grads.append([leaf.grad for leaf in leaves])
        if scale == 3.0:
            with pytest.raises(RuntimeError, match="backward was already run"):
                out.loss.backward()
    for one, three in zip(*grads):
        torch.testing.assert_close(three, 3.0 * one, rtol=1e-6, atol=1e-7)


def test_logprobs_output_feeding_another_loss_gets_its_gradient():
    """Grad through the returned logprobs (another sweep in backward) adds to the loss gradient."""
    hidden, weight, bias, targets = _problem((2, 6), 8, 40, seed=4)
    old, adv = torch.full((2, 6), -3.7), torch.randn(2, 6)
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_policy_loss(*leaves[:2], targets, old, adv, bias=leaves[2], chunk_size=4, backend="torch")
        (out.loss + 0.5 * out.logprobs.sum() - 0.25 * out.entropy.sum()).backward()
    assert counter.routes == ["fused", "logprobs_backward"]
    logits = _reference_logits(hidden, weight, bias)
    loss, logp, entropy, _ = reference.policy_loss(logits, targets, old, adv)
    # The policy term's coefficients plus those of the two extra terms (0.5 and 0.25 per token).
    coefficient = coefficient_scale(loss, logp, entropy) + 0.75
    (loss + 0.5 * logp.sum() - 0.25 * entropy.sum()).backward()
    scales = _chain_scales(logits, targets, coefficient, hidden, weight)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), torch.float32, "extra logp grad", scales)


def test_loss_inputs_stay_constants_like_on_the_logits_path():
    """advantages / old log-probs that require grad get no gradient on either path (they are
    constants of the loss), and the weight gradient is that of detached inputs."""
    hidden, weight, bias, targets = _problem((2, 5), 8, 30, seed=6)
    for loss_type in ("clip", "gspo"):
        adv = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
        old = torch.full((2, 5), -3.4)
        live_adv, live_old = adv.clone().requires_grad_(True), old.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = fk.linear_policy_loss(hidden, w, targets, live_old, live_adv, bias=bias, chunk_size=3,
                                    backend="torch", loss_type=loss_type)
        out.loss.backward()
        assert live_adv.grad is None and live_old.grad is None
        detached = weight.clone().requires_grad_(True)
        fk.linear_policy_loss(hidden, detached, targets, old, adv, bias=bias, chunk_size=3, backend="torch",
                              loss_type=loss_type).loss.backward()
        assert torch.equal(w.grad, detached.grad)
        logits = torch.addmm(bias, hidden.view(10, 8), weight.t()).view(2, 5, -1).requires_grad_(True)
        expected_adv = adv.clone().requires_grad_(True)
        fk.policy_loss(logits, targets, old, expected_adv, backend="torch", loss_type=loss_type).loss.backward()
        assert expected_adv.grad is None


def test_frozen_weight_skips_weight_gemms():
    hidden, weight, bias, targets = _problem((12,), 8, 30, seed=7, with_bias=False)
    leaf = hidden.clone().requires_grad_(True)
    with count_gemms() as counter:
        fk.linear_policy_loss(leaf, weight, targets, torch.full((12,), -3.4), torch.randn(12), chunk_size=5,
                              backend="torch").loss.backward()
    assert (counter.logits, counter.grad_hidden, counter.grad_weight) == (3, 3, 0)
    assert leaf.grad is not None and weight.grad is None


@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss"])
def test_no_grad_runs_stats_only_and_allocates_no_grad_buffers(op, monkeypatch):
    rows, vocab, hidden_size, chunk = 64, 5000, 32, 16
    hidden, weight, bias, targets = _problem((rows,), hidden_size, vocab, seed=8)
    leaves = _leaves(hidden, weight, bias)

    def forbidden(*args, **kwargs):
        raise AssertionError("a gradient buffer was allocated under torch.no_grad")

    monkeypatch.setattr(linear_chunks, "_GradAccumulator", forbidden)

    def run():
        if op == "token_logprobs":
            return fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], chunk_size=chunk, backend="torch")
        return fk.linear_policy_loss(*leaves[:2], targets, torch.full((rows,), -8.5), torch.randn(rows),
                                     bias=leaves[2], chunk_size=chunk, backend="torch")

    with torch.no_grad(), count_gemms() as counter, profile(activities=[ProfilerActivity.CPU],
                                                            profile_memory=True) as prof:
        result = run()
    assert counter.routes == ["stats"]
    assert (counter.logits, counter.grad_hidden, counter.grad_weight) == (rows // chunk, 0, 0)
    largest = max(event.cpu_memory_usage for event in prof.events())
    # The chunk of logits is the largest buffer; a weight-sized gradient would be 5000 x 32 x 4 bytes.
    assert largest <= chunk * vocab * 4 < vocab * hidden_size * 4
    assert not result[0].requires_grad


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test; on CUDA the lm_head path is checked "
                    "against the reference by bench/gpu_checks.py (ops)")
def test_triton_backend_on_cpu_interpreter_matches_reference():
    # Small shapes: on CPU the Triton kernels run under the interpreter.
    hidden, weight, bias, targets = _problem((2, 12), 16, 257, seed=12, ignore_index=-1)
    _check_token_logprobs(hidden, weight, bias, targets, "triton", 16, ignore_index=-1, **TRANSFORMS["all"])
    logits = _reference_logits(hidden, weight, bias).detach()
    logp, _ = reference.token_logprobs(logits, targets, ignore_index=-1)
    inputs = dict(targets=targets, old_logprobs=(logp + 0.1).float(), advantages=torch.randn(2),
                  mask=torch.rand(2, 12, generator=torch.Generator().manual_seed(12)) > 0.2,
                  ref_logprobs=logp.float())
    config = fk.PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01)
    _check_policy(hidden, weight, bias, inputs, config, chunk=16, backend="triton", ignore_index=-1)
