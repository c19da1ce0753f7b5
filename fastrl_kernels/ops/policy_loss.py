"""``policy_loss``: the PPO / GRPO family fused with token log-probs and entropy (docs/design.md, "The loss math")."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..config import (
    PolicyLossConfig,
    as_float_mask,
    check_backend,
    check_float_tensor,
    check_logits_targets,
    check_policy_inputs,
    check_same_device,
    check_shape,
    resolve_config,
)
from ..core import CoreParams
from ..losses import policy as policy_algebra
from ..losses.aggregation import Normalizer
from .fused import fused_logits_loss, refuse_shared_storage
from .prepare import PolicyInputs, core_params, logits_rows, policy_config, policy_inputs, route


class PolicyLossOutput(NamedTuple):
    """loss: 0-d fp32; logprobs, entropy: fp32 of the leading shape; metrics: dict of 0-d fp32 tensors."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    normalizer: Normalizer = None,
    is_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    inplace_grad: bool = False,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    temperature: Optional[float] = None,
    **config_overrides: Union[str, float, None],
) -> PolicyLossOutput:
    """Clipped-surrogate policy loss (+ KL to a reference, + entropy bonus) straight from logits.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]``: one sequence), fp32 / bf16 / fp16.
        targets: int64 ``[B, T]``, the sampled tokens; ``ignore_index`` entries count as masked.
        old_logprobs: ``[B, T]`` log-probs of the behaviour policy (no grad).
        advantages: ``[B, T]`` per token or ``[B]`` per sequence (GRPO), broadcast over T.
        mask: bool or {0, 1} ``[B, T]`` (completion mask); None = all ones.
        ref_logprobs: ``[B, T]`` reference-policy log-probs for the KL term (required when kl_coef != 0).
        config: ``PolicyLossConfig``; keyword ``config_overrides`` replace its fields (loss_type, clip_eps_low,
            clip_eps_high, delta, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, ...).
        temperature, logit_scale, softcap, ignore_index: the logit transform of ``token_logprobs``.
            ``temperature`` is also a config field: the keyword replaces a config temperature of 1.0 and
            raises a ValueError naming ``temperature`` when the config holds another, different value.
        normalizer: replaces the aggregation's denominator (global token count for DAPO / TRL's
            ``num_items_in_batch``; number of sequences for the seq-mean modes).
        is_weights: per-token importance weights (no grad) multiplying the policy term (TRL's vLLM IS
            correction, verl's rollout_is_weights).
        backend: "auto" | "torch" | "native" | "triton" | "reference".
        inplace_grad: backward writes dL/dlogits into ``logits`` (zero extra N x V memory); the logits
            stay valid until then, and autograd's version counter is bumped when they are overwritten,
            so a graph that saved them raises instead of reading the gradient.

    Returns:
        ``PolicyLossOutput(loss, logprobs, entropy, metrics)``; logprobs and entropy are 0 at masked
        tokens (they are never read). ``loss.backward()`` writes the logits
        gradient in one pass (two passes over the logits in total, forward and backward). Matches TRL's
        GRPO loss (loss_type "grpo" / "bnpo" / "dr_grpo" / "dapo" via ``loss_agg``) and verl's
        ``compute_policy_loss`` (``loss_agg_mode`` names, dual clip) on the same inputs.
    """
    cfg = policy_config(config, config_overrides, temperature)
    check_backend(backend)
    check_logits_targets(logits, targets, ignore_index)
    check_policy_inputs(logits, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg)
    if inplace_grad:
        refuse_shared_storage(logits, targets=targets, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                              ref_logprobs=ref_logprobs, is_weights=is_weights,
                              normalizer=normalizer if isinstance(normalizer, torch.Tensor) else None)
    inputs = policy_inputs(logits, targets, mask, old_logprobs, advantages, ref_logprobs, is_weights, normalizer,
                           ignore_index)
    params = core_params(cfg.temperature, logit_scale, softcap, ignore_index)  # checks them for every backend
    return route(
        backend, logits.device,
        lambda: policy_loss_reference(logits, targets, old_logprobs, advantages, inputs.mask, ref_logprobs,
                                      is_weights, normalizer, cfg, params),
        lambda name: _fused_policy_loss(logits, targets, inputs, cfg, params, name, inplace_grad),
    )


