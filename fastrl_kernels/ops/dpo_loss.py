"""DPO family: ``dpo_loss`` on sequence log-probs and ``fused_dpo_loss`` on logits.

``fused_dpo_loss`` streams the ``[2B, T, V]`` logits through the core primitives (docs/design.md,
"A training step: three passes over N x V"): the sequence log-probs, the pair losses and their gradient
w.r.t. each token's log-prob are O(N) PyTorch (``fastrl_kernels.losses.dpo``); the logits gradient is
one pass in backward.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import torch

from ..config import (
    FLOAT_DTYPES,
    DPOConfig,
    check_backend,
    check_float_tensor,
    check_logits_targets,
    check_same_device,
    check_shape,
    resolve_config,
)
from ..core import CoreParams
from ..losses.dpo import check_pair_weights, dpo_metrics, dpo_pair_losses, fused_dpo_objective, pair_mean
from .fused import fused_logits_loss, refuse_shared_storage
from .prepare import core_params, logits_rows, pair_inputs, route, transform_options


class DPOOutput(NamedTuple):
    """Result of the DPO ops. ``loss`` 0-d (differentiable); the rest detached: ``chosen_rewards``,
    ``rejected_rewards`` = beta * (policy - ref) and ``margins`` = their difference, ``[B]``;
    ``accuracy`` = mean(chosen_rewards > rejected_rewards), 0-d."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor

    @classmethod
    def from_aux(cls, loss: torch.Tensor, aux: dict) -> DPOOutput:
        """The output of the fused objective (``losses.dpo.fused_dpo_objective``), metrics as float32."""
        return cls(loss, *(aux[key].float() for key in ("chosen_rewards", "rejected_rewards", "margins",
                                                         "accuracy")))


def _check_pair_tensors(**named: Optional[torch.Tensor]) -> None:
    """Every given tensor a float ``[B]`` on the device of the first one."""
    first_name, first = next(iter(named.items()))
    check_float_tensor(first_name, first, FLOAT_DTYPES)
    if first.dim() != 1:
        raise ValueError(f"{first_name}: expected shape [B] (one sequence log-prob per pair), "
                         f"got {tuple(first.shape)}")
    for name, tensor in named.items():
        if tensor is None:
            continue
        check_float_tensor(name, tensor, FLOAT_DTYPES)
        check_shape(name, tensor, first.shape, f"[B] like {first_name}")
    check_same_device(first_name, first, **named)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    config: Optional[DPOConfig] = None,
    chosen_weights: Optional[torch.Tensor] = None,
    rejected_weights: Optional[torch.Tensor] = None,
    **overrides: Any,
) -> DPOOutput:
    """DPO-family loss from sequence log-probs (TRL ``DPOTrainer.dpo_loss``).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` float
            (fp32 / bf16 / fp16 / fp64), summed (or, for IPO, length-averaged) response log-probs.
        config: a ``DPOConfig``; keyword ``overrides`` (``beta=0.1``, ``loss_type="sigmoid"`` or a list
            with ``loss_weights``, ``label_smoothing``, ``f_divergence``, ``f_alpha``, ``discopop_tau``)
            update it. ``ld_alpha`` and ``average_logps`` shape sequence log-probs: they act in
            ``fused_dpo_loss`` only.
        chosen_weights, rejected_weights: optional ``[B]`` WPO sequence weights (both or neither; no
            gradient); each pair's loss is multiplied by their product. ``use_weighting=True`` requires them.

    Returns:
        ``DPOOutput``; loss = mean over pairs of the per-pair loss of ``reference.dpo.dpo_loss``
        (0 for B = 0). Results are float32 (float64 for float64 inputs). No host sync.
    """
    cfg = resolve_config(DPOConfig, config, overrides)
    _check_pair_tensors(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                        chosen_weights=chosen_weights, rejected_weights=rejected_weights)
    check_pair_weights(chosen_weights, rejected_weights)
    if cfg.use_weighting and chosen_weights is None:
        raise ValueError("use_weighting=True: expected chosen_weights and rejected_weights ([B] WPO weights); "
                         "fused_dpo_loss computes them from the logits")
    losses, chosen_rewards, rejected_rewards = dpo_pair_losses(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, cfg,
        chosen_weights, rejected_weights,
    )
    metrics = dpo_metrics(chosen_rewards, rejected_rewards)
    return DPOOutput(pair_mean(losses), chosen_rewards, rejected_rewards, metrics["margins"],
                     metrics["accuracy"])


