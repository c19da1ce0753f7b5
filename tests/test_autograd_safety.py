"""Autograd edge cases: in-place gradients never corrupt another input or graph, and second
derivatives either work (reference) or are refused with a clear error (fused backends), never a
silent zero."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from tests.backends_under_test import cpu_fused_backends

FUSED = cpu_fused_backends()


def _policy_batch(seed=0, b=2, t=5, v=41):
    g = torch.Generator().manual_seed(seed)
    return dict(logits=2.0 * torch.randn(b, t, v, generator=g), targets=torch.randint(0, v, (b, t), generator=g),
                old_logprobs=-3.0 * torch.rand(b, t, generator=g), advantages=torch.randn(b, generator=g),
                mask=torch.rand(b, t, generator=g) > 0.2)


# inplace_grad: inputs sharing the logits' memory


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["old_logprobs", "ref_logprobs", "is_weights", "advantages", "mask", "normalizer"])
def test_policy_loss_in_place_refuses_inputs_sharing_the_logits_memory(backend, name):
    """e.g. old log-probs taken as a view of the logits buffer: the in-place gradient would overwrite them."""
    batch = _policy_batch()
    batch["logits"][0, 0, 0] = 3.0  # a valid normalizer where one is carved out of the logits
    logits = batch["logits"].clone().requires_grad_(True)
    x = logits * 1.0  # the tensor the op overwrites
    views = {"advantages": x.detach()[:, 0, 0], "normalizer": x.detach()[0, 0, 0],
             "mask": x.detach().view(torch.uint8)[..., 0]}  # the first byte of each token's first logit
    shared = views.get(name, x.detach()[..., 0])
    args = dict(old_logprobs=batch["old_logprobs"], advantages=batch["advantages"], kl_coef=0.1,
                ref_logprobs=batch["old_logprobs"] + 0.1, mask=batch["mask"])
    args[name] = shared
    with pytest.raises(ValueError, match=rf"^{name}: shares memory with logits, which inplace_grad=True overwrites"):
        fk.policy_loss(x, batch["targets"], backend=backend, inplace_grad=True, **args)
    # Without inplace_grad the same call is fine and equals the call on a copy.
    out = fk.policy_loss(x, batch["targets"], backend=backend, **args)
    copy = fk.policy_loss(x, batch["targets"], backend=backend,
                          **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    assert torch.equal(out.loss, copy.loss)


@pytest.mark.parametrize("backend", FUSED)
def test_policy_loss_in_place_refuses_targets_sharing_the_logits_memory(backend):
    """int64 targets carved out of the same buffer as float32 logits (one allocation for a batch)."""
    n, v = 6, 40
    buffer = torch.zeros(n * v * 4 + n * 8, dtype=torch.uint8)
    logits = buffer[: n * v * 4].view(torch.float32).view(n, v)
    logits.copy_(torch.randn(n, v))
    targets = buffer[n * v * 4:].view(torch.int64)
    targets.copy_(torch.randint(0, v, (n,)))
    with pytest.raises(ValueError, match=r"^targets: shares memory with logits"):
        fk.policy_loss(logits.requires_grad_(True), targets, torch.zeros(n), torch.ones(n), backend=backend,
                       inplace_grad=True)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_dpo_in_place_refuses_inputs_sharing_the_logits_memory(backend):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 17, generator=g).requires_grad_(True)
    x = logits * 1.0
    targets = torch.randint(0, 17, (4, 3), generator=g)
    ref = x.detach()[:2, 0, 0]
    with pytest.raises(ValueError, match=r"^ref_chosen_logps: shares memory with logits"):
        fk.fused_dpo_loss(x, targets, None, ref, torch.zeros(2), backend=backend, inplace_grad=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["policy_loss", "fused_dpo_loss"])
def test_in_place_gradient_fails_loudly_in_a_graph_that_saved_the_logits(backend, op):
    """The backward that overwrites the logits bumps their version counter: another graph that saved
    them raises instead of differentiating with the gradient in place of the logits."""
    batch = _policy_batch(2, b=2)
    leaf = batch["logits"].clone().requires_grad_(True)
    x = leaf * 1.0
    saved = (x * x).sum()  # mul saves x
    if op == "policy_loss":
        loss = fk.policy_loss(x, batch["targets"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                              backend=backend, inplace_grad=True).loss
    else:
        loss = fk.fused_dpo_loss(x, batch["targets"], batch["mask"], torch.zeros(1), torch.zeros(1),
                                 backend=backend, inplace_grad=True).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved).backward()


# Second derivatives


def _double_backward(op, backend):
    g = torch.Generator().manual_seed(3)
    batch = _policy_batch(3)
    if op.startswith("linear"):
        hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64 if backend == "reference" else torch.float32)
        weight = torch.randn(41, 6, generator=g, dtype=hidden.dtype)
        leaves = (hidden.requires_grad_(True), weight.requires_grad_(True))
        if op == "linear_token_logprobs":
            logp, entropy = fk.linear_token_logprobs(hidden, weight, batch["targets"], backend=backend)
            loss = logp.sum() + entropy.sum()
        else:
            loss = fk.linear_policy_loss(hidden, weight, batch["targets"], batch["old_logprobs"], batch["advantages"],
                                         batch["mask"], backend=backend, entropy_coef=0.1).loss
    else:
        logits = batch["logits"].clone().requires_grad_(True)
        leaves = (logits,)
        if op == "token_logprobs":
            logp, entropy = fk.token_logprobs(logits, batch["targets"], backend=backend)
            loss = logp.sum() + entropy.sum()
        elif op == "policy_loss":
            loss = fk.policy_loss(logits, batch["targets"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                                  backend=backend, entropy_coef=0.1).loss
        else:
            loss = fk.fused_dpo_loss(logits, batch["targets"], batch["mask"], torch.zeros(1), torch.zeros(1),
                                     backend=backend).loss
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    return torch.autograd.grad(sum((gr * gr).sum() for gr in grads), leaves[0])[0]


OPS = ["token_logprobs", "policy_loss", "fused_dpo_loss", "linear_token_logprobs", "linear_policy_loss"]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", OPS)
def test_fused_backends_refuse_double_backward(backend, op):
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        _double_backward(op, backend)


@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss"])
def test_reference_double_backward_matches_finite_differences(op):
    """The reference is plain float64 autograd: its second derivatives exist (gradgradcheck)."""
    batch = _policy_batch(4, b=1, t=3, v=7)
    logits = batch["logits"].double().requires_grad_(True)

    def loss_of(z):
        if op == "token_logprobs":
            logp, entropy = reference.token_logprobs(z, batch["targets"])
            return logp.sum() + entropy.sum()
        return reference.policy_loss(z, batch["targets"], batch["old_logprobs"].double(),
                                        batch["advantages"].double(), batch["mask"], entropy_coef=0.1)[0]

    assert torch.autograd.gradgradcheck(loss_of, (logits,))
    assert _double_backward(op, "reference").abs().sum() > 0
