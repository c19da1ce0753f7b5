"""The lm_head path's backward: which inputs get gradients, scaled how, through which outputs.

Each case compares against the same op with every input requiring grad (itself checked against the float64
reference in tests/test_linear_policy_loss.py and tests/test_linear_dpo.py) or against the logits path.
"""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear import _problem

BACKENDS = cpu_fused_backends()


def _policy_inputs(seed=71):
    hidden, weight, bias, targets = _problem((2, 5), 6, 23, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    old = -2.0 - torch.rand((2, 5), generator=g)
    adv = torch.randn((2, 5), generator=g)
    return hidden, weight, bias, targets, old, adv


def _policy_grads(backend, requires, loss_type="clip", outputs="loss"):
    """Gradients of (hidden, weight, bias) that require grad as in ``requires``, from a backward of
    ``outputs``: "loss" (3 x the loss), "loss+logprobs", or "logprobs" alone."""
    hidden, weight, bias, targets, old, adv = _policy_inputs()
    leaves = [t.clone().requires_grad_(need) for t, need in zip((hidden, weight, bias), requires)]
    out = fk.linear_policy_loss(leaves[0], leaves[1], targets, old, adv, bias=leaves[2], backend=backend,
                                chunk_size=4, loss_type=loss_type, entropy_coef=0.01)
    total = {"loss": 3.0 * out.loss, "loss+logprobs": out.loss + 0.3 * out.logprobs.sum(),
             "logprobs": 0.3 * out.logprobs.sum()}[outputs]
    total.backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["clip", "gspo"])
@pytest.mark.parametrize("only", [0, 1, 2], ids=["hidden", "weight", "bias"])
def test_one_input_requiring_grad_gets_the_gradient_of_the_full_run(backend, loss_type, only):
    # A frozen body (hidden constant) with a trained head, a frozen head with a trained body, or only the bias.
    full = _policy_grads(backend, (True, True, True), loss_type)
    requires = tuple(i == only for i in range(3))
    alone = _policy_grads(backend, requires, loss_type)
    for i in range(3):
        if i == only:
            assert alone[i] is not None
            torch.testing.assert_close(alone[i], full[i], rtol=1e-6, atol=1e-7)
        else:
            assert alone[i] is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outputs", ["loss+logprobs", "logprobs"])
def test_gradients_through_the_log_probs_join_those_of_the_loss(backend, outputs):
    """A caller who also differentiates the returned log-probs (and not the entropy): one more sweep adds
    their gradient; with the loss unused, only that sweep runs. Compared with the logits path."""
    hidden, weight, bias, targets, old, adv = _policy_inputs()
    got = _policy_grads(backend, (True, True, True), outputs=outputs)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    out = fk.policy_loss(logits, targets, old, adv, backend=backend, loss_type="clip", entropy_coef=0.01)
    total = out.loss + 0.3 * out.logprobs.sum() if outputs == "loss+logprobs" else 0.3 * out.logprobs.sum()
    total.backward()
    for mine, want in zip(got, leaves):
        torch.testing.assert_close(mine, want.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_logps_of_dpo_get_their_gradient_scaled_by_the_incoming_one(backend):
    """DPO's loss depends on the reference log-probs too: with the head and body frozen they alone get a
    gradient, equal to the logits path's and scaled by the gradient reaching the loss."""
    hidden, weight, bias, targets = _problem((4, 3), 6, 25, seed=72, ignore=False)
    g = torch.Generator().manual_seed(73)
    ref_c, ref_r = -9.0 + torch.randn(2, generator=g), -8.0 + torch.randn(2, generator=g)
    got = [x.clone().requires_grad_(True) for x in (ref_c, ref_r)]
    out = fk.linear_dpo_loss(hidden, weight, targets, None, *got, bias=bias, backend=backend, chunk_size=5, beta=0.3)
    (3.0 * out.loss).backward()
    want = [x.clone().requires_grad_(True) for x in (ref_c, ref_r)]
    logits = hidden @ weight.t() + bias
    expected = fk.fused_dpo_loss(logits, targets, None, *want, backend=backend, beta=0.3)
    (3.0 * expected.loss).backward()
    for mine, ref_leaf in zip(got, want):
        assert mine.grad is not None
        torch.testing.assert_close(mine.grad, ref_leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_through_a_retained_graph_is_refused(backend):
    hidden, weight, bias, targets, old, adv = _policy_inputs()
    leaf = hidden.clone().requires_grad_(True)
    out = fk.linear_policy_loss(leaf, weight, targets, old, adv, bias=bias, backend=backend)
    out.loss.backward(retain_graph=True)
    message = ("fastrl_kernels linear loss: backward was already run once; the gradients are computed in the "
               "forward and scaled in place, so run the forward again instead of retain_graph=True")
    with pytest.raises(RuntimeError, match=f"^{message}$"):
        out.loss.backward()
