"""The lm_head paths (``fk.linear_*``) against the float64 reference and the logits path on hidden @ W^T + b."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.ops import linear_chunks
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.testing import assert_close_to_reference, policy_configs
from fastrl_kernels.testing.strategies import masks, seeds, vocab_sizes

SEPARABLE = ("clip", "cispo", "sapo")
HIDDEN_SIZES = st.sampled_from((1, 2, 7, 13, 31, 64)) | st.integers(1, 48)


def _problem(leading, hidden_size, vocab, seed, dtype=torch.float32, with_bias=True, ignore=True):
    """hidden ~ N(0, 1), weight ~ N(0, 4 / H), bias ~ N(0, 1): logits of scale ~2 whatever H."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*leading, hidden_size), generator=g).to(dtype)
    weight = (2.0 * torch.randn((vocab, hidden_size), generator=g) / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, leading, generator=g)
    if ignore:
        targets = targets.masked_fill(torch.rand(leading, generator=g) < 0.2, -100)
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


def _chain(logits, hidden, weight, bias):
    """Reference grads of hidden, weight, bias (float64) from the reference grad of the logits."""
    g = logits.grad.reshape(-1, logits.shape[-1])
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    grads = [(g @ weight.detach().double()).view(hidden.shape), g.t() @ h]
    return grads + ([g.sum(0)] if bias is not None else [None])


def _assert_grads(leaves, expected, dtype, name):
    for label, leaf, ref in zip(("hidden", "weight", "bias"), leaves, expected):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, f"{name}: grad of {label}"
        assert_close_to_reference(leaf.grad, ref, dtype=dtype, kind="grad", name=f"{name} grad {label}")


def _chunks(n_rows, chunk_size):
    return -(-n_rows // chunk_size)


@settings(max_examples=20)
@given(rows=st.integers(1, 40), hidden_size=HIDDEN_SIZES, vocab=vocab_sizes(400), seed=seeds(),
       chunk=st.integers(1, 45), with_bias=st.booleans(), data=st.data())
def test_token_logprobs_match_reference(rows, hidden_size, vocab, seed, chunk, with_bias, data):
    temperature = data.draw(st.sampled_from((1.0, 0.7, 1.6)))
    softcap = data.draw(st.sampled_from((None, 3.0)))
    hidden, weight, bias, targets = _problem((rows,), hidden_size, vocab, seed, with_bias=with_bias)
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], temperature=temperature,
                                                 softcap=softcap, backend="torch", chunk_size=chunk)
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
        (a * logp + b * entropy).sum().backward()
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (rows,)
    n = _chunks(rows, chunk)
    assert counter.routes == ["stats", "logprobs_backward"]
    assert (counter.logits, counter.grad_hidden, counter.grad_weight) == (2 * n, n, n)
    logits = _reference_logits(hidden, weight, bias)
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, temperature=temperature, softcap=softcap)
    (a.double() * ref_logp + b.double() * ref_entropy).sum().backward()
    assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name="logp")
    assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name="entropy")
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), torch.float32, "token_logprobs")


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


def _check_policy(hidden, weight, bias, inputs, config, chunk, backend="torch"):
    dtype = hidden.dtype
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_policy_loss(*leaves[:2], config=config, bias=leaves[2], backend=backend, chunk_size=chunk,
                                    **inputs)
        out.loss.backward()
    n = _chunks(hidden.shape[0] * hidden.shape[1], chunk)
    if config.loss_type in SEPARABLE:
        assert counter.routes == ["fused"] and counter.total == 3 * n
    else:
        assert counter.routes == ["stats", "two_pass"] and counter.total == 4 * n
    logits = _reference_logits(hidden, weight, bias)
    loss, logp, entropy, metrics = reference.policy_loss(logits, config=config, **inputs)
    loss.backward()
    name = f"{config.loss_type}/{config.loss_agg}"
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close_to_reference(out.loss, loss, dtype=dtype, name=f"{name} loss")
    assert_close_to_reference(out.logprobs, logp, dtype=dtype, name="logprobs")
    assert_close_to_reference(out.entropy, entropy, dtype=dtype, name="entropy")
    assert set(out.metrics) == set(metrics)
    for key, value in metrics.items():
        if key not in ("clip_frac_low", "clip_frac_high"):  # a ratio at the clip boundary may go either way
            assert_close_to_reference(out.metrics[key], value, dtype=dtype, name=f"metric {key}")
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), dtype, name)
    return out


