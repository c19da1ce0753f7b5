"""Naive eager PyTorch: the baseline every benchmark ratio is taken against, and the trainer's ``--kernel naive``.

These are the few lines a training loop writes by hand (TRL / verl style before any fusion):
``log_softmax`` of the whole ``[N, V]`` tensor, ``gather`` of the taken tokens, the entropy from the
same log-probs, then the loss, all under autograd. Every intermediate ``[N, V]`` tensor that autograd
saves stays alive until backward, which is the memory the fused ops avoid. Every benchmark harness
(``fastrl-bench``'s families, ``bench/``) and the trainer take their naive side from here, and
``tests/test_naive_baselines.py`` checks each formula against the float64 reference
(``fastrl_kernels.reference``), so a ratio compares equal work with a trustworthy baseline.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F


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


def naive_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: Optional[int] = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(logp, entropy)`` fp32 of the leading shape: log softmax(z / tau)[target] and -sum p log p.

    logits ``[..., V]`` any float dtype (upcast to fp32 first, as TRL does); targets int64 ``[...]``.
    ``ignore_index``: targets equal to it give logp = entropy = 0 (None: every target is a token id,
    nothing is checked). ``with_entropy=False`` returns ``(logp, None)`` (a loss without the entropy).
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = None if ignore_index is None else targets != ignore_index
    index = targets if valid is None else targets.clamp(min=0)
    logp = logp_all.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    if valid is not None:
        logp = torch.where(valid, logp, 0.0)
        entropy = None if entropy is None else torch.where(valid, entropy, 0.0)
    return logp, entropy


def token_mean(values: torch.Tensor, mask: torch.Tensor, normalizer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(mask values) / max(sum(mask), 1), or / ``normalizer`` (a global token count) when given."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)


def clipped_per_token(
    logp: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l, r)``: l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + kl_coef (e^k - k - 1) per token,
    r = e^(logp - old), k = ref - logp. ``advantages`` ``[B, T]`` or ``[B]`` (broadcast over T)."""
    if advantages.dim() == 1 and logp.dim() == 2:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logprobs)
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    if kl_coef != 0.0 and ref_logprobs is not None:
        k = ref_logprobs - logp
        per_token = per_token + kl_coef * (torch.exp(k) - k - 1.0)
    return per_token, ratio


def clipped_policy_terms(
    logp: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None, **clip: float,
) -> torch.Tensor:
    """PPO / GRPO clipped surrogate + k3 KL (``clipped_per_token``; ``clip``: clip_eps_low, clip_eps_high,
    kl_coef), token-mean over the mask; O(N) work on ``[B, T]`` tensors. Matches
    ``fk.policy_loss(..., loss_agg="token-mean", kl_estimator="k3")`` (TRL's "bnpo" / "dapo" without a
    global normaliser).
    """
    return token_mean(clipped_per_token(logp, old_logprobs, advantages, ref_logprobs, **clip)[0], mask)


def naive_policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logp, entropy)``: naive log_softmax + gather + entropy + clipped loss, all under autograd.

    logits ``[B, T, V]``; targets, old_logprobs, mask (bool or {0, 1}), ref_logprobs ``[B, T]``;
    advantages ``[B, T]`` or ``[B]``. The entropy is computed in the same graph (a plain loop logs it),
    so its saved ``[N, V]`` tensors live until backward, as they do in such a loop.
    """
    logp, entropy = naive_token_logprobs(logits, targets, temperature)
    loss = clipped_policy_terms(
        logp, old_logprobs, advantages, mask, ref_logprobs,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, kl_coef=kl_coef,
    )
    return loss, logp, entropy


def naive_linear_policy_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *args: Any, temperature: float = 1.0, **clip: Any
) -> torch.Tensor:
    """The lm_head path by hand: logits = hidden W^T (all ``[N, V]`` at once), fp32 log_softmax, gather,
    then ``clipped_policy_terms(logp, *args, **clip)`` (old_logprobs, advantages, mask, ref_logprobs;
    clip_eps_low, clip_eps_high, kl_coef); no entropy. Leading shapes of hidden and targets match."""
    logp, _ = naive_token_logprobs(hidden @ weight.t(), targets, temperature, with_entropy=False)
    return clipped_policy_terms(logp, *args, **clip)


def policy_loss_for_config(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    ref_logprobs: Optional[torch.Tensor],
    config: Any,
    normalizer: Optional[torch.Tensor] = None,
) -> NaivePolicyLossOutput:
    """The naive policy loss for a ``PolicyLossConfig`` (the trainer's ``--kernel naive``): PPO-clip per
    token + kl_coef k3(ref - logp) - entropy_coef H, token-mean over ``mask`` (over ``normalizer`` tokens
    when given: a global count across ranks), at the config's temperature and clip bounds. Raises
    ``NotImplementedError`` for options outside clip / k3 / exact entropy / token-mean."""
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
    logp, entropy = naive_token_logprobs(logits, targets, config.temperature)
    per_token, ratio = clipped_per_token(logp, old_logprobs, advantages, ref_logprobs, kl_coef=config.kl_coef,
                                         clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high)
    if config.entropy_coef != 0.0:
        per_token = per_token - config.entropy_coef * entropy
    loss = token_mean(per_token, m, normalizer)
    return NaivePolicyLossOutput(loss, logp, entropy, {"ratio_mean": token_mean(ratio.detach(), m)})


def naive_dpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> NaiveDPOOutput:
    """Sigmoid DPO on ``[2B, T, V]`` logits (rows ``[0:B]`` chosen): -log sigmoid(beta [(pc - rc) - (pr - rr)]),
    mean over pairs; rewards are beta (policy - ref) sequence log-probs, detached."""
    logp, _ = naive_token_logprobs(logits, targets)
    seq = (logp * mask.float()).sum(-1)
    half = seq.shape[0] // 2
    chosen = seq[:half] - ref_chosen_logps
    rejected = seq[half:] - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    cr, rr = beta * chosen.detach(), beta * rejected.detach()
    return NaiveDPOOutput(loss, cr, rr, cr - rr, (cr > rr).float().mean())


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
    return 0.5 * token_mean(loss, mask.float(), normalizer)


def compile_available(device: str) -> Optional[str]:
    """None when ``torch.compile`` can run on ``device`` here, else the reason it cannot."""
    import torch._dynamo as dynamo

    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python / platform"
    if torch.device(device).type == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on CPU needs a C++ compiler (none found)"
    return None
