"""The lm_head ops (``fk.linear_*``) beyond the main value tests: the "reference" backend's options, one
parameter trainable at a time, gradients reaching only the entropy (or nothing), and torch's default dtype /
device."""

from __future__ import annotations

import math

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear import _chain, _chain_scales, _problem, _reference_logits

BACKENDS = cpu_fused_backends()


def _log_softmax_at(x: list[float], target: int) -> float:
    top = max(x)
    return x[target] - (top + math.log(sum(math.exp(v - top) for v in x)))


# ----------------------------------------------------------------------------------------------------
# backend="reference": every option reaches the float64 computation


def test_reference_backend_applies_temperature_logit_scale_and_softcap_by_hand():
    """x = c tanh(s z / c) / tau on the float64 logits z = h W^T + b; logp = log softmax(x)[y]."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weight = torch.tensor([[0.5, 2.0], [3.0, -1.0], [0.0, 0.0]])
    bias = torch.tensor([0.25, -0.5, 1.0])
    targets = torch.tensor([1, 0, 2])
    s, c, tau = 2.5, 3.0, 0.7
    logp, entropy = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=tau, logit_scale=s,
                                             softcap=c, backend="reference")
    expected_logp, expected_entropy = [], []
    for row, y in zip(hidden.tolist(), targets.tolist()):
        z = [sum(a * b for a, b in zip(row, w_row)) + b0 for w_row, b0 in zip(weight.tolist(), bias.tolist())]
        x = [c * math.tanh(s * v / c) / tau for v in z]
        logps = [_log_softmax_at(x, j) for j in range(len(x))]
        expected_logp.append(logps[y])
        expected_entropy.append(-sum(math.exp(v) * v for v in logps))
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp, torch.tensor(expected_logp), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(entropy, torch.tensor(expected_entropy), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options", [dict(logit_scale=2.5), dict(softcap=2.0),
                                     dict(temperature=1.6, logit_scale=0.5, softcap=2.0)],
                         ids=["logit_scale", "softcap", "all"])
def test_reference_backend_options_match_the_fused_backends(options):
    hidden, weight, bias, targets = _problem((2, 5), 8, 40, seed=41, ignore_index=-1)
    ref = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=-1, backend="reference", **options)
    expected = reference.token_logprobs(_reference_logits(hidden, weight, bias).detach(), targets, ignore_index=-1,
                                        **options)
    for got, want, name in zip(ref, expected, ("logp", "entropy")):
        assert_close_to_reference(got, want, dtype=torch.float32, name=f"reference backend {name}")
    for backend in BACKENDS:
        fused = fk.linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=-1, chunk_size=3,
                                         backend=backend, **options)
        for got, want, name in zip(fused, expected, ("logp", "entropy")):
            assert_close_to_reference(got, want, dtype=torch.float32, name=f"{backend} {name}")


def _dpo_by_hand(hidden, weight, bias, targets, mask, ref_c, ref_r, beta, temperature, ignore_index):
    """Sigmoid DPO from float64 logits: sequence log-prob = sum of log softmax(z / tau)[y] over the
    response tokens (mask and target != ignore_index); loss = mean softplus(-margin)."""
    logits = hidden.double() @ weight.double().t() + bias.double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != ignore_index
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = (token * (mask & valid).double()).sum(dim=1)
    half = hidden.shape[0] // 2
    chosen = beta * (seq[:half] - ref_c.double())
    rejected = beta * (seq[half:] - ref_r.double())
    margins = chosen - rejected
    return torch.nn.functional.softplus(-margins).mean(), chosen, rejected, margins


def test_reference_dpo_backend_uses_mask_temperature_ignore_index_and_bias():
    hidden, weight, bias, targets = _problem((4, 6), 8, 30, seed=42, ignore_index=-1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, :2] = False
    mask[2, 4:] = False
    ref_c, ref_r = torch.tensor([-20.0, -18.0]), torch.tensor([-19.0, -21.0])
    kwargs = dict(bias=bias, beta=0.3, temperature=0.7, ignore_index=-1)
    loss, chosen, rejected, margins = _dpo_by_hand(hidden, weight, bias, targets, mask, ref_c, ref_r, 0.3, 0.7, -1)
    for backend in ["reference", *BACKENDS]:
        out = fk.linear_dpo_loss(hidden, weight, targets, mask, ref_c, ref_r, backend=backend, chunk_size=5, **kwargs)
        assert_close_to_reference(out.loss, loss, dtype=torch.float32, name=f"{backend} loss")
        assert_close_to_reference(out.chosen_rewards, chosen, dtype=torch.float32, name=f"{backend} chosen")
        assert_close_to_reference(out.rejected_rewards, rejected, dtype=torch.float32, name=f"{backend} rejected")
        assert_close_to_reference(out.margins, margins, dtype=torch.float32, name=f"{backend} margins")
        assert out.accuracy.item() == (margins > 0).double().mean().item()


# ----------------------------------------------------------------------------------------------------
# Gradients: one parameter trainable at a time, entropy-only, none at all


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
def test_token_logprobs_gradient_when_only_one_parameter_is_trainable(backend, trainable):
    """With only hidden, only weight or only bias requiring grad, the outputs are differentiable and
    that parameter gets the float64 reference gradient; the frozen ones get none."""
    hidden, weight, bias, targets = _problem((3, 5), 6, 37, seed=43)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    leaves[trainable].requires_grad_(True)
    logp, entropy = fk.linear_token_logprobs(leaves["hidden"], leaves["weight"], targets, bias=leaves["bias"],
                                             chunk_size=4, backend=backend)
    assert logp.requires_grad and entropy.requires_grad
    g = torch.Generator().manual_seed(43)
    a, b = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
    ((a * logp).sum() + (b * entropy).sum()).backward()
    logits = _reference_logits(hidden, weight, bias)
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets)
    (a.double() * ref_logp + b.double() * ref_entropy).sum().backward()
    expected = dict(zip(("hidden", "weight", "bias"), _chain(logits, hidden, weight, bias)))
    scales = dict(zip(("hidden", "weight", "bias"), _chain_scales(logits, targets, a.abs() + b.abs(), hidden, weight)))
    for name, leaf in leaves.items():
        if name != trainable:
            assert leaf.grad is None, name
            continue
        grad, want, scale = leaf.grad, expected[name], scales[name]
        if name == "bias":
            grad, want = grad.unsqueeze(-1), want.unsqueeze(-1)
        assert_close_to_reference(grad, want, dtype=torch.float32, kind="grad", name=f"{backend} grad {name}",
                                  row_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss"])
def test_gradient_reaching_only_the_entropy(backend, op):
    """A loss on the returned entropy alone (logp unused) gives hidden / weight / bias the reference
    gradient of that loss."""
    hidden, weight, bias, targets = _problem((2, 6), 7, 45, seed=44)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    if op == "token_logprobs":
        _, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], chunk_size=5, backend=backend)
    else:
        entropy = fk.linear_policy_loss(*leaves[:2], targets, torch.full((2, 6), -3.8), torch.randn(2),
                                        bias=leaves[2], chunk_size=5, backend=backend).entropy
    b = torch.randn(targets.shape, generator=torch.Generator().manual_seed(44))
    (b * entropy).sum().backward()
    logits = _reference_logits(hidden, weight, bias)
    _, ref_entropy = reference.token_logprobs(logits, targets)
    (b.double() * ref_entropy).sum().backward()
    scales = _chain_scales(logits, targets, b.abs(), hidden, weight)
    for label, leaf, want, scale in zip(("hidden", "weight", "bias"), leaves, _chain(logits, hidden, weight, bias),
                                        scales):
        assert leaf.grad is not None, label
        grad = leaf.grad.unsqueeze(-1) if label == "bias" else leaf.grad
        want = want.unsqueeze(-1) if label == "bias" else want
        assert_close_to_reference(grad, want, dtype=torch.float32, kind="grad", name=f"{backend} {op} {label}",
                                  row_scale=scale)


class _NoGradient(torch.autograd.Function):
    """Identity whose backward passes no gradient on (None), like a stop-gradient custom op."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_reaching_the_outputs_leaves_grads_unset(backend):
    """When no gradient flows back into logp or entropy, the weight and bias keep grad None (as with the
    logits computed by plain torch ops) and no backward sweep runs."""
    hidden, weight, bias, targets = _problem((8,), 5, 20, seed=45, ignore=False)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    with count_gemms() as counter:
        logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], chunk_size=3, backend=backend)
        (_NoGradient.apply(logp).sum() + _NoGradient.apply(entropy).sum() + leaves[0].square().sum()).backward()
    assert counter.routes == ["stats"] and counter.grad_hidden == counter.grad_weight == 0
    assert leaves[1].grad is None and leaves[2].grad is None
    torch.testing.assert_close(leaves[0].grad, 2 * hidden, rtol=0, atol=0)
    # The same graph on materialized logits.
    plain = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = torch.addmm(plain[2], plain[0], plain[1].t())
    plain_logp = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    (_NoGradient.apply(plain_logp).sum() + plain[0].square().sum()).backward()
    assert plain[1].grad is None and plain[2].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_values_include_the_bias(backend):
    """Under torch.no_grad (one GEMM per chunk, no gradient buffers) logp and entropy are those of
    hidden @ W^T + b, the bias included."""
    hidden, weight, bias, targets = _problem((2, 7), 8, 60, seed=46, ignore_index=-1)
    bias = 3.0 * bias  # a bias that moves log-probs by units
    with torch.no_grad(), count_gemms() as counter:
        logp, entropy = fk.linear_token_logprobs(hidden, weight.requires_grad_(True), targets, bias=bias,
                                                 ignore_index=-1, chunk_size=4, backend=backend)
    assert counter.routes == ["stats"] and not logp.requires_grad
    ref_logp, ref_entropy = reference.token_logprobs(_reference_logits(hidden, weight, bias).detach(), targets,
                                                     ignore_index=-1)
    assert_close_to_reference(logp, ref_logp, dtype=torch.float32, name=f"{backend} no_grad logp")
    assert_close_to_reference(entropy, ref_entropy, dtype=torch.float32, name=f"{backend} no_grad entropy")


