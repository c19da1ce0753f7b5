"""The lm_head paths (``fk.linear_*``) against the float64 reference and the logits path on hidden @ W^T + b."""

import dataclasses
import importlib.util
import math

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
from fastrl_kernels.reference import dpo as dpo_ref
from fastrl_kernels.testing import assert_close_to_reference, coefficient_scale, policy_configs
from fastrl_kernels.testing.strategies import masks, seeds, vocab_sizes
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples
from tests.test_dpo_loss import LOG_RATIO_SPREAD
from tests.test_dpo_loss import _check_outputs as check_dpo_outputs
from tests.test_dpo_loss import _expected as dpo_expected
from tests.test_dpo_loss import configs as dpo_configs

BACKENDS = cpu_fused_backends()
# Types with a per-token ratio take the one-sweep route: the loss is a sum of per-token terms.
SEPARABLE = tuple(name for name, kind in POLICY_LOSSES.items() if kind.ratio == "token")
HIDDEN_SIZES = st.sampled_from((1, 2, 7, 13, 31, 64)) | st.integers(1, 48)
TRANSFORMS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "logit_scale": dict(logit_scale=2.5),
    "softcap": dict(softcap=3.0),
    "all": dict(temperature=1.6, logit_scale=0.5, softcap=2.0),
}


