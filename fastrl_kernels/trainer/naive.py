"""Plain PyTorch versions of the losses the trainer uses (``--kernel naive``).

``log_softmax`` + ``gather`` over the full ``[B, T, V]`` logits and autograd through it: the memory
every fused op avoids. Formulas are those of docs/design.md, "The loss math", for the options the trainer sets
(``loss_type="clip"``, KL estimator "k3", exact entropy, ``loss_agg="token-mean"``, DPO "sigmoid").
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import PolicyLossConfig


class NaivePolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict


class NaiveDPOOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracy: torch.Tensor


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """``(logprobs, entropy)`` fp32 of the leading shape: log softmax(z / tau)[target] and its entropy."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _token_mean(values: torch.Tensor, mask: torch.Tensor, normalizer: Optional[torch.Tensor] = None) -> torch.Tensor:
    # An empty mask gives 0, not 0 / 0.
    return (values * mask).sum() / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    ref_logprobs: Optional[torch.Tensor],
    config: PolicyLossConfig,
    normalizer: Optional[torch.Tensor] = None,
) -> NaivePolicyLossOutput:
    """PPO-clip per token, + kl_coef * k3(ref - logp) - entropy_coef * H, token-mean over ``mask``
    (divided by ``normalizer`` instead of the token count when given: a global count across ranks).

    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(logp - old); ``advantages`` ``[B, T]``
    or ``[B]`` (one per sequence, broadcast over tokens).
    """
    unsupported = {
        "loss_type": config.loss_type != "clip",
        "kl_estimator": config.kl_estimator != "k3",
        "loss_agg": config.loss_agg != "token-mean",
        "entropy_mode": config.entropy_mode != "exact",
        "delta/dual_clip/kl_clamp": any(v is not None for v in (config.delta, config.dual_clip, config.kl_clamp)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NotImplementedError(f"the naive trainer loss covers clip / k3 / exact entropy / token-mean only: {bad}")
    m = torch.ones_like(old_logprobs) if mask is None else mask.float()
    logp, entropy = token_logprobs(logits, targets, config.temperature)
    adv = advantages if advantages.dim() == logp.dim() else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logprobs)
    clipped = ratio.clamp(1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if ref_logprobs is not None and config.kl_coef != 0.0:
        k = ref_logprobs - logp
        per_token = per_token + config.kl_coef * (torch.exp(k) - k - 1.0)
    if config.entropy_coef != 0.0:
        per_token = per_token - config.entropy_coef * entropy
    loss = _token_mean(per_token, m, normalizer)
    metrics = {"ratio_mean": _token_mean(ratio.detach(), m)}
    return NaivePolicyLossOutput(loss, logp, entropy, metrics)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean_group) / (std_group + eps)``, population std (ddof 0), consecutive groups."""
    g = rewards.float().view(-1, group_size)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).view(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reversed recursion delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next over the
    unmasked steps (V_next = 0 after the last one); returns = A + V. Both ``[B, T]`` fp32, 0 where masked."""
    m = mask.float()
    adv = torch.zeros_like(values, dtype=torch.float32)
    next_value = torch.zeros_like(values[:, 0], dtype=torch.float32)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        keep = m[:, t] > 0
        next_adv = torch.where(keep, a, next_adv)
        next_value = torch.where(keep, values[:, t].float(), next_value)
        adv[:, t] = a * m[:, t]
    return adv, (adv + values) * m


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: Optional[float] = None,
    normalizer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = v_old + clip(v - v_old, -c, c); token-mean
    (over ``normalizer`` tokens when given)."""
    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return 0.5 * _token_mean(loss, mask.float(), normalizer)


def fused_dpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> NaiveDPOOutput:
    """Sigmoid DPO on ``[2B, T, V]`` logits (rows ``[0:B]`` chosen): -log sigmoid(beta [(pc - rc) - (pr - rr)]),
    mean over pairs; rewards are beta (policy - ref) sequence log-probs, detached."""
    logp, _ = token_logprobs(logits, targets)
    seq = (logp * mask.float()).sum(-1)
    half = seq.shape[0] // 2
    chosen = seq[:half] - ref_chosen_logps
    rejected = seq[half:] - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    cr, rr = beta * chosen.detach(), beta * rejected.detach()
    return NaiveDPOOutput(loss, cr, rr, cr - rr, (cr > rr).float().mean())
