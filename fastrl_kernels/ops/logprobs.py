"""``token_logprobs``: per-token log-probs and exact entropy of ``softmax(z / tau)`` (the core op).

Forward runs pass 1 (statistics); backward runs pass 2 with the incoming gradients of both outputs
as the per-token coefficients. Every loss on the logits path is this op plus O(N) algebra on its
outputs (``ops/fused.py``), so a training step reads the logits twice and writes N x V once.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import primitives
from ..config import check_backend, check_logits_targets
from ..core import CoreParams, CoreStats
from .prepare import Rows, core_params, logits_rows, route, transform_options


def refuse_double_backward(op: str) -> None:
    """Raises when autograd runs a backward with ``create_graph=True`` (grad mode is on only then).

    The fused gradients are written by kernels outside autograd's graph: a second derivative through
    them would silently be zero, so it is refused instead; the reference backend differentiates twice.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported by the fused backends, whose "
            "gradient is computed outside autograd; use backend='reference' for higher-order gradients"
        )


# The two primitives as torch.library custom ops, so torch.compile(fullgraph=True) traces every loss
# on the logits path (the backends are opaque calls: C++, Triton, chunked torch) and autograd runs
# pass 2 in backward. CoreParams travels as its four fields (custom ops take plain types).


@torch.library.custom_op("fastrl_kernels::token_stats", mutates_args=())
def _stats_op(
    logits: torch.Tensor, targets: torch.Tensor, backend: str, temperature: float, logit_scale: float,
    softcap: Optional[float], ignore_index: int, with_log_sum_p2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = CoreParams(temperature, logit_scale, softcap, ignore_index)
    stats = primitives(backend).stats(logits, targets, params, with_log_sum_p2)
    outputs = _unaliased((stats.logp, stats.entropy, stats.lse, stats.mean_x)
                         + ((stats.log_sum_p2,) if with_log_sum_p2 else ()), (logits, targets))
    # (without log sum p^2, a fresh empty tensor: it aliases nothing)
    return outputs if with_log_sum_p2 else outputs + (stats.logp.new_zeros(0),)


def _unaliased(outputs: tuple, inputs: tuple) -> tuple:
    """``outputs`` with a copy (O(N)) of each one that shares memory with an input or an earlier output: a
    custom op's outputs may not alias (backends return [N] views of one buffer). Empty ones are copied
    whatever their storage (N = 0: views of one empty buffer still share it, at a null address)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    fresh = []
    for t in outputs:
        address = t.untyped_storage().data_ptr()
        if address in seen or t.numel() == 0:
            t = t.clone()
        else:
            seen.add(address)
        fresh.append(t)
    return tuple(fresh)


@_stats_op.register_fake
def _(logits, targets, backend, temperature, logit_scale, softcap, ignore_index, with_log_sum_p2):
    n = logits.shape[0]
    f32, f64 = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float64)
    return f32, torch.empty_like(f32), f64, torch.empty_like(f64), logits.new_empty(n if with_log_sum_p2 else 0,
                                                                                     dtype=torch.float32)


def _grad_inputs(lse, mean_x, backend, temperature, logit_scale, softcap, ignore_index):
    """(primitives, the stats pass 2 reads, CoreParams) from a grad op's plain arguments."""
    unread = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)  # pass 2 reads lse and mean_x only
    stats = CoreStats(unread, unread, lse, mean_x)
    return primitives(backend), stats, CoreParams(temperature, logit_scale, softcap, ignore_index)


@torch.library.custom_op("fastrl_kernels::token_grad", mutates_args=())
def _grad_op(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_x: torch.Tensor, g_lp: torch.Tensor,
    g_entropy: torch.Tensor, backend: str, temperature: float, logit_scale: float, softcap: Optional[float],
    ignore_index: int,
) -> torch.Tensor:
    prims, stats, params = _grad_inputs(lse, mean_x, backend, temperature, logit_scale, softcap, ignore_index)
    return prims.grad(logits, targets, stats, g_lp, g_entropy, params)


@_grad_op.register_fake
def _(logits, targets, lse, mean_x, g_lp, g_entropy, backend, temperature, logit_scale, softcap, ignore_index):
    return torch.empty_like(logits)


