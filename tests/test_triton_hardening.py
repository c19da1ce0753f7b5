"""The Triton backend under the checks of tests/test_masked_inputs.py and tests/test_autograd_safety.py.

Garbage at masked positions never reaches a policy loss on the logits path; ``inplace_grad`` refuses
inputs that share the logits' memory and bumps their version counter; double backward is refused with a
clear error. On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py),
one Python call per kernel program, hence the tiny shapes; on a CUDA machine the same tests run the
compiled kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels.testing.strategies import seeds
from tests.conftest import examples
from tests.test_autograd_safety import _policy_batch
from tests.test_masked_inputs import FIELDS, GARBAGE, LOSS_TYPES, _assert_same, _batch, _run, padded_with

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(batch: dict) -> dict:
    return {key: value.to(DEVICE) for key, value in batch.items()}


# Garbage at masked positions (logits path)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_garbage_value_at_masked_positions_is_ignored(loss_type):
    """Each garbage value in every padded field at once: the same loss, gradient and metrics, bit for bit."""
    batch = _on_device(_batch(1))
    clean = _run("logits", "triton", batch, loss_type)
    assert torch.isfinite(clean[0])
    for garbage in GARBAGE:
        dirty = dict(batch, **{field: batch[field].masked_fill(~batch["mask"], garbage) for field in FIELDS})
        _assert_same(clean, _run("logits", "triton", dirty, loss_type), f"every field = {garbage}")


@settings(max_examples=examples(6))
@given(seed=seeds(), loss_type=st.sampled_from(LOSS_TYPES),
       garbage=st.fixed_dictionaries({field: st.sampled_from(GARBAGE) for field in FIELDS}),
       per_sequence=st.booleans())
def test_garbage_drawn_per_field_is_ignored(seed, loss_type, garbage, per_sequence):
    """A garbage value drawn per field; per-sequence advantages with a fully padded last sequence (whose
    advantage is garbage too)."""
    batch = _batch(seed, b=2, t=4, v=19)
    if per_sequence:
        batch["advantages"] = batch["advantages"][:, 0].clone()
        batch["mask"][-1] = False
    batch = _on_device(batch)
    clean = _run("logits", "triton", batch, loss_type)
    _assert_same(clean, _run("logits", "triton", padded_with(batch, garbage, per_sequence), loss_type), str(garbage))


# inplace_grad: inputs sharing the logits' memory, and the version counter


@pytest.mark.parametrize("name", FIELDS)
def test_policy_loss_in_place_refuses_inputs_sharing_the_logits_memory(name):
    batch = _on_device(_policy_batch())
    x = batch["logits"].clone().requires_grad_(True) * 1.0  # the non-leaf the op would overwrite
    shared = x.detach()[..., 0] if name != "advantages" else x.detach()[:, 0, 0]
    args = dict(old_logprobs=batch["old_logprobs"], advantages=batch["advantages"], kl_coef=0.1,
                ref_logprobs=batch["old_logprobs"] + 0.1)
    args[name] = shared
    with pytest.raises(ValueError, match=rf"^{name}: shares memory with logits, which inplace_grad=True overwrites"):
        fk.policy_loss(x, batch["targets"], mask=batch["mask"], backend="triton", inplace_grad=True, **args)
    # Without inplace_grad the same call is fine and equals the call on a copy.
    out = fk.policy_loss(x, batch["targets"], mask=batch["mask"], backend="triton", **args)
    copy = fk.policy_loss(x, batch["targets"], mask=batch["mask"], backend="triton",
                          **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()})
    assert torch.equal(out.loss, copy.loss)


def test_policy_loss_in_place_refuses_targets_sharing_the_logits_memory():
    """int64 targets carved out of the same allocation as float32 logits."""
    n, v = 4, 24
    buffer = torch.zeros(n * v * 4 + n * 8, dtype=torch.uint8, device=DEVICE)
    logits = buffer[: n * v * 4].view(torch.float32).view(n, v)
    logits.copy_(torch.randn(n, v))
    targets = buffer[n * v * 4:].view(torch.int64)
    targets.copy_(torch.randint(0, v, (n,)))
    zeros, ones = torch.zeros(n, device=DEVICE), torch.ones(n, device=DEVICE)
    with pytest.raises(ValueError, match=r"^targets: shares memory with logits"):
        fk.policy_loss(logits.requires_grad_(True), targets, zeros, ones, backend="triton", inplace_grad=True)


def test_fused_dpo_in_place_refuses_inputs_sharing_the_logits_memory():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 17, generator=g).to(DEVICE).requires_grad_(True) * 1.0
    targets = torch.randint(0, 17, (4, 3), generator=g).to(DEVICE)
    with pytest.raises(ValueError, match=r"^ref_chosen_logps: shares memory with logits"):
        fk.fused_dpo_loss(x, targets, None, x.detach()[:2, 0, 0], torch.zeros(2, device=DEVICE), backend="triton",
                          inplace_grad=True)


@pytest.mark.parametrize("op", ["policy_loss", "fused_dpo_loss"])
def test_in_place_gradient_fails_loudly_in_a_graph_that_saved_the_logits(op):
    batch = _on_device(_policy_batch(2))
    x = batch["logits"].clone().requires_grad_(True) * 1.0
    saved = (x * x).sum()  # mul saves x
    if op == "policy_loss":
        loss = fk.policy_loss(x, batch["targets"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                              backend="triton", inplace_grad=True).loss
    else:
        zero = torch.zeros(1, device=DEVICE)
        loss = fk.fused_dpo_loss(x, batch["targets"], batch["mask"], zero, zero, backend="triton",
                                 inplace_grad=True).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + saved).backward()


# Second derivatives


def _loss(op: str, batch: dict, leaves: tuple) -> torch.Tensor:
    if op == "token_logprobs":
        logp, entropy = fk.token_logprobs(leaves[0], batch["targets"], backend="triton")
        return logp.sum() + entropy.sum()
    if op == "policy_loss":
        return fk.policy_loss(leaves[0], batch["targets"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                              backend="triton", entropy_coef=0.1).loss
    if op == "fused_dpo_loss":
        zero = torch.zeros(1, device=DEVICE)
        return fk.fused_dpo_loss(leaves[0], batch["targets"], batch["mask"], zero, zero, backend="triton").loss
    if op == "linear_token_logprobs":
        logp, entropy = fk.linear_token_logprobs(*leaves, batch["targets"], backend="triton")
        return logp.sum() + entropy.sum()
    return fk.linear_policy_loss(*leaves, batch["targets"], batch["old_logprobs"], batch["advantages"], batch["mask"],
                                 backend="triton", entropy_coef=0.1).loss


@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss", "fused_dpo_loss", "linear_token_logprobs",
                                "linear_policy_loss"])
def test_double_backward_is_refused(op):
    """create_graph=True through the Triton backward raises instead of giving a silent zero."""
    g = torch.Generator().manual_seed(3)
    batch = _on_device(_policy_batch(3))
    if op.startswith("linear"):
        leaves = (torch.randn(2, 5, 6, generator=g).to(DEVICE).requires_grad_(True),
                  torch.randn(41, 6, generator=g).to(DEVICE).requires_grad_(True))
    else:
        leaves = (batch["logits"].clone().requires_grad_(True),)
    loss = _loss(op, batch, leaves)
    # The backward that would build the graph of the gradient is the one refused.
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(loss, leaves, create_graph=True)
    # A plain backward of the same graph still works.
    assert all(bool(torch.isfinite(gr).all()) for gr in torch.autograd.grad(loss, leaves))


# No-grad inputs and NaN logits at masked tokens


def test_inputs_without_gradient_stay_constants_when_they_require_grad():
    batch = _on_device(_batch(3))
    clean = _run("logits", "triton", batch, "clip")
    live = dict(batch, **{k: batch[k].clone().requires_grad_(True) for k in FIELDS})
    leaf = batch["logits"].clone().requires_grad_(True)
    out = fk.policy_loss(leaf, batch["targets"], mask=batch["mask"], backend="triton", loss_type="clip",
                         **{k: live[k] for k in FIELDS}, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)
    out.loss.backward()
    for field in FIELDS:
        assert live[field].grad is None, f"{field} received a gradient"
    assert torch.equal(leaf.grad, clean[1][0])


def test_nan_logits_at_masked_tokens_are_ignored():
    batch = _on_device(_batch(8))
    clean = _run("logits", "triton", batch, "clip")
    poisoned = dict(batch, logits=batch["logits"].masked_fill(~batch["mask"][..., None], float("nan")))
    _assert_same(clean, _run("logits", "triton", poisoned, "clip"), "NaN logits at masked tokens")
