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

from ..backends import resolve_backend
from ..config import (
    FLOAT_DTYPES,
    DPOConfig,
    PolicyLossConfig,
    as_float_mask,
    check_backend,
    check_float_tensor,
    check_same_device,
    check_shape,
    resolve_config,
)
from ..losses.aggregation import Normalizer, aggregation_weights
from ..losses.policy import SEPARABLE_POLICY_LOSS_TYPES, separable_policy_terms
from .linear_chunks import (
    LinearLoss,
    LinearSpec,
    LinearTokenLogprobs,
    choose_chunk_size,
    count_gemms,
    evaluate_without_grad,
    stats_sweep,
)
from .logprobs import core_params
from .policy_loss import PolicyLossOutput, _batch_shape, _check_policy_inputs, _loss_on_rows

__all__ = ["count_gemms", "linear_dpo_loss", "linear_policy_loss", "linear_token_logprobs"]


def _check_linear_inputs(hidden, weight, bias, targets, ignore_index: int) -> None:
    """hidden ``[N, H]`` / ``[B, T, H]``, weight ``[V, H]``, bias ``[V]``, same float dtype and device;
    targets int64 of the leading shape in [0, V) or ignore_index (range checked on CPU only: no sync)."""
    check_float_tensor("hidden", hidden, FLOAT_DTYPES)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    check_float_tensor("weight", weight, (hidden.dtype,))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (V >= 1, H of hidden), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, (hidden.dtype,))
        check_shape("bias", bias, (weight.shape[0],), "[V], the rows of weight")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets: expected an int64 torch.Tensor, got {got}")
    check_shape("targets", targets, hidden.shape[:-1], "the leading shape of hidden")
    check_same_device("hidden", hidden, weight=weight, bias=bias, targets=targets)
    if targets.device.type == "cpu" and targets.numel() > 0:
        vocab = weight.shape[0]
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                             f"got {int(targets[bad][0])}")


def _rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), targets.reshape(-1)


def _reference_logits(hidden, weight, bias) -> torch.Tensor:
    """Full float64 logits for backend="reference" (testing only: holds N x V)."""
    logits = hidden.double() @ weight.double().t()
    return logits if bias is None else logits + bias.double()


def _spec(hidden_rows, weight, backend: str, params, chunk_size: Optional[int], **fields: Any) -> LinearSpec:
    concrete = resolve_backend(backend, hidden_rows.device)
    if chunk_size is None:
        chunk_size = choose_chunk_size(hidden_rows.shape[0], weight.shape[0], hidden_rows.dtype, hidden_rows.device)
    elif not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    return LinearSpec(concrete, params, chunk_size, **fields)