# ----------------------------------------------------------------------------------------------------
# torch's default dtype and device do not change results


def _all_ops(hidden, weight, bias, targets, old, adv, ref_c, ref_r, backend):
    """Outputs and gradients of the three ops on every route (fused, two-pass, backward sweep, no_grad)."""
    results = []
    for loss_type in ("clip", "gspo"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = fk.linear_policy_loss(*leaves[:2], targets, old, adv, bias=leaves[2], backend=backend, chunk_size=5,
                                    loss_type=loss_type, entropy_coef=0.01)
        out.loss.backward()
        results += [out.loss, out.logprobs, out.entropy, *out.metrics.values(), *(t.grad for t in leaves)]
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, entropy = fk.linear_token_logprobs(*leaves[:2], targets, bias=leaves[2], backend=backend, chunk_size=5)
    (logp.sum() - 0.5 * entropy.sum()).backward()
    results += [logp, entropy, *(t.grad for t in leaves)]
    with torch.no_grad():
        results += list(fk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend=backend))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    dpo = fk.linear_dpo_loss(*leaves[:2], targets, None, ref_c, ref_r, bias=leaves[2], backend=backend,
                             use_weighting=True)
    dpo.loss.backward()
    return results + list(dpo) + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("default", ["float64", "meta"])
def test_results_do_not_depend_on_the_default_dtype_or_device(backend, default):
    """Under torch.set_default_dtype(float64), or a default device other than the inputs' (meta stands
    in for CUDA), every output and gradient has the dtype, device and value of the plain run."""
    hidden, weight, bias, targets = _problem((2, 6), 6, 50, seed=51)
    inputs = (torch.full((2, 6), -4.0), torch.linspace(-1.0, 1.0, 12).view(2, 6), torch.tensor([-20.0]),
              torch.tensor([-21.0]))
    expected = _all_ops(hidden, weight, bias, targets, *inputs, backend)
    try:
        if default == "float64":
            torch.set_default_dtype(torch.float64)
        else:
            torch.set_default_device("meta")
        got = _all_ops(hidden, weight, bias, targets, *inputs, backend)
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device(None)
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert (a.dtype, a.device, a.shape) == (e.dtype, e.device, e.shape), i
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=f"output {i}")
