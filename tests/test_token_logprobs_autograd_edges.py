"""token_logprobs under autograd: the logits are left as they were, double backward is refused by the op's
name, and a gradient that reaches neither output gives none."""

import re

import pytest
import torch

import fastrl_kernels as fk
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear_options import _NoGradient

BACKENDS = cpu_fused_backends()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 37, generator=g), torch.randint(0, 37, (4,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_leaves_the_logits_unchanged(backend):
    logits, targets = _inputs()
    z = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(z, targets, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(z.detach(), logits)
    assert z.grad.data_ptr() != z.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_by_the_op_name(backend):
    logits, targets = _inputs()
    z = logits.clone().requires_grad_(True)
    logp, _ = fk.token_logprobs(z, targets, backend=backend)
    message = ("token_logprobs: double backward (create_graph=True) is not supported by the fused backends, whose "
               "gradient is computed outside autograd; use backend='reference' for higher-order gradients")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        torch.autograd.grad(logp.sum(), z, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_reaching_either_output_gives_none(backend):
    logits, targets = _inputs()
    z = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(z, targets, backend=backend)
    (grad,) = torch.autograd.grad(_NoGradient.apply(logp).sum() + _NoGradient.apply(entropy).sum(), z,
                                  allow_unused=True)
    assert grad is None
