"""The PPO / GRPO family on per-token log-probs: O(N) algebra shared by every backend.

``policy_loss_from_logprobs`` is ordinary differentiable PyTorch on ``[B, T]`` tensors. The fused
ops call it inside their forward and take dL/dlogp, dL/dH from autograd on it (docs/design.md,
"A training step: three passes over N x V"); it is public too, for callers who already hold log-probs.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PolicyLossConfig
from .aggregation import Normalizer, aggregate
from .kl import kl_penalty
from .policy_types import POLICY_LOSSES, policy_loss_type


def _sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio, broadcast over tokens: [B, 1]."""
    return ((log_ratio * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).unsqueeze(1)


def _ratio(logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    log_ratio = logp - old
    kind = policy_loss_type(loss_type).ratio
    if kind == "sequence":
        return torch.exp(_sequence_log_ratio(log_ratio, mask)).expand_as(logp)
    if kind == "sequence_token":
        seq = _sequence_log_ratio(log_ratio.detach(), mask)
        return torch.exp(seq + logp - logp.detach())
    return torch.exp(log_ratio)


def per_token_policy_loss(
    logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: PolicyLossConfig
) -> torch.Tensor:
    """The policy term of one token for ``cfg.loss_type`` (before is_weights, KL and entropy)."""
    return policy_loss_type(cfg.loss_type).term(logp, ratio, adv, cfg)


def separate_kl(cfg: PolicyLossConfig) -> bool:
    """Whether the KL term is aggregated on its own (``kl_agg`` differs from ``loss_agg``, kl_coef != 0)."""
    return cfg.kl_coef != 0.0 and cfg.kl_agg is not None and cfg.kl_agg != cfg.loss_agg


def _token_loss(logp, ratio, adv, ref_logprobs, is_weights, cfg: PolicyLossConfig):
    """Policy term (times is_weights) plus kl_coef * KL per token (unless ``separate_kl``), and the KL
    itself (None without ref)."""
    token_loss = per_token_policy_loss(logp, ratio, adv, cfg)
    if is_weights is not None:
        token_loss = token_loss * is_weights.to(logp.dtype).detach()
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logp, ref_logprobs.to(logp.dtype), cfg.kl_estimator, cfg.kl_clamp, cfg.kl_value_cap)
        if cfg.kl_coef != 0.0 and not separate_kl(cfg):
            token_loss = torch.add(token_loss, kl, alpha=cfg.kl_coef)  # token_loss + kl_coef * kl, one op
    return token_loss, kl


def _bonus_entropy(logp: torch.Tensor, entropy: Optional[torch.Tensor], cfg: PolicyLossConfig) -> torch.Tensor:
    return -logp if cfg.entropy_mode == "sampled" or entropy is None else entropy


# Loss types whose ratio is per token: the loss is then a sum of per-token terms with weights that
# depend on the mask only, so chunks of tokens can be differentiated independently.
SEPARABLE_POLICY_LOSS_TYPES = tuple(name for name, kind in POLICY_LOSSES.items() if kind.separable)


def separable_policy_terms(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor],
    weights: torch.Tensor,
    entropy_weights: Optional[torch.Tensor],
    config: PolicyLossConfig,
    kl_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token terms c_t whose sum is the loss of ``policy_loss_from_logprobs``, for separable loss types.

    All tensors share one shape (any; typically a chunk of flattened tokens; advantages already
    broadcast per token). ``weights = aggregation_weights(mask, loss_agg, normalizer)`` and
    ``entropy_weights`` the same for ``resolved_entropy_agg`` (needed when entropy_coef != 0):
    c_t = w_t (l_t * is_w_t + kl_coef kl_t) - entropy_coef w'_t H_t. When ``separate_kl(config)``,
    ``kl_weights`` are those of ``resolved_kl_agg`` and c_t = w_t l_t is_w_t + kl_coef w''_t kl_t - ...
    Since the weights depend on the mask only, dc_t / dlogp_t is the exact per-token coefficient of the
    whole loss (docs/design.md, "The lm_head path").
    """
    cfg = config
    if cfg.loss_type not in SEPARABLE_POLICY_LOSS_TYPES:
        raise ValueError(
            f"loss_type: separable terms exist for {SEPARABLE_POLICY_LOSS_TYPES} only, got {cfg.loss_type!r}"
        )
    adv = advantages.to(logp.dtype)
    ratio = torch.exp(logp - old_logprobs.to(logp.dtype))
    token_loss, kl = _token_loss(logp, ratio, adv, ref_logprobs, is_weights, cfg)
    terms = token_loss * weights
    if separate_kl(cfg):
        if kl_weights is None:
            raise ValueError("kl_weights: required when kl_agg differs from loss_agg and kl_coef != 0, got None")
        terms = terms + cfg.kl_coef * (kl * kl_weights)
    if cfg.entropy_coef != 0.0:
        if entropy_weights is None:
            raise ValueError("entropy_weights: required when entropy_coef != 0, got None")
        terms = terms - cfg.entropy_coef * (_bonus_entropy(logp, entropy, cfg) * entropy_weights)
    return terms


def policy_loss_from_logprobs(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    config: Optional[PolicyLossConfig] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics from per-token log-probs, all ``[B, T]`` (advantages may be ``[B, 1]``).

    ``mask`` is float {0, 1}; old / ref log-probs at masked positions are ignored. advantages ``[B]`` or
    ``[B, 1]`` are per sequence. ``entropy`` (exact H per token) may be None with entropy_mode "sampled".
    Returns ``(loss 0-d, metrics)``; metrics are detached 0-d tensors (names in docs/design.md, "The loss math").
    """
    cfg = config if config is not None else PolicyLossConfig()
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef != 0 (got None)")
    return masked_policy_loss(logp, entropy, old_logprobs, advantages, mask, mask > 0, ref_logprobs, is_weights,
                              normalizer, cfg)


def masked_policy_loss(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    unmasked: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor],
    normalizer: Normalizer,
    cfg: PolicyLossConfig,
    *,
    zero_where_masked: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_loss_from_logprobs`` with ``unmasked = mask > 0`` given and the config resolved (ref_logprobs
    present when kl_coef != 0). ``zero_where_masked``: logp and entropy already hold 0 wherever ``unmasked``
    is False (the fused ops' outputs: masked tokens are ignored rows there), so they are not pinned again."""
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1 and logp.dim() == 2:
        adv = adv.unsqueeze(1)  # [B]: one advantage per sequence
    # Masked positions may hold padding garbage (0, +-1e4, +-inf, NaN) in every input: pin their ratio
    # to 1, their KL, advantage, log-prob and entropy to 0 and their importance weight to 1, so that no
    # inf * 0 = NaN reaches the loss, the metrics or the gradient. old / ref log-probs, advantages and
    # is_weights are constants of the loss (detached even when they require grad).
    if not zero_where_masked:
        logp = torch.where(unmasked, logp, 0.0)
        if entropy is not None:
            entropy = torch.where(unmasked, entropy, 0.0)
    logp_value = logp.detach()
    old_logprobs = torch.where(unmasked, _constant(old_logprobs).to(logp.dtype), logp_value)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(unmasked, _constant(ref_logprobs).to(logp.dtype), logp_value)
    adv = torch.where(unmasked, _constant(adv), 0.0)
    if is_weights is not None:
        is_weights = torch.where(unmasked, _constant(is_weights).to(logp.dtype), 1.0)
    ratio = _ratio(logp, old_logprobs, mask, cfg.loss_type)
    token_loss, kl = _token_loss(logp, ratio, adv, ref_logprobs, is_weights, cfg)
    # max(sum(mask), 1): token-mean's divisor and the metrics' one, reduced once.
    count = mask.sum().clamp(min=1.0)
    loss = aggregate(token_loss, mask, cfg.loss_agg, normalizer, token_count=count)
    if separate_kl(cfg):
        loss = loss + cfg.kl_coef * aggregate(kl, mask, cfg.kl_agg, normalizer, token_count=count)
    bonus_entropy = _bonus_entropy(logp, entropy, cfg)
    if cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * aggregate(bonus_entropy, mask, cfg.resolved_entropy_agg, normalizer,
                                                   token_count=count)
    return loss, _metrics(ratio.detach(), adv, mask, unmasked, count, kl, bonus_entropy.detach(), cfg)


def _constant(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` outside autograd's graph (detached only when it requires grad)."""
    return tensor.detach() if tensor.requires_grad else tensor


def _metrics(ratio, adv, mask, unmasked, count, kl, bonus_entropy, cfg: PolicyLossConfig) -> dict[str, torch.Tensor]:
    """The masked means sum(mask x) / max(sum(mask), 1) of every metric in one reduction over a stack of
    the per-token values (the clip indicators enter it as 0 / 1), and ratio_max."""
    low = (ratio < 1.0 - cfg.clip_eps_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.clip_eps_high) & (adv > 0)
    values = [low, high, ratio, bonus_entropy, ratio - 1.0 - torch.log(ratio)]
    if kl is not None:
        values.append(kl.detach())
    means = (torch.stack(values) * mask).flatten(1).sum(dim=1) / count
    zero = None
    if kl is None or not ratio.numel():
        zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    # ratio > 0 always, so masked-out entries set to 0 leave the max of the unmasked ones (0 if none).
    # (amax of an empty batch raises: B = 0 or T = 0 gives 0, like an all-masked batch)
    ratio_max = torch.where(unmasked, ratio, 0.0).amax() if ratio.numel() else zero
    return {
        "clip_frac_low": means[0],
        "clip_frac_high": means[1],
        "ratio_mean": means[2],
        "ratio_max": ratio_max,
        "kl_mean": means[5] if kl is not None else zero,
        "entropy_mean": means[3],
        "approx_kl": means[4],
    }