def _wants_grad(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _run_loss(rows, weight, bias, targets, spec: LinearSpec, token_inputs: tuple, loss_inputs: tuple):
    """(loss, logp [N], entropy [N], aux) through the Function, or a stats-only sweep when no grad is wanted."""
    if not _wants_grad(rows, weight, bias, *loss_inputs):
        return evaluate_without_grad(rows, weight, bias, targets, spec, loss_inputs)
    outputs = LinearLoss.apply(rows, weight, bias, targets, spec, token_inputs, *loss_inputs)
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
    _check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    params = core_params(temperature, logit_scale, softcap, ignore_index)
    leading = hidden.shape[:-1]
    if backend == "reference":
        from ..reference import token_logprobs as reference_token_logprobs

        logp, entropy = reference_token_logprobs(
            _reference_logits(hidden, weight, bias), targets, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, ignore_index=ignore_index,
        )
        logp, entropy = logp.float(), entropy.float()
    else:
        rows, flat_targets = _rows(hidden, targets)
        spec = _spec(rows, weight, backend, params, chunk_size)
        if _wants_grad(rows, weight, bias):
            logp, entropy = LinearTokenLogprobs.apply(rows, weight, bias, flat_targets, spec)
        else:
            store = stats_sweep(rows, weight, bias, flat_targets, spec.backend, params, spec.chunk_size)
            logp, entropy = store.logp, store.entropy
        logp, entropy = logp.view(leading), entropy.view(leading)
    return logp, (entropy if with_entropy else None)


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
    **config_overrides: Union[str, float, None],
) -> PolicyLossOutput:
    """``policy_loss(hidden @ weight^T + bias, targets, ...)`` without the N x V logits.

    Args:
        hidden: ``[B, T, H]`` (or ``[N, H]``: one sequence), fp32 / bf16 / fp16; weight ``[V, H]``, bias
            ``[V]`` or None, in the hidden dtype.
        targets, old_logprobs, advantages, mask, ref_logprobs, config / config_overrides, normalizer,
            is_weights, ignore_index, logit_scale, softcap: exactly as ``policy_loss`` (leading shape
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
    cfg = resolve_config(PolicyLossConfig, config, config_overrides)
    check_backend(backend)
    _check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    _check_policy_inputs(hidden, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg, name="hidden")
    leading = hidden.shape[:-1]
    if backend == "reference":
        from .policy_loss import policy_loss

        return policy_loss(
            _reference_logits(hidden, weight, bias), targets, old_logprobs, advantages, mask,
            ref_logprobs=ref_logprobs, config=cfg, normalizer=normalizer, is_weights=is_weights,
            backend="reference", ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        )
    float_mask = as_float_mask(mask, leading, hidden, like_name="hidden") * (targets != ignore_index)
    shape = _batch_shape(leading)
    adv = advantages.float()
    adv = adv.reshape(shape[0], 1) if adv.dim() == 1 and len(leading) == 2 else adv.reshape(shape)

    def as_bt(tensor):
        return None if tensor is None else tensor.float().reshape(shape)

    mask_bt = float_mask.reshape(shape)
    unmasked = float_mask > 0
    loss_inputs = (as_bt(old_logprobs), adv, mask_bt, unmasked.reshape(shape), as_bt(ref_logprobs),
                   as_bt(is_weights), normalizer)
    rows, flat_targets = _rows(hidden, targets)
    # Masked tokens become ignored rows: no statistics, a zero gradient row (as the logits path).
    flat_targets = torch.where(unmasked.reshape(-1), flat_targets, ignore_index)
    params = core_params(cfg.temperature, logit_scale, softcap, ignore_index)
    token_fn, token_inputs = None, ()
    if cfg.loss_type in SEPARABLE_POLICY_LOSS_TYPES:
        def flat(tensor):
            return None if tensor is None else tensor.detach().reshape(-1)

        weights = aggregation_weights(mask_bt, cfg.loss_agg, normalizer)
        entropy_weights = (aggregation_weights(mask_bt, cfg.resolved_entropy_agg, normalizer)
                           if cfg.entropy_coef != 0.0 else None)
        token_inputs = (flat(loss_inputs[0]), flat(adv.expand(shape)), flat(loss_inputs[4]), flat(loss_inputs[5]),
                        flat(weights), flat(entropy_weights))
        token_fn = partial(_separable_terms, cfg=cfg)
    spec = _spec(rows, weight, backend, params, chunk_size,
                 loss_fn=partial(_loss_on_rows, cfg=cfg, shape=shape), token_fn=token_fn)
    loss, logp, entropy, metrics = _run_loss(rows, weight, bias, flat_targets, spec, token_inputs, loss_inputs)
    return PolicyLossOutput(loss, logp.view(leading), entropy.view(leading), metrics)


def _separable_terms(logp, entropy, old, adv, ref, is_weights, weights, entropy_weights, *, cfg):
    return separable_policy_terms(logp, entropy, old, adv, ref, is_weights, weights, entropy_weights, cfg)


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
    **overrides: Any,
):
    """``fused_dpo_loss(hidden @ weight^T + bias, targets, mask, ...)`` without the N x V logits.

    Args:
        hidden: ``[2B, T, H]``, rows ``[0:B]`` chosen and ``[B:2B]`` rejected responses (TRL's concatenated
            batch), fp32 / bf16 / fp16; weight ``[V, H]`` and bias ``[V]`` (or None) in the hidden dtype.
        targets, mask, ref_chosen_logps, ref_rejected_logps, config / overrides, temperature, ignore_index:
            as ``fused_dpo_loss`` (every DPO type, ``average_logps``, ``ld_alpha``, WPO ``use_weighting``).
        backend, chunk_size: as ``linear_token_logprobs``.

    Returns:
        ``DPOOutput(loss, chosen_rewards, rejected_rewards, margins, accuracy)`` equal to ``fused_dpo_loss``
        on the logits. A pair's loss couples all tokens of both responses, so the gradient takes two
        sweeps (stats of every chunk, then the gradient: 4 GEMMs per chunk).
    """
    from ..losses.dpo import fused_dpo_objective
    from .dpo_loss import DPOOutput, fused_dpo_loss

    cfg = resolve_config(DPOConfig, config, overrides)
    check_backend(backend)
    _check_linear_inputs(hidden, weight, bias, targets, ignore_index)
    if hidden.dim() != 3 or hidden.shape[0] < 2 or hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected shape [2B, T, H] with an even number 2B >= 2 of rows "
                         f"(chosen then rejected), got {tuple(hidden.shape)}")
    if backend == "reference":
        return fused_dpo_loss(_reference_logits(hidden, weight, bias), targets, mask, ref_chosen_logps,
                              ref_rejected_logps, config=cfg, backend="reference", temperature=temperature,
                              ignore_index=ignore_index)
    n_seq, steps = hidden.shape[:2]
    response = as_float_mask(mask, (n_seq, steps), hidden, like_name="hidden") * (targets != ignore_index).to(
        torch.float32)
    for name, tensor in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_float_tensor(name, tensor, FLOAT_DTYPES)
        check_shape(name, tensor, (n_seq // 2,), "[B], half the rows of hidden")
    check_same_device("hidden", hidden, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    rows, flat_targets = _rows(hidden, targets)
    spec = _spec(rows, weight, backend, core_params(temperature, 1.0, None, ignore_index), chunk_size,
                 loss_fn=partial(fused_dpo_objective, cfg), with_log_sum_p2=cfg.use_weighting)
    loss_inputs = (response, ref_chosen_logps, ref_rejected_logps)
    loss, _, _, aux = _run_loss(rows, weight, bias, flat_targets, spec, (), loss_inputs)
    return DPOOutput(loss, aux["chosen_rewards"].float(), aux["rejected_rewards"].float(),
                     aux["margins"].float(), aux["accuracy"].float())