@settings(max_examples=30)
@given(data=st.data())
def test_policy_loss_matches_reference_every_option(data):
    _check_policy(*_policy_case(data))


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
    (loss + 0.5 * logp.sum() - 0.25 * entropy.sum()).backward()
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), torch.float32, "extra logp grad")


def test_loss_input_gradients_match_logits_path():
    hidden, weight, bias, targets = _problem((2, 5), 8, 30, seed=6)
    old = torch.full((2, 5), -3.4)
    for loss_type in ("clip", "gspo"):
        adv = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = fk.linear_policy_loss(hidden, weight.requires_grad_(), targets, old, adv, bias=bias, chunk_size=3,
                                    backend="torch", loss_type=loss_type)
        (grad_adv,) = torch.autograd.grad(out.loss, adv)
        logits = torch.addmm(bias, hidden.view(10, 8), weight.detach().t()).view(2, 5, -1)
        expected = fk.policy_loss(logits, targets, old, adv, backend="torch", loss_type=loss_type)
        (grad_expected,) = torch.autograd.grad(expected.loss, adv)
        torch.testing.assert_close(grad_adv, grad_expected, rtol=1e-5, atol=1e-7)
        weight.requires_grad_(False)


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


@pytest.mark.parametrize("case", [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo", average_logps=True),
    dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5], ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True, beta=0.5),
])
def test_dpo_matches_fused_logits_path_and_reference(case):
    hidden, weight, bias, targets = _problem((4, 7), 12, 97, seed=9)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, 5:] = False
    ref_c, ref_r = torch.tensor([-30.0, -28.0]), torch.tensor([-29.0, -31.0])
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_dpo_loss(*leaves[:2], targets, mask, ref_c, ref_r, bias=leaves[2], chunk_size=5,
                                 backend="torch", **case)
        out.loss.backward()
    assert counter.routes == ["stats", "two_pass"] and counter.total == 4 * _chunks(28, 5)
    logits = _reference_logits(hidden, weight, bias)
    expected = fk.fused_dpo_loss(logits, targets, mask, ref_c, ref_r, backend="reference", **case)
    expected.loss.backward()
    for field in expected._fields:
        assert_close_to_reference(getattr(out, field), getattr(expected, field), dtype=torch.float32, name=field)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias), torch.float32, f"dpo {case}")
    logits32 = logits.detach().float()
    fused = fk.fused_dpo_loss(logits32, targets, mask, ref_c, ref_r, backend="torch", **case)
    torch.testing.assert_close(out.loss, fused.loss, rtol=1e-5, atol=1e-6)


def test_reference_backend_equals_reference_on_full_logits():
    hidden, weight, bias, targets = _problem((2, 4), 8, 33, seed=10)
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend="reference")
    expected = reference.token_logprobs(_reference_logits(hidden, weight, bias), targets)
    torch.testing.assert_close(logp, expected[0].float())
    torch.testing.assert_close(entropy, expected[1].float())
    out = fk.linear_policy_loss(hidden, weight, targets, torch.full((2, 4), -3.5), torch.randn(2), bias=bias,
                                backend="reference")
    assert out.loss.dtype == torch.float32


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
def test_triton_backend_on_cpu_interpreter_matches_torch():
    hidden, weight, bias, targets = _problem((2, 12), 16, 257, seed=12)
    old, adv = torch.full((2, 12), -5.5), torch.randn(2)
    results = {}
    for backend in ("torch", "triton"):
        leaves = _leaves(hidden, weight, bias)
        out = fk.linear_policy_loss(*leaves[:2], targets, old, adv, bias=leaves[2], chunk_size=16, backend=backend,
                                    entropy_coef=0.01)
        out.loss.backward()
        results[backend] = [out.loss, out.logprobs, out.entropy] + [leaf.grad for leaf in leaves]
    for expected, actual in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