def dpo_loss_reference(logits, targets, response, ref_chosen, ref_rejected, cfg: DPOConfig,
                       params: CoreParams) -> DPOOutput:
    """backend="reference": the float64 formulas of ``reference.dpo``, unfused, autograd to the logits."""
    from ..reference import dpo as ref

    options = transform_options(params)
    seq = ref.sequence_logprobs(logits, targets, response, average=cfg.average_logps, ld_alpha=cfg.ld_alpha,
                                **options)
    half = seq.shape[0] // 2
    chosen_w = rejected_w = None
    if cfg.use_weighting:
        weights = ref.wpo_weights(logits, targets, response, **options)
        chosen_w, rejected_w = weights[:half], weights[half:]
    losses, chosen_rewards, rejected_rewards = ref.dpo_loss(
        seq[:half], seq[half:], ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing, f_divergence=cfg.f_divergence, f_alpha=cfg.f_alpha,
        loss_weights=cfg.loss_weights, chosen_weights=chosen_w, rejected_weights=rejected_w,
        discopop_tau=cfg.discopop_tau,
    )
    metrics = dpo_metrics(chosen_rewards, rejected_rewards)
    return DPOOutput(losses.mean().float(), chosen_rewards.float(), rejected_rewards.float(),
                     metrics["margins"].float(), metrics["accuracy"].float())


def fused_dpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor],
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    config: Optional[DPOConfig] = None,
    backend: str = "auto",
    inplace_grad: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    **overrides: Any,
) -> DPOOutput:
    """DPO-family loss straight from the policy logits of the concatenated batch (TRL's
    ``concatenated_forward`` + ``dpo_loss``), never materialising log_softmax.

    Args:
        logits: ``[2B, T, V]`` fp32 / bf16 / fp16, rows ``[0:B]`` chosen and ``[B:2B]`` rejected responses,
            already aligned with ``targets`` (position t predicts ``targets[:, t]``).
        targets: int64 ``[2B, T]`` in ``[0, V)`` or ``ignore_index``.
        mask: bool / {0,1} ``[2B, T]``, 1 on response tokens (None = all); targets equal to
            ``ignore_index`` are never response tokens.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sequence log-probs, formed like the
            policy's (same ``average_logps``; current TRL also applies ``ld_alpha`` to them).
        config / overrides: ``DPOConfig`` options. Sequence log-prob = sum over response tokens of
            log softmax(x)[target] of the transformed logits x; ``average_logps=True`` divides by the response
            length (IPO-style; TRL does this for loss_type "ipo"), ``ld_alpha`` down-weights tokens
            past the shorter response of the pair (LD-DPO), ``use_weighting=True`` multiplies each pair's
            loss by its WPO weights (one more O(N) output of the core pass: log sum_v p_v^2).
        temperature, logit_scale, softcap: the logit transform of ``token_logprobs`` (the softmax is that of
            c tanh(logit_scale z / c) / temperature with softcap c, else logit_scale z / temperature).
        backend: "auto" | "torch" | "native" | "triton" | "reference" (float64, unfused, for testing).
        inplace_grad: backward writes the logits gradient into ``logits`` (overwritten then, with
            autograd's version counter bumped; zero extra N x V memory); ignored by "reference".

    Returns:
        ``DPOOutput`` (float32), equal to ``reference.dpo`` on ``reference.dpo.sequence_logprobs`` within
        the tolerances of docs/design.md, "Numerics and tolerances"; ``loss.backward()`` gives the
        gradient w.r.t. ``logits``.
    """
    cfg = resolve_config(DPOConfig, config, overrides)
    check_backend(backend)
    check_logits_targets(logits, targets, ignore_index)
    response = pair_inputs(logits, targets, mask, ref_chosen_logps, ref_rejected_logps, ignore_index, "logits")
    if inplace_grad:
        refuse_shared_storage(logits, targets=targets, mask=mask, ref_chosen_logps=ref_chosen_logps,
                              ref_rejected_logps=ref_rejected_logps)
    params = core_params(temperature, logit_scale, softcap, ignore_index)
    return route(
        backend, logits.device,
        lambda: dpo_loss_reference(logits, targets, response, ref_chosen_logps, ref_rejected_logps, cfg, params),
        lambda name: _fused_dpo_loss(logits, targets, response, ref_chosen_logps, ref_rejected_logps, cfg, params,
                                     name, inplace_grad),
    )


def _fused_dpo_loss(logits, targets, response, ref_chosen, ref_rejected, cfg, params, backend, inplace_grad):
    # Prompt and padding tokens become ignored rows, which the kernels skip.
    rows = logits_rows(logits, targets, response > 0, params.ignore_index)
    loss, _, _, aux = fused_logits_loss(rows, partial(fused_dpo_objective, cfg), (response, ref_chosen, ref_rejected),
                                        params=params, backend=backend, inplace_grad=inplace_grad,
                                        with_log_sum_p2=cfg.use_weighting)
    return DPOOutput.from_aux(loss, aux)
