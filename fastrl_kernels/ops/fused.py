"""The fused loss Function of SPEC section 6b, shared by every loss on the logits path.

forward: pass 1 (``stats``) -> per-token logp and entropy -> the loss, ordinary PyTorch on
[N]-sized tensors -> its coefficients g_lp = dL/dlogp and g_H = dL/dH by autograd on that small
graph -> pass 2 (``grad``) writes dL/dlogits, all inside the forward. backward only scales the
stored gradient by the incoming scalar, so a training step reads the logits twice and writes once,
whatever the loss. New loss variants need no new kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends import primitives, resolve_backend
from ..core import CoreParams
from .logprobs import grad_from_upstream

LossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class FusedSpec:
    """Everything the Function needs besides tensors (one object instead of many positional args)."""

    backend: str
    params: CoreParams
    loss_fn: LossFn
    inplace_grad: bool = False
    with_log_sum_p2: bool = False
    # Filled by forward with the names of loss_fn's aux outputs (the Function returns them as a tuple).
    aux_keys: list = field(default_factory=list)


class _FusedLogitsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, spec: FusedSpec, *loss_inputs: Any):
        prims = primitives(spec.backend)
        stats = prims.stats(logits, targets, spec.params, spec.with_log_sum_p2)
        grad_positions = [
            i for i, value in enumerate(loss_inputs) if isinstance(value, torch.Tensor) and value.requires_grad
        ]

        def loss_of(logp, entropy, *grad_inputs):
            inputs = list(loss_inputs)
            for i, value in zip(grad_positions, grad_inputs):
                inputs[i] = value
            return spec.loss_fn(logp, entropy, stats.log_sum_p2, *inputs)

        # torch.func.vjp rather than autograd.grad: it differentiates the O(N) loss under the no-grad
        # forward of a Function and traces under torch.compile.
        loss, vjp_fn, aux = torch.func.vjp(
            loss_of, stats.logp, stats.entropy, *[loss_inputs[i].detach() for i in grad_positions], has_aux=True
        )
        grads = vjp_fn(torch.ones_like(loss))
        g_lp, g_entropy = grads[0], grads[1]
        # In place: the gradient overwrites the logits' storage (documented on inplace_grad). A
        # detached alias keeps autograd's version counter, so a graph that saved the logits fails loudly.
        out = logits.detach() if spec.inplace_grad else None
        grad_logits = prims.grad(logits, targets, stats, g_lp, g_entropy, spec.params, out=out)
        input_grads = [None] * len(loss_inputs)
        for i, g in zip(grad_positions, grads[2:]):
            input_grads[i] = g
        ctx.spec = spec
        ctx.input_grads = input_grads
        ctx.backward_done = False
        ctx.save_for_backward(grad_logits, logits, targets, stats.lse, stats.mean_x)
        ctx.set_materialize_grads(False)
        aux_tensors = tuple(aux.values())
        ctx.mark_non_differentiable(*aux_tensors)
        spec.aux_keys[:] = list(aux.keys())
        return (loss.detach(), stats.logp, stats.entropy) + aux_tensors

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, *_aux_grads):
        if ctx.backward_done:
            raise RuntimeError(
                "fastrl_kernels fused loss: backward was already run once; the logits gradient is computed "
                "in the forward and scaled in place, so run the forward again instead of retain_graph=True"
            )
        ctx.backward_done = True
        grad_logits, logits, targets, lse, mean_x = ctx.saved_tensors
        spec: FusedSpec = ctx.spec
        if grad_loss is None:
            grad_logits = None
        else:
            # The stored buffer is the gradient for d(output)=1; scaling it in place avoids a second N x V buffer.
            grad_logits = grad_logits.mul_(grad_loss.to(grad_logits.dtype))
        if grad_logp is not None or grad_entropy is not None:
            if spec.inplace_grad:
                raise RuntimeError(
                    "fastrl_kernels fused loss: the returned logprobs/entropy were used in another loss, "
                    "which needs the logits, but inplace_grad=True overwrote them; use inplace_grad=False"
                )
            extra = grad_from_upstream(
                spec.backend, logits, targets, lse, mean_x, grad_logp, grad_entropy, spec.params
            )
            grad_logits = extra if grad_logits is None else grad_logits.add_(extra)
        input_grads = [
            None if g is None or grad_loss is None else g * grad_loss.to(g.dtype) for g in ctx.input_grads
        ]
        return (grad_logits, None, None, *input_grads)


# torch.compile (2.13) cannot trace a Function whose forward differentiates a sub-graph (torch.func.vjp
# or autograd.grad inside it): Dynamo stops at this call with one graph break and runs it eagerly, so
# the surrounding model still compiles; fullgraph=True is not available for the fused losses.
@torch._disable_dynamo  # torch.compiler.disable, without importing Dynamo (and triton) at import time
def _apply_fused(*args: Any):
    return _FusedLogitsLoss.apply(*args)


def fused_logits_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn,
    loss_inputs: tuple = (),
    *,
    params: CoreParams,
    backend: str = "auto",
    inplace_grad: bool = False,
    with_log_sum_p2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A scalar loss of per-token (logp, entropy) of ``logits [N, V]``, with its gradient fused in.

    ``loss_fn(logp [N] f32, entropy [N] f32, log_sum_p2 [N] or None, *loss_inputs) -> (loss 0-d, aux)``
    is differentiable PyTorch on O(N) tensors; ``aux`` is a dict of tensors returned detached.
    Returns ``(loss fp32 0-d, logp [N] fp32, entropy [N] fp32, aux)``. logp and entropy may feed other
    losses too (one more pass over the logits in backward then). ``backend`` is a concrete or "auto" name
    (not "reference"); ``inplace_grad=True`` overwrites ``logits`` with the gradient: do not reuse them.
    """
    backend = resolve_backend(backend, logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    spec = FusedSpec(backend, params, loss_fn, inplace_grad, with_log_sum_p2)
    outputs = _apply_fused(logits, targets, spec, *loss_inputs)
    loss, logp, entropy = outputs[:3]
    return loss, logp, entropy, dict(zip(spec.aux_keys, outputs[3:]))
