"""``token_logprobs``: per-token log-probs and exact entropy of ``softmax(z / tau)`` (the core op).

Forward runs pass 1 (statistics); backward runs pass 2 with the incoming gradients of both outputs
as the per-token coefficients. Every loss on the logits path is this op plus O(N) algebra on its
outputs (``ops/fused.py``), so a training step reads the logits twice and writes N x V once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

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


class _TokenStats(torch.autograd.Function):
    """Pass 1 in forward; pass 2 in backward, with the upstream gradients of (logp, entropy) as its
    per-token coefficients, read from device memory (no host sync, no N x V scale afterwards).

    Whatever O(N) algebra consumes logp and entropy (a loss, metrics, a second loss on the same
    log-probs), autograd sums its gradients into those two [N] vectors before this backward runs once:
    a training step reads the logits twice and writes N x V once. With ``inplace_grad`` the gradient
    is written over the saved logits and autograd's version counter is bumped, so any other graph
    that saved them (or a second backward through this one) fails loudly instead of reading it.
    """

    @staticmethod
    def forward(ctx, logits, targets, backend: str, params: CoreParams, inplace_grad: bool, with_log_sum_p2: bool):
        stats = primitives(backend).stats(logits, targets, params, with_log_sum_p2)
        ctx.backend, ctx.params, ctx.inplace_grad = backend, params, inplace_grad
        ctx.save_for_backward(logits, targets, stats.lse, stats.mean_x)
        ctx.set_materialize_grads(False)
        # log sum p^2 (WPO weights) is a statistic of the policy, never differentiated.
        log_sum_p2 = stats.log_sum_p2 if with_log_sum_p2 else stats.logp.new_zeros(0)
        ctx.mark_non_differentiable(log_sum_p2)
        return stats.logp, stats.entropy, log_sum_p2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, grad_entropy, _grad_log_sum_p2):
        logits, targets, lse, mean_x = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        zeros = torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)
        g_lp = zeros if grad_logp is None else grad_logp.to(torch.float32)
        g_entropy = zeros if grad_entropy is None else grad_entropy.to(torch.float32)
        out = logits.detach() if ctx.inplace_grad else None
        grad = primitives(ctx.backend).grad(logits, targets, CoreStats(zeros, zeros, lse, mean_x), g_lp, g_entropy,
                                            ctx.params, out=out)
        if ctx.inplace_grad:
            # A kernel's write is invisible to autograd: announce it, so stale readers raise.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None


def token_stats(
    rows: torch.Tensor,
    targets: torch.Tensor,
    backend: str,
    params: CoreParams,
    *,
    inplace_grad: bool = False,
    with_log_sum_p2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, entropy, log_sum_p2)`` [N] float32 of ``rows`` [N, V] (unit stride in V) on a concrete
    backend, differentiable in ``rows`` through logp and entropy (pass 2 runs in backward, in place
    when ``inplace_grad``); log_sum_p2 is None unless asked for, and never differentiable."""
    logp, entropy, log_sum_p2 = _TokenStats.apply(rows, targets, backend, params, inplace_grad, with_log_sum_p2)
    return logp, entropy, (log_sum_p2 if with_log_sum_p2 else None)


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
        logp, entropy, _ = token_stats(rows, flat_targets, concrete, params)
        logp, entropy = logp.view(leading), entropy.view(leading)
    return logp, (entropy if with_entropy else None)
