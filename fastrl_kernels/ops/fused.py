"""The loss path shared by every loss on the logits: ``token_stats`` + O(N) algebra.

forward: pass 1 (``stats``) -> per-token logp and entropy -> the loss, ordinary differentiable PyTorch
on [N]-sized tensors. backward: autograd takes the loss back to dL/dlogp and dL/dH (O(N)), then
``token_stats``'s backward runs pass 2 once with them as coefficients, writing dL/dlogits (into the
logits with ``inplace_grad``). A training step reads the logits twice and writes N x V once,
whatever the loss; under ``torch.no_grad()`` only pass 1 runs. New loss variants need no new kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import CoreParams
from .logprobs import token_stats
from .prepare import Rows

LossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def refuse_shared_storage(logits: torch.Tensor, **others) -> None:
    """``inplace_grad`` overwrites the logits during backward: an input sharing their memory would be
    overwritten with them (and read afterwards), so it is refused. ``others``: name -> tensor or None."""
    if torch.compiler.is_compiling():  # storages are not traceable; the eager call checks them
        return
    storage = logits.untyped_storage().data_ptr()
    for name, tensor in others.items():
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() == storage:
            raise ValueError(
                f"{name}: shares memory with logits, which inplace_grad=True overwrites with their gradient; "
                f"pass a copy ({name}.clone()) or use inplace_grad=False"
            )


def fused_logits_loss(
    rows: Rows,
    loss_fn: LossFn,
    loss_inputs: tuple = (),
    *,
    params: CoreParams,
    backend: str,
    inplace_grad: bool,
    with_log_sum_p2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A scalar loss of per-token (logp, entropy) of prepared logits ``rows`` (``prepare.logits_rows``).

    ``loss_fn(logp [N] f32, entropy [N] f32, log_sum_p2 [N] or None, *loss_inputs) -> (loss 0-d, aux)``
    is differentiable PyTorch on O(N) tensors; ``aux`` is a dict of tensors returned detached.
    Returns ``(loss fp32 0-d, logp [N] fp32, entropy [N] fp32, aux)``. logp and entropy may feed other
    losses too: their gradients join the loss's before the one pass 2. ``backend`` is a concrete name
    (``prepare.route``); ``inplace_grad=True`` overwrites the logits with the gradient during backward
    (autograd's version counter is bumped: a graph that saved them raises).
    """
    logp, entropy, log_sum_p2 = token_stats(rows.rows, rows.targets, backend, params, inplace_grad=inplace_grad,
                                            with_log_sum_p2=with_log_sum_p2)
    loss, aux = loss_fn(logp, entropy, log_sum_p2, *loss_inputs)
    return loss, logp, entropy, {key: value.detach() if value.requires_grad else value for key, value in aux.items()}