def _problem(leading, hidden_size, vocab, seed, dtype=torch.float32, with_bias=True, ignore=True, ignore_index=-100):
    """hidden ~ N(0, 1), weight ~ N(0, 4 / H), bias ~ N(0, 1): logits of scale ~2 whatever H; ~20% of the
    targets ``ignore_index`` when ``ignore``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*leading, hidden_size), generator=g).to(dtype)
    weight = (2.0 * torch.randn((vocab, hidden_size), generator=g) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, leading, generator=g)
    if ignore:
        targets = targets.masked_fill(torch.rand(leading, generator=g) < 0.2, ignore_index)
    return hidden, weight, bias, targets


def _leaves(hidden, weight, bias):
    return [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]


def _reference_logits(hidden, weight, bias):
    """The logits the op sees: exact products for fp32 inputs; for half precision the same rounded GEMM
    (the chunks round their logits to the hidden dtype, so the reference gets those rounded values)."""
    if hidden.dtype in (torch.float32, torch.float64):
        logits = hidden.double() @ weight.double().t()
        logits = logits if bias is None else logits + bias.double()
    else:
        logits = (hidden @ weight.t() if bias is None else torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]),
                                                                        weight.t()).view(*hidden.shape[:-1], -1))
    return logits.detach().double().requires_grad_(True)


def _chain(logits, hidden, weight, bias, grad=None):
    """Reference grads of hidden, weight, bias (float64) from the reference grad of the logits (``grad``, or
    ``logits.grad``)."""
    g = (logits.grad if grad is None else grad).reshape(-1, logits.shape[-1])
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    grads = [(g @ weight.detach().double()).view(hidden.shape), g.t() @ h]
    return grads + ([g.sum(0)] if bias is not None else [None])


def _chain_scales(logits, targets, coefficient, hidden, weight, ignore_index=-100, temperature=1.0,
                  logit_scale=1.0, softcap=None):
    """Row scales of the hidden, weight and bias gradients: the sizes of the terms their GEMMs add up.

    Row i of dL/dlogits is k g_i (1[j=y] - p_j) + ... with terms of size k c_i (p_ij + 1[j=y_i]), c_i the
    token's |dL/dlogp| + |dL/dH| (``coefficient``) and k = logit_scale / temperature >= |dx/dz|. With A those
    term sizes: hidden row i -> max_h (A |W|)_ih, weight row j -> max_h (A^T |hidden|)_jh, bias j -> sum_i A_ij.
    """
    x = reference.transformed_logits(logits.detach(), temperature=temperature, logit_scale=logit_scale,
                                     softcap=softcap)
    p = torch.softmax(x, dim=-1).reshape(-1, x.shape[-1])
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    onehot = torch.zeros_like(p)
    onehot[valid.nonzero().squeeze(1), flat_targets[valid]] = 1.0
    c = coefficient.detach().double().reshape(-1, 1) * valid.double().unsqueeze(1) * (logit_scale / temperature)
    terms = c * (p + onehot)
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    hidden_scale = (terms @ weight.detach().double().abs()).amax(dim=-1).view(hidden.shape[:-1])
    weight_scale = (terms.t() @ h.abs()).amax(dim=-1)
    return hidden_scale, weight_scale, terms.sum(dim=0)


def _assert_grads(leaves, expected, dtype, name, scales):
    for label, leaf, ref, scale in zip(("hidden", "weight", "bias"), leaves, expected, scales):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"{name}: grad of {label}"
        grad = leaf.grad
        if label == "bias":  # each vocabulary entry is a row of its own
            grad, ref = grad.unsqueeze(-1), ref.unsqueeze(-1)
        assert_close_to_reference(grad, ref, dtype=dtype, kind="grad", name=f"{name} grad {label}", row_scale=scale)


def _chunks(n_rows, chunk_size):
    return -(-n_rows // chunk_size)


def _check_token_logprobs(hidden, weight, bias, targets, backend="torch", chunk=None, with_entropy=True, seed=0,
                          **options):
    """linear_token_logprobs forward and hidden / weight / bias gradients vs the float64 reference on the
    logits the op sees, the backward driven by random coefficients (a, b) on (logp, entropy)."""
    rows = targets.numel()
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], backend=backend,
                                                 chunk_size=chunk, with_entropy=with_entropy, **options)
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
        ((a * logp).sum() + ((b * entropy).sum() if with_entropy else 0.0)).backward()
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert counter.routes == ["stats", "logprobs_backward"]
    if chunk is not None:
        n = _chunks(rows, chunk)
        assert (counter.logits, counter.grad_hidden, counter.grad_weight) == (2 * n, n, n)
    logits = _reference_logits(hidden, weight, bias)
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, **options)
    assert_close_to_reference(logp, ref_logp, dtype=hidden.dtype, name=f"{backend} logp")
    if with_entropy:
        assert_close_to_reference(entropy, ref_entropy, dtype=hidden.dtype, name=f"{backend} entropy")
        (a.double() * ref_logp + b.double() * ref_entropy).sum().backward()
        coefficient = a.abs() + b.abs()
    else:
        assert entropy is None
        (a.double() * ref_logp).sum().backward()
        coefficient = a.abs()
    scales = _chain_scales(logits, targets, coefficient, hidden, weight, **options)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), hidden.dtype, f"{backend} token_logprobs", scales)
    ignored = targets == options.get("ignore_index", -100)
    assert bool((logp[ignored] == 0).all()) and bool((leaves[0].grad[ignored] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(rows=st.integers(1, 40), hidden_size=HIDDEN_SIZES, vocab=vocab_sizes(400, min_vocab=2), seed=seeds(),
       chunk=st.integers(1, 45), with_bias=st.booleans(), data=st.data())
def test_token_logprobs_match_reference(backend, rows, hidden_size, vocab, seed, chunk, with_bias, data):
    options = dict(temperature=data.draw(st.sampled_from((1.0, 0.7, 1.6))),
                   logit_scale=data.draw(st.sampled_from((1.0, 2.0, 0.5))),
                   softcap=data.draw(st.sampled_from((None, 3.0))),
                   ignore_index=data.draw(st.sampled_from((-100, -1))))
    hidden, weight, bias, targets = _problem((rows,), hidden_size, vocab, seed, with_bias=with_bias,
                                             ignore_index=options["ignore_index"])
    _check_token_logprobs(hidden, weight, bias, targets, backend, chunk, data.draw(st.booleans()), seed, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_token_logprobs_options_match_reference(backend, transform, ignore_index):
    # V = 2500: two blocks of the native kernel; batched [B, T] leading shape, chunks of 5 rows.
    hidden, weight, bias, targets = _problem((2, 7), 24, 2500, seed=31, ignore_index=ignore_index)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 5, ignore_index=ignore_index,
                          **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["plain", "all"])
def test_token_logprobs_without_entropy_match_reference(backend, transform):
    hidden, weight, bias, targets = _problem((13,), 16, 301, seed=32)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 4, with_entropy=False, **TRANSFORMS[transform])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_vocabulary(backend):
    hidden, weight, bias, targets = _problem((6,), 5, 1, seed=33)
    _check_token_logprobs(hidden, weight, bias, targets, backend, 4, temperature=0.5, softcap=2.0)
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    assert bool((logp == 0).all()) and bool((entropy == 0).all())


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
    assert_close_to_reference(out.loss, loss, dtype=dtype, name=f"{name} loss")
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


def _dpo_problem(seed, vocab=97, ignore_index=-100, temperature=1.0, average=False, ld_alpha=None):
    """Two pairs of 7 steps, masked prompts, one short response; reference sequence log-probs within
    LOG_RATIO_SPREAD of the policy's (formed the same way)."""
    hidden, weight, bias, targets = _problem((4, 7), 12, vocab, seed=seed, ignore_index=ignore_index)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, 5:] = False
    policy = dpo_ref.sequence_logprobs(_reference_logits(hidden, weight, bias).detach(), targets, mask,
                                       average=average, ld_alpha=ld_alpha, temperature=temperature,
                                       ignore_index=ignore_index)
    g = torch.Generator().manual_seed(seed)
    ref_logps = (policy + LOG_RATIO_SPREAD * (2 * torch.rand(4, generator=g, dtype=torch.float64) - 1)).float()
    return hidden, weight, bias, targets, mask, ref_logps[:2], ref_logps[2:]


