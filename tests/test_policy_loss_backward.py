"""policy_loss's gradient as training code uses it, against the float64 reference: written over the logits
(``inplace_grad``), joined by gradients through the returned log-probs and entropy, scaled, and run backward
twice."""

import dataclasses

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import ENTROPY_MODES
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends
from tests.test_policy_loss import RICH, _assert_loss_close, _case, _reference

BACKENDS = cpu_fused_backends()


# ---------------------------------------------------------------------------------------------
# inplace_grad, extra uses of the outputs, scaling.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_inplace_grad_matches_reference_and_overwrites_the_logits(backend, entropy_mode, dtype):
    inputs = _case(10, dtype=dtype)
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode, entropy_coef=0.3)
    expected = _reference(inputs, config)
    hidden = inputs["logits"].clone().requires_grad_(True)
    produced = hidden * 1.0  # a non-leaf whose storage the gradient may overwrite
    out = fk.policy_loss(produced, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend, inplace_grad=True)
    out.loss.backward()
    _assert_loss_close(out.loss, expected.loss, expected.loss_scale, dtype=dtype, name="inplace loss")
    assert_close_to_reference(hidden.grad, expected.grad, dtype=dtype, kind="grad", name="inplace grad",
                              row_scale=expected.scale)
    assert torch.equal(produced.detach(), hidden.grad)  # the logits now hold the gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace_grad", (False, True))
def test_returned_logprobs_can_feed_another_loss(backend, inplace_grad):
    # their gradients join the loss's before the logits gradient is written (in place or not)
    inputs = _case(11)
    config = dataclasses.replace(RICH, entropy_coef=0.0)
    z = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(z * 1.0, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=config, backend=backend,
                         inplace_grad=inplace_grad)
    (out.loss + 0.3 * out.logprobs.sum() + 0.2 * out.entropy.sum()).backward()
    z64 = inputs["logits"].double().requires_grad_(True)
    loss, logp, entropy, _ = reference.policy_loss(z64, inputs["targets"], inputs["old_logprobs"],
                                                   inputs["advantages"], inputs["mask"],
                                                   ref_logprobs=inputs["ref_logprobs"], config=config)
    (loss + 0.3 * logp.sum() + 0.2 * entropy.sum()).backward()
    assert_close_to_reference(z.grad, z64.grad, dtype=torch.float32, kind="grad")


def _backward_twice(loss):
    loss.backward(retain_graph=True)
    loss.backward()


def _backward_scaled(loss):
    (loss * 2.5).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed, run_backward, factor", [
    pytest.param(18, _backward_twice, 2.0, id="second_backward_adds_the_reference_gradient_again"),
    pytest.param(12, _backward_scaled, 2.5, id="scaled_loss_gives_the_scaled_reference_gradient"),
])
def test_gradient_is_the_reference_gradient_times(backend, seed, run_backward, factor):
    inputs = _case(seed)
    expected = _reference(inputs, RICH)
    z = inputs["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(z, inputs["targets"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
                         ref_logprobs=inputs["ref_logprobs"], config=RICH, backend=backend)
    run_backward(out.loss)
    assert_close_to_reference(z.grad, factor * expected.grad, dtype=torch.float32, kind="grad",
                              row_scale=factor * expected.scale)


def test_second_backward_after_inplace_grad_is_refused():
    # the first backward overwrote the logits the second one would read
    produced = torch.randn(4, 9, requires_grad=True) * 1.0
    out = fk.policy_loss(produced, torch.randint(0, 9, (4,)), torch.randn(4), torch.randn(4), backend="torch",
                         inplace_grad=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
