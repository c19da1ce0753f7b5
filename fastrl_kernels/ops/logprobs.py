"""``token_logprobs``: per-token log-probs and exact entropy of ``softmax(z / tau)`` (the core op).

Forward runs pass 1 (statistics); backward runs pass 2 with the incoming gradients of both outputs
as the per-token coefficients. Use the fused losses when the loss is known: they run pass 2 in the
forward and need no saved logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import primitives, resolve_backend
from ..config import check_backend, check_logits_targets, check_temperature
from ..core import CoreParams, CoreStats


def core_params(temperature: float, logit_scale: float, softcap: Optional[float], ignore_index: int) -> CoreParams:
    check_temperature(temperature)
    if not logit_scale > 0:
        raise ValueError(f"logit_scale: expected a number > 0, got {logit_scale!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
    return CoreParams(float(temperature), float(logit_scale), None if softcap is None else float(softcap),
                      int(ignore_index))


def flatten_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., V]`` logits as ``[N, V]`` rows with unit stride in V (a view when the layout allows)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows, targets.reshape(-1)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, backend: str, params: CoreParams):
        stats = primitives(backend).stats(logits, targets, params)
        ctx.backend, ctx.params = backend, params
        ctx.save_for_backward(logits, targets, stats.lse, stats.mean_x)
        ctx.set_materialize_grads(False)
        return stats.logp, stats.entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, mean_x = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        grad = grad_from_upstream(ctx.backend, logits, targets, lse, mean_x, grad_logp, grad_entropy, ctx.params)
        return grad, None, None, None


def grad_from_upstream(
    backend: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_x: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    params: CoreParams,
) -> torch.Tensor:
    """Pass 2 with the upstream gradients of (logp, entropy) as coefficients (None = no gradient)."""
    zeros = torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)
    return primitives(backend).grad(
        logits,
        targets,
        CoreStats(zeros, zeros, lse, mean_x),
        grad_logp if grad_logp is not None else zeros,
        grad_entropy if grad_entropy is not None else zeros,
        params,
    )


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each target token and the entropy of each row, streaming over the vocabulary.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, fp32 / bf16 / fp16 (fp64 accepted); rows with unit stride in
            V are read in place, others are copied once.
        targets: int64 of the leading shape, in ``[0, V)`` or ``ignore_index``.
        temperature, logit_scale, softcap: x = c tanh(logit_scale z / c) / temperature with softcap c
            (Gemma-2's final_logit_softcapping), else logit_scale z / temperature.
        with_entropy: return the entropy of softmax(x) (computed in the same pass either way).
        backend: "auto" | "torch" | "native" | "triton" | "reference".

    Returns:
        ``(logprobs, entropy)`` float32 of the leading shape (entropy None when ``with_entropy=False``):
        logprobs = log softmax(x)[target] (TRL's ``selective_log_softmax``, verl's
        ``logprobs_from_logits``), entropy = -sum p log p (TRL's ``entropy_from_logits``).
        Rows whose target is ``ignore_index`` give 0 for both and a zero gradient. Differentiable in
        ``logits`` through both outputs.
    """
    check_backend(backend)
    check_logits_targets(logits, targets, ignore_index)
    params = core_params(temperature, logit_scale, softcap, ignore_index)
    leading = logits.shape[:-1]
    if backend == "reference":
        from ..reference import token_logprobs as reference_token_logprobs

        logp, entropy = reference_token_logprobs(
            logits, targets, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ignore_index=ignore_index,
        )
        logp, entropy = logp.float(), entropy.float()
    else:
        concrete = resolve_backend(backend, logits.device)
        rows, flat_targets = flatten_rows(logits, targets)
        logp, entropy = _TokenLogprobs.apply(rows, flat_targets, concrete, params)
        logp, entropy = logp.view(leading), entropy.view(leading)
    return logp, (entropy if with_entropy else None)