def _check_dpo(backend, config, chunk=5, temperature=1.0, ignore_index=-100, vocab=97, seed=9):
    """linear_dpo_loss vs the float64 reference on the logits (two sweeps: 4 GEMMs a chunk), outputs and the
    hidden / weight / bias gradients; returns the op's output and the problem."""
    problem = _dpo_problem(seed, vocab, ignore_index, temperature, config.average_logps, config.ld_alpha)
    hidden, weight, bias, targets, mask, ref_c, ref_r = problem
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_dpo_loss(*leaves[:2], targets, mask, ref_c, ref_r, bias=leaves[2], chunk_size=chunk,
                                 backend=backend, config=config, temperature=temperature, ignore_index=ignore_index)
        out.loss.backward()
    assert counter.routes == ["stats", "two_pass"] and counter.total == 4 * _chunks(28, chunk)
    logits = _reference_logits(hidden, weight, bias)
    seq, weights, chosen, rejected, grad, coefficient = dpo_expected(logits, targets, mask, ref_c, ref_r, config,
                                                                     temperature, ignore_index)
    name = f"{backend} dpo {config.loss_type}"
    check_dpo_outputs(out, seq, weights, chosen, rejected, ref_c, ref_r, config, torch.float32, name)
    scales = _chain_scales(logits, targets, coefficient, hidden, weight, ignore_index, temperature)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias, grad), torch.float32, name, scales)
    return out, problem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo", average_logps=True),
    dict(loss_type=("sigmoid", "hinge"), loss_weights=(1.0, 0.5), ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True, beta=0.5),
], ids=["sigmoid", "ipo", "mixture_ld", "wpo"])
def test_dpo_matches_reference_and_fused_logits_path(backend, case):
    out, (hidden, weight, bias, targets, mask, ref_c, ref_r) = _check_dpo(backend, fk.DPOConfig(**case))
    logits32 = torch.addmm(bias, hidden.view(28, 12), weight.t()).view(4, 7, -1)
    fused = fk.fused_dpo_loss(logits32, targets, mask, ref_c, ref_r, backend=backend, **case)
    torch.testing.assert_close(out.loss, fused.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_dpo_temperature_and_ignore_index_match_reference(backend, ignore_index):
    # V = 2100: two blocks of the native kernel.
    config = fk.DPOConfig(loss_type=("sigmoid", "apo_zero"), beta=0.3, use_weighting=True)
    _check_dpo(backend, config, chunk=6, temperature=0.7, ignore_index=ignore_index, vocab=2100, seed=35)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(config=dpo_configs, seed=seeds(), vocab=vocab_sizes(300, min_vocab=2), chunk=st.integers(1, 30),
       average=st.booleans(), ld_alpha=st.sampled_from([None, 0.0, 0.5]), weighting=st.booleans(),
       temperature=st.sampled_from([1.0, 0.7, 1.6]), ignore_index=st.sampled_from([-100, -1]))
def test_dpo_matches_reference_every_option(backend, config, seed, vocab, chunk, average, ld_alpha, weighting,
                                            temperature, ignore_index):
    config = config.with_overrides(average_logps=average, ld_alpha=ld_alpha, use_weighting=weighting)
    _check_dpo(backend, config, chunk, temperature, ignore_index, vocab, seed)


def test_reference_backend_gives_hand_values():
    # hidden = e_1, e_2 and a one-hot weight give logits [0, ln 3] and [ln 3, 0] (bias 0).
    ln3 = math.log(3.0)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([[0.0, ln3], [ln3, 0.0]])
    targets = torch.tensor([1, 1, -1])
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, ignore_index=-1, backend="reference")
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75), math.log(0.25), 0.0]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy, torch.tensor([h, h, 0.0]), rtol=1e-6, atol=1e-7)
    # bias [1, 0] and temperature 0.5: row 0 has logits [1, ln 3], x = [2, 2 ln 3].
    bias = torch.tensor([1.0, 0.0])
    logp, _ = fk.linear_token_logprobs(hidden[:1], weight, targets[:1], bias=bias, temperature=0.5, backend="reference")
    x = torch.tensor([2.0, 2 * ln3], dtype=torch.float64)
    torch.testing.assert_close(logp, torch.log_softmax(x, 0)[1:].float(), rtol=1e-6, atol=1e-7)
    # policy loss at ratio 1 (old = logp): clip loss = -mean(A) over unmasked tokens, gradient-free metrics.
    old = torch.tensor([math.log(0.75), math.log(0.25)])
    out = fk.linear_policy_loss(hidden[:2].unsqueeze(0), weight, targets[:2].unsqueeze(0), old.unsqueeze(0),
                                torch.tensor([[2.0, -1.0]]), backend="reference")
    torch.testing.assert_close(out.loss, torch.tensor(-0.5), rtol=1e-6, atol=1e-7)
    # DPO sigmoid: pair (chosen row 0, rejected row 1), policy log-probs ln 0.75 and ln 0.25, refs 0.
    dpo = fk.linear_dpo_loss(hidden[:2].unsqueeze(1), weight, targets[:2].unsqueeze(1), None, torch.zeros(1),
                             torch.zeros(1), beta=0.5, backend="reference")
    margin = 0.5 * (math.log(0.75) - math.log(0.25))
    torch.testing.assert_close(dpo.loss, torch.tensor(math.log1p(math.exp(-margin)), dtype=torch.float32))