@torch.library.custom_op("fastrl_kernels::token_grad_", mutates_args=("logits",))
def _grad_inplace_op(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, mean_x: torch.Tensor, g_lp: torch.Tensor,
    g_entropy: torch.Tensor, backend: str, temperature: float, logit_scale: float, softcap: Optional[float],
    ignore_index: int,
) -> None:
    """The gradient written over the logits (the op declares the mutation: the version counter moves)."""
    prims, stats, params = _grad_inputs(lse, mean_x, backend, temperature, logit_scale, softcap, ignore_index)
    prims.grad(logits, targets, stats, g_lp, g_entropy, params, out=logits)


def _zeros_like_rows(lse: torch.Tensor) -> torch.Tensor:
    return torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)


class _TokenStats(torch.autograd.Function):
    """Pass 1 in forward; pass 2 in backward, with the upstream gradients of (logp, entropy) as its
    per-token coefficients, read from device memory (no host sync, no N x V scale afterwards).

    Whatever O(N) algebra consumes logp and entropy (a loss, metrics, a second loss on the same
    log-probs), autograd sums its gradients into those two [N] vectors before this backward runs once:
    a training step reads the logits twice and writes N x V once. With ``inplace_grad`` the gradient
    is written over the saved logits and autograd's version counter moves, so any other graph that
    saved them (or a second backward through this one) fails loudly instead of reading it.
    """

    @staticmethod
    def forward(ctx, logits, targets, backend: str, params: CoreParams, inplace_grad: bool, with_log_sum_p2: bool):
        options = (backend, params.temperature, params.logit_scale, params.softcap, params.ignore_index)
        logp, entropy, lse, mean_x, log_sum_p2 = _stats_op(logits, targets, *options, with_log_sum_p2)
        ctx.save_for_backward(logits, targets, lse, mean_x)
        ctx.options, ctx.inplace_grad = options, inplace_grad
        # log sum p^2 (WPO weights) is a statistic of the policy, never differentiated.
        ctx.mark_non_differentiable(log_sum_p2)
        ctx.set_materialize_grads(False)
        return logp, entropy, log_sum_p2

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_log_sum_p2):
        refuse_double_backward("token_logprobs")
        if grad_logp is None and grad_entropy is None:
            return (None,) * 6
        logits, targets, lse, mean_x = ctx.saved_tensors
        g_lp = _zeros_like_rows(lse) if grad_logp is None else grad_logp.to(torch.float32)
        g_entropy = _zeros_like_rows(lse) if grad_entropy is None else grad_entropy.to(torch.float32)
        if ctx.inplace_grad:
            _grad_inplace_op(logits, targets, lse, mean_x, g_lp, g_entropy, *ctx.options)
            grad = logits
        else:
            grad = _grad_op(logits, targets, lse, mean_x, g_lp, g_entropy, *ctx.options)
        return (grad,) + (None,) * 5


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
        logits: ``[N, V]`` or ``[B, T, V]``, fp32 / bf16 / fp16, or fp64 for tests (the fused backends
            compute in fp32 whatever the dtype; the gradient comes back in the logits' dtype); rows with
            unit stride in V are read in place, others are copied once. N = 0 gives empty outputs.
        targets: int64 of the leading shape, in ``[0, V)`` or ``ignore_index``.
        temperature, logit_scale, softcap: x = c tanh(logit_scale z / c) / temperature with softcap c
            (Gemma-2's final_logit_softcapping), else logit_scale z / temperature; each finite and > 0
            (softcap None: no cap).
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
    logp, entropy = route(backend, logits.device, lambda: token_logprobs_reference(logits, targets, params),
                          lambda name: rows_logprobs(logits_rows(logits, targets), name, params))
    return logp, (entropy if with_entropy else None)


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, params: CoreParams) -> tuple:
    """backend="reference": the float64 formulas (``reference.token_logprobs``), as float32."""
    from ..reference import token_logprobs as reference_token_logprobs

    logp, entropy = reference_token_logprobs(logits, targets, **transform_options(params))
    return logp.float(), entropy.float()


def rows_logprobs(rows: Rows, backend: str, params: CoreParams) -> tuple:
    """``(logp, entropy)`` of prepared logits rows on a concrete backend, in the leading shape."""
    logp, entropy, _ = token_stats(rows.rows, rows.targets, backend, params)
    return rows.unflatten(logp, entropy)