def policy_loss_reference(logits, targets, old_logprobs, advantages, float_mask, ref_logprobs, is_weights,
                          normalizer, cfg: PolicyLossConfig, params: CoreParams) -> PolicyLossOutput:
    """backend="reference": the float64 formulas (``reference.policy_loss``), as float32."""
    from ..reference import policy_loss as reference_policy_loss

    loss, logp, entropy, metrics = reference_policy_loss(
        logits, targets, old_logprobs, advantages, float_mask, ref_logprobs=ref_logprobs, normalizer=normalizer,
        is_weights=is_weights, config=cfg, ignore_index=params.ignore_index, logit_scale=params.logit_scale,
        softcap=params.softcap,
    )
    return PolicyLossOutput(loss.float(), logp.float(), entropy.float(), {k: v.float() for k, v in metrics.items()})


def _fused_policy_loss(logits, targets, inputs: PolicyInputs, cfg, params, backend, inplace_grad) -> PolicyLossOutput:
    rows = logits_rows(logits, targets, inputs.keep, params.ignore_index)
    loss, logp, entropy, metrics = fused_logits_loss(rows, inputs.loss_fn(cfg), inputs.loss_inputs, params=params,
                                                     backend=backend, inplace_grad=inplace_grad,
                                                     with_log_sum_p2=False)
    return PolicyLossOutput(loss, *rows.unflatten(logp, entropy), metrics)


def policy_loss_from_logprobs(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    config: Optional[PolicyLossConfig] = None,
    **config_overrides: Union[str, float, None],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_loss`` for callers who already hold per-token log-probs: ``(loss, metrics)``.

    Args:
        logp: ``[B, T]`` (or ``[N]``: one sequence) float log-probs of the sampled tokens, differentiable.
        entropy: exact entropy per token, like ``logp``; None only with ``entropy_mode="sampled"``
            (the bonus then uses -logp).
        old_logprobs, advantages, mask, ref_logprobs, is_weights, normalizer, config, overrides: as in
            ``policy_loss``, with the same checks (advantages ``[B, T]`` per token or ``[B]`` per sequence,
            or ``[B, 1]``, also when B == T; mask None = every token). Masked entries of every input are
            never read.

    Returns:
        ``(loss 0-d, metrics)`` in logp's dtype (at least float32); metrics as in ``policy_loss``.
    """
    cfg = resolve_config(PolicyLossConfig, config, config_overrides)
    check_float_tensor("logp", logp)
    if logp.dim() not in (1, 2):
        raise ValueError(f"logp: expected shape [B, T] or [N], got {tuple(logp.shape)}")
    leading = tuple(logp.shape)
    if entropy is None:
        if cfg.entropy_mode == "exact":
            raise ValueError("entropy: required when entropy_mode='exact'; pass it or use entropy_mode='sampled'")
    else:
        check_float_tensor("entropy", entropy)
        check_shape("entropy", entropy, leading, "the shape of logp")
    check_float_tensor("old_logprobs", old_logprobs)
    if isinstance(advantages, torch.Tensor) and len(leading) == 2 and tuple(advantages.shape) == (leading[0], 1):
        advantages = advantages[:, 0]  # [B, 1]: per sequence, as [B]
    check_policy_inputs(logp, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg,
                        leading=leading, name="logp")
    check_same_device("logp", logp, entropy=entropy)
    float_mask = as_float_mask(mask, leading, logp, like_name="logp", what="the shape of logp")
    float_mask = float_mask.to(torch.promote_types(logp.dtype, torch.float32))
    tensors = (logp, entropy, old_logprobs, advantages, float_mask, ref_logprobs, is_weights)
    if logp.dim() == 1:  # [N]: one sequence, which the algebra (and every loss_agg mode) sees as [1, N]
        tensors = tuple(None if t is None else t.unsqueeze(0) for t in tensors)
    return policy_algebra.policy_loss_from_logprobs(*tensors, normalizer, cfg)
