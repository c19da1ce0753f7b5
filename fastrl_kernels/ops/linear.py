"""The lm_head paths: losses of ``logits = hidden @ weight^T (+ bias)`` without ever holding N x V logits.

``linear_token_logprobs``, ``linear_policy_loss`` and ``linear_dpo_loss`` give the results of
``token_logprobs`` / ``policy_loss`` / ``fused_dpo_loss`` on those logits, computed C token rows at a
time by ``ops/linear_chunks.py`` (routes, GEMM counts and the chunk-size rule are documented there):
per chunk, logits GEMM -> stats -> coefficients -> gradient in place -> grad_hidden and grad_weight
GEMMs. Extra memory: one C x V logits chunk in the hidden dtype, O(N) statistics, and the gradients
(grad_weight accumulated in float32 over the chunks, cast once at the end).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Union

import torch

from ..config import (
    DPOConfig,
    PolicyLossConfig,
    check_backend,
    check_linear_inputs,
    check_policy_inputs,
    resolve_config,
)
from ..losses.aggregation import Normalizer, aggregation_weights
from ..losses.dpo import fused_dpo_objective
from ..losses.policy import SEPARABLE_POLICY_LOSS_TYPES, separable_policy_terms, separate_kl
from .dpo_loss import DPOOutput, dpo_loss_reference
from .linear_chunks import (
    LinearLoss,
    LinearSpec,
    LinearTokenLogprobs,
    choose_chunk_size,
    count_gemms,
    evaluate_without_grad,
    stats_sweep,
)
from .logprobs import token_logprobs_reference
from .policy_loss import PolicyLossOutput, policy_loss_reference
from .prepare import (
    PolicyInputs,
    Rows,
    core_params,
    hidden_rows,
    pair_inputs,
    policy_config,
    policy_inputs,
    reference_logits,
    route,
)

__all__ = ["count_gemms", "linear_dpo_loss", "linear_policy_loss", "linear_token_logprobs"]


def _spec(rows: Rows, weight, backend: str, params, chunk_size: Optional[int], **fields: Any) -> LinearSpec:
    """The chunked engine's options on a concrete ``backend``; ``chunk_size`` None picks one."""
    if chunk_size is None:
        chunk_size = choose_chunk_size(rows.rows.shape[0], weight.shape[0], rows.rows.dtype, rows.rows.device)
    elif not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    return LinearSpec(backend, params, chunk_size, **fields)


