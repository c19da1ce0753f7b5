"""``policy_loss``: the PPO / GRPO family fused with token log-probs and entropy (docs/design.md, "The loss math")."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional, Union

import torch

from ..config import (
    PolicyLossConfig,
    as_float_mask,
    check_backend,
    check_float_tensor,
    check_logits_targets,
    check_normalizer,
    check_same_device,
    check_shape,
    resolve_config,
)
from ..losses import policy as policy_algebra
from ..losses.aggregation import Normalizer
from .fused import fused_logits_loss, refuse_shared_storage
from .logprobs import core_params, flatten_rows


class PolicyLossOutput(NamedTuple):
    """loss: 0-d fp32; logprobs, entropy: fp32 of the leading shape; metrics: dict of 0-d fp32 tensors."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _batch_shape(leading: torch.Size) -> tuple[int, int]:
    return (leading[0], leading[1]) if len(leading) == 2 else (1, leading[0])


def _check_policy_inputs(logits, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg,
                         *, leading=None, name="logits"):
    """The checks shared by every policy-loss entry point; ``leading`` (default: logits' shape without V)
    is the token shape ``[B, T]`` or ``[N]``, ``logits`` the tensor whose device the others must share."""
    what = f"the leading shape of {name}" if leading is None else f"the shape of {name}"
    leading = tuple(logits.shape[:-1]) if leading is None else tuple(leading)
    batch = leading[0] if len(leading) == 2 else None
    for arg, tensor in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("is_weights", is_weights)):
        if tensor is not None:
            check_float_tensor(arg, tensor)
            check_shape(arg, tensor, leading, what)
    check_float_tensor("advantages", advantages)
    if batch is not None and tuple(advantages.shape) == (batch,):
        pass
    else:
        expected = f"{leading} per token" + (f" or ({batch},) per sequence" if batch is not None else "")
        if tuple(advantages.shape) != leading:
            raise ValueError(f"advantages: expected shape {expected}, got {tuple(advantages.shape)}")
    check_same_device(
        name, logits, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs,
        is_weights=is_weights, normalizer=normalizer if isinstance(normalizer, torch.Tensor) else None,
    )
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={cfg.kl_coef}), got None")
    check_normalizer(normalizer)


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
            clip_eps_high, delta, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg, temperature, ...).
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
    cfg = resolve_config(PolicyLossConfig, config, config_overrides)
    check_backend(backend)
    check_logits_targets(logits, targets, ignore_index)
    _check_policy_inputs(logits, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg)
    if inplace_grad:
        refuse_shared_storage(logits, targets=targets, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                              ref_logprobs=ref_logprobs, is_weights=is_weights,
                              normalizer=normalizer if isinstance(normalizer, torch.Tensor) else None)
    leading = logits.shape[:-1]
    kept = targets != ignore_index
    float_mask = kept.to(torch.float32) if mask is None else as_float_mask(mask, leading, logits) * kept
    params = core_params(cfg.temperature, logit_scale, softcap, ignore_index)  # checks them for every backend
    if backend == "reference":
        from ..reference import policy_loss as reference_policy_loss

        loss, logp, entropy, metrics = reference_policy_loss(
            logits, targets, old_logprobs, advantages, float_mask, ref_logprobs=ref_logprobs,
            normalizer=normalizer, is_weights=is_weights, config=cfg, ignore_index=ignore_index,
            logit_scale=logit_scale, softcap=softcap,
        )
        return PolicyLossOutput(
            loss.float(), logp.float(), entropy.float(), {k: v.float() for k, v in metrics.items()}
        )
    shape = _batch_shape(leading)
    rows, flat_targets = flatten_rows(logits, targets)
    # Masked tokens become ignored rows: the kernels then skip them (a zero gradient row written
    # without reading, and no read in pass 1 where the backend supports it).
    unmasked = float_mask > 0
    flat_targets = torch.where(unmasked.reshape(-1), flat_targets, ignore_index)
    adv = advantages.float()
    adv = adv.reshape(shape[0], 1) if adv.dim() == 1 and len(leading) == 2 else adv.reshape(shape)

    def as_bt(tensor):
        return None if tensor is None else tensor.float().reshape(shape)

    loss_fn = partial(_loss_on_rows, cfg=cfg, shape=shape)
    loss, logp, entropy, metrics = fused_logits_loss(
        rows, flat_targets, loss_fn,
        (as_bt(old_logprobs), adv, float_mask.reshape(shape), unmasked.reshape(shape), as_bt(ref_logprobs),
         as_bt(is_weights), normalizer),
        params=params, backend=backend, inplace_grad=inplace_grad, with_log_sum_p2=False,
    )
    return PolicyLossOutput(loss, logp.view(leading), entropy.view(leading), metrics)


def _loss_on_rows(logp, entropy, _log_sum_p2, old, adv, mask, unmasked, ref, is_weights, normalizer, *, cfg, shape):
    # The kernels return logp = entropy = 0 at ignored rows, which the masked tokens are.
    return policy_algebra.masked_policy_loss(
        logp.view(shape), entropy.view(shape), old, adv, mask, unmasked, ref, is_weights, normalizer, cfg,
        zero_where_masked=True,
    )


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
    _check_policy_inputs(logp, old_logprobs, advantages, ref_logprobs, is_weights, normalizer, cfg,
                         leading=leading, name="logp")
    check_same_device("logp", logp, entropy=entropy)
    float_mask = as_float_mask(mask, leading, logp, like_name="logp", what="the shape of logp")
    float_mask = float_mask.to(torch.promote_types(logp.dtype, torch.float32))
    tensors = (logp, entropy, old_logprobs, advantages, float_mask, ref_logprobs, is_weights)
    if logp.dim() == 1:  # [N]: one sequence, which the algebra (and every loss_agg mode) sees as [1, N]
        tensors = tuple(None if t is None else t.unsqueeze(0) for t in tensors)
    return policy_algebra.policy_loss_from_logprobs(*tensors, normalizer, cfg)