def test_chunk_size_rule():
    choose = linear_chunks.choose_chunk_size
    cpu = torch.device("cpu")
    rows = choose(1 << 20, 151936, torch.float32, cpu)
    assert rows % 8 == 0 and rows * 151936 * 4 <= linear_chunks.CPU_CHUNK_BYTES
    assert choose(1 << 20, 151936, torch.bfloat16, cpu) * 151936 * 6 <= linear_chunks.CPU_CHUNK_BYTES
    assert choose(5, 1000, torch.float32, cpu) == 5
    assert choose(1 << 20, 10**9, torch.float32, cpu) == 8  # at least one GEMM-friendly block of rows


def test_input_validation_names_the_argument():
    hidden, weight, bias, targets = _problem((6,), 8, 30, seed=11)
    with pytest.raises(TypeError, match="weight"):
        fk.linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="weight"):
        fk.linear_token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="bias"):
        fk.linear_token_logprobs(hidden, weight, targets, bias=bias[:3])
    with pytest.raises(ValueError, match="targets"):
        fk.linear_token_logprobs(hidden, weight, targets.clamp(min=0) + 30)
    with pytest.raises(ValueError, match="chunk_size"):
        fk.linear_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        fk.linear_dpo_loss(hidden.view(3, 2, 8), weight, targets.view(3, 2), None, torch.zeros(1), torch.zeros(1))


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