def _wants_grad(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _run_loss(rows: Rows, weight, bias, spec: LinearSpec, token_inputs: tuple, loss_inputs: tuple):
    """(loss, logp [N], entropy [N], aux) through the Function, or a stats-only sweep when no grad is wanted."""
    if not _wants_grad(rows.rows, weight, bias, *loss_inputs):
        return evaluate_without_grad(rows.rows, weight, bias, rows.targets, spec, loss_inputs)
    outputs = LinearLoss.apply(rows.rows, weight, bias, rows.targets, spec, token_inputs, *loss_inputs)
    return outputs[0], outputs[1], outputs[2], dict(zip(spec.aux_keys, outputs[3:]))


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``token_logprobs(hidden @ weight^T + bias, targets, ...)`` computed in token chunks.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` final hidden states, fp32 / bf16 / fp16 (fp64 accepted).
        weight: ``[V, H]`` lm_head weight, bias: ``[V]`` or None; both in the hidden dtype. The GEMMs run
            in that dtype; statistics in float32.
        targets: int64 of the leading shape, in ``[0, V)`` or ``ignore_index`` (0 logp / entropy, no grad).
        temperature, logit_scale, softcap: as ``token_logprobs`` (x = c tanh(scale z / c) / tau).
        backend: "auto" (triton on CUDA, native / torch on CPU) | "torch" | "native" | "triton" |
            "reference" (float64 full logits, for testing).
        chunk_size: token rows per chunk; None picks one (``linear_chunks.choose_chunk_size``).

    Returns:
        ``(logprobs, entropy)`` float32 of the leading shape (entropy None when ``with_entropy=False``):
        logprobs = log softmax(x)[target] (TRL's ``selective_log_softmax`` / verl's ``logprobs_from_logits``
        on the lm_head output). Under ``torch.no_grad`` (rollout old / ref log-probs) one GEMM per chunk
        and no gradient buffers; otherwise differentiable in hidden, weight and bias, the backward
        recomputing each chunk (1 GEMM forward, 3 backward).
    """
    check_backend(backend)
    check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    params = core_params(temperature, logit_scale, softcap, ignore_index)
    logp, entropy = route(
        backend, hidden.device,
        lambda: token_logprobs_reference(reference_logits(hidden, weight, bias), targets, params),
        lambda name: _linear_logprobs(hidden_rows(hidden, targets), weight, bias, name, params, chunk_size),
    )
    return logp, (entropy if with_entropy else None)


def _linear_logprobs(rows: Rows, weight, bias, backend: str, params, chunk_size) -> tuple:
    spec = _spec(rows, weight, backend, params, chunk_size)
    if _wants_grad(rows.rows, weight, bias):
        logp, entropy = LinearTokenLogprobs.apply(rows.rows, weight, bias, rows.targets, spec)
    else:
        store = stats_sweep(rows.rows, weight, bias, rows.targets, spec.backend, params, spec.chunk_size)
        logp, entropy = store.logp, store.entropy
    return rows.unflatten(logp, entropy)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    normalizer: Normalizer = None,
    is_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: Optional[float] = None,
    **config_overrides: Union[str, float, None],
) -> PolicyLossOutput:
    """``policy_loss(hidden @ weight^T + bias, targets, ...)`` without the N x V logits.

    Args:
        hidden: ``[B, T, H]`` (or ``[N, H]``: one sequence), fp32 / bf16 / fp16; weight ``[V, H]``, bias
            ``[V]`` or None, in the hidden dtype.
        targets, old_logprobs, advantages, mask, ref_logprobs, config / config_overrides, normalizer,
            is_weights, ignore_index, temperature, logit_scale, softcap: exactly as ``policy_loss`` (leading shape
            ``[B, T]``; advantages ``[B, T]`` or ``[B]``; mask bool / {0,1}; targets == ignore_index masked).
        backend: as ``linear_token_logprobs``. chunk_size: token rows per chunk (None: automatic).

    Returns:
        ``PolicyLossOutput(loss, logprobs, entropy, metrics)``, the same fields and values as
        ``policy_loss`` on the logits (TRL / verl conventions as documented there). Gradients for hidden,
        weight and bias are computed in the forward: loss types "clip", "cispo", "sapo" (any KL estimator,
        entropy term, aggregation) are sums of per-token terms with mask-only weights, so each chunk is
        visited once (3 GEMMs); "gspo" / "gspo_token" couple a sequence's tokens and take two sweeps
        (4 GEMMs). Under ``torch.no_grad`` one GEMM per chunk.
    """
    cfg = policy_config(config, config_overrides, temperature)
    check_backend(backend)
    check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    check_policy_inputs(hidden, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg, name="hidden")
    inputs = policy_inputs(hidden, targets, mask, old_logprobs, advantages, ref_logprobs, is_weights, normalizer,
                           ignore_index, like_name="hidden")
    params = core_params(cfg.temperature, logit_scale, softcap, ignore_index)
    return route(
        backend, hidden.device,
        lambda: policy_loss_reference(reference_logits(hidden, weight, bias), targets, old_logprobs, advantages,
                                      inputs.mask, ref_logprobs, is_weights, normalizer, cfg, params),
        lambda name: _linear_policy_loss(hidden_rows(hidden, targets, inputs.keep, ignore_index), weight, bias,
                                         inputs, cfg, params, name, chunk_size),
    )


def _linear_policy_loss(rows: Rows, weight, bias, inputs: PolicyInputs, cfg, params, backend, chunk_size):
    token_fn, token_inputs = None, ()
    if cfg.loss_type in SEPARABLE_POLICY_LOSS_TYPES:
        def flat(tensor):
            return None if tensor is None else tensor.detach().reshape(-1)

        old, adv, mask_bt, _, ref, is_weights, normalizer = inputs.loss_inputs
        weights = aggregation_weights(mask_bt, cfg.loss_agg, normalizer)
        entropy_weights = (aggregation_weights(mask_bt, cfg.resolved_entropy_agg, normalizer)
                           if cfg.entropy_coef != 0.0 else None)
        kl_weights = aggregation_weights(mask_bt, cfg.kl_agg, normalizer) if separate_kl(cfg) else None
        token_inputs = (flat(old), flat(adv.expand(inputs.shape)), flat(ref), flat(is_weights), flat(weights),
                        flat(entropy_weights), flat(kl_weights))
        token_fn = partial(_separable_terms, cfg=cfg)
    spec = _spec(rows, weight, backend, params, chunk_size, loss_fn=inputs.loss_fn(cfg), token_fn=token_fn)
    loss, logp, entropy, metrics = _run_loss(rows, weight, bias, spec, token_inputs, inputs.loss_inputs)
    return PolicyLossOutput(loss, *rows.unflatten(logp, entropy), metrics)


def _separable_terms(logp, entropy, old, adv, ref, is_weights, weights, entropy_weights, kl_weights, *, cfg):
    return separable_policy_terms(logp, entropy, old, adv, ref, is_weights, weights, entropy_weights, cfg,
                                  kl_weights)


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor],
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[DPOConfig] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    **overrides: Any,
) -> DPOOutput:
    """``fused_dpo_loss(hidden @ weight^T + bias, targets, mask, ...)`` without the N x V logits.

    Args:
        hidden: ``[2B, T, H]``, rows ``[0:B]`` chosen and ``[B:2B]`` rejected responses (TRL's concatenated
            batch), fp32 / bf16 / fp16; weight ``[V, H]`` and bias ``[V]`` (or None) in the hidden dtype.
        targets, mask, ref_chosen_logps, ref_rejected_logps, config / overrides, temperature, logit_scale,
            softcap, ignore_index: as ``fused_dpo_loss`` (every DPO type, ``average_logps``, ``ld_alpha``, WPO
            ``use_weighting``).
        backend, chunk_size: as ``linear_token_logprobs``.

    Returns:
        ``DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)`` equal to ``fused_dpo_loss``
        on the logits. A pair's loss couples all tokens of both responses, so the gradient takes two
        sweeps (stats of every chunk, then the gradient: 4 GEMMs per chunk).
    """
    cfg = resolve_config(DPOConfig, config, overrides)
    check_backend(backend)
    check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    response = pair_inputs(hidden, targets, mask, ref_chosen_logps, ref_rejected_logps, ignore_index, "hidden")
    params = core_params(temperature, logit_scale, softcap, ignore_index)
    loss_inputs = (response, ref_chosen_logps, ref_rejected_logps)
    return route(
        backend, hidden.device,
        lambda: dpo_loss_reference(reference_logits(hidden, weight, bias), targets, *loss_inputs, cfg, params),
        lambda name: _linear_dpo_loss(hidden_rows(hidden, targets, response > 0, ignore_index), weight, bias,
                                      loss_inputs, cfg, params, name, chunk_size),
    )


def _linear_dpo_loss(rows: Rows, weight, bias, loss_inputs, cfg, params, backend, chunk_size) -> DPOOutput:
    # Prompt and padding tokens become ignored rows, which the kernels skip (as on the logits path).
    spec = _spec(rows, weight, backend, params, chunk_size, loss_fn=partial(fused_dpo_objective, cfg),
                 with_log_sum_p2=cfg.use_weighting)
    loss, _, _, aux = _run_loss(rows, weight, bias, spec, (), loss_inputs)
    return DPOOutput.from_aux(loss, aux)
