"""Every op on the logits path compiles whole: torch.compile(fullgraph=True) with the default compiler.

The primitives are torch.library custom ops (fake implementations for tracing, autograd through
pass 2), the backend is resolved once at trace time, and the loss algebra is plain PyTorch, so a
training step with our loss compiles into one graph, forward and backward, equal to eager.
"""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2, 6, 97, generator=g)
    targets = torch.randint(0, 97, (2, 6), generator=g)
    targets[1, -2:] = -100
    old = torch.randn(2, 6, generator=g) - 4
    ref = old + 0.3 * torch.randn(2, 6, generator=g)
    adv = torch.randn(2, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.2
    return logits, targets, old, ref, adv, mask


def _objectives(backend, inplace):
    logits, targets, old, ref, adv, mask = _inputs()

    def token_logprobs(z):
        logp, entropy = fk.token_logprobs(z * 1.5, targets, temperature=0.8, softcap=20.0, backend=backend)
        return (logp * torch.linspace(-1, 1, 12).view(2, 6)).sum() - 0.1 * entropy.sum()

    def policy_loss(z):
        # Keyword options, not a prebuilt config: option parsing is traced too.
        out = fk.policy_loss(z * 1.0, targets, old, adv, mask, ref_logprobs=ref, backend=backend, loss_type="clip",
                             kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, loss_agg="dapo",
                             inplace_grad=inplace)
        return out.loss * 2.0

    def fused_dpo_loss(z):
        half = torch.tensor([-300.0])
        return fk.fused_dpo_loss(z * 1.0, targets, mask, half, half - 10.0, backend=backend, beta=0.1,
                                 inplace_grad=inplace).loss

    return logits, {"token_logprobs": token_logprobs, "policy_loss": policy_loss, "fused_dpo_loss": fused_dpo_loss}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss", "fused_dpo_loss"])
def test_fullgraph_inductor_equals_eager(backend, op):
    torch._dynamo.reset()
    logits, objectives = _objectives(backend, inplace=False)
    objective = objectives[op]
    eager_z = logits.clone().requires_grad_(True)
    eager_loss = objective(eager_z)
    eager_loss.backward()
    compiled_z = logits.clone().requires_grad_(True)
    compiled_loss = torch.compile(objective, fullgraph=True)(compiled_z)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-7)
    assert_close_to_reference(compiled_z.grad, eager_z.grad.double(), dtype=torch.float32, kind="grad",
                              name=f"{op} {backend} compiled grad")


@pytest.mark.parametrize("op", ["policy_loss", "fused_dpo_loss"])
def test_fullgraph_with_inplace_grad(op):
    torch._dynamo.reset()
    backend = BACKENDS[-1]
    logits, objectives = _objectives(backend, inplace=True)
    eager_z = logits.clone().requires_grad_(True)
    objectives[op](eager_z).backward()
    compiled_z = logits.clone().requires_grad_(True)
    torch.compile(objectives[op], fullgraph=True)(compiled_z).backward()
    assert_close_to_reference(compiled_z.grad, eager_z.grad.double(), dtype=torch.float32, kind="grad")
