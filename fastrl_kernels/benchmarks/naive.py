"""Naive eager PyTorch: the baseline every benchmark ratio is taken against.

These are the few lines a training loop writes by hand (TRL / verl style before any fusion):
``log_softmax`` of the whole ``[N, V]`` tensor, ``gather`` of the taken tokens, the entropy from the
same log-probs, then the loss, all under autograd. Every intermediate ``[N, V]`` tensor that autograd
saves stays alive until backward, which is the memory the fused ops avoid. They are also checked
against the package in ``tests/test_benchmarks.py`` (same loss, same gradient), so a ratio compares
equal work.
"""

from __future__ import annotations

from typing import Optional

import torch


def naive_token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` fp32 of the leading shape: log softmax(z / tau)[target] and -sum p log p.

    logits ``[..., V]`` any float dtype (upcast to fp32 first, as TRL does); targets int64 ``[...]``.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def clipped_policy_terms(
    logp: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """PPO / GRPO clipped surrogate + k3 KL, token-mean over the mask; O(N) work on ``[B, T]`` tensors.

    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + kl_coef (e^k - k - 1), r = e^(logp - old),
    k = ref - logp; loss = sum(mask l) / max(sum(mask), 1). ``advantages`` is ``[B, T]`` or ``[B]``
    (per sequence, broadcast over T). Matches ``fk.policy_loss(..., loss_agg="token-mean",
    kl_estimator="k3")`` (TRL's "bnpo" / "dapo" without a global normaliser).
    """
    if advantages.dim() == 1 and logp.dim() == 2:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logprobs)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages)
    per_token = -surrogate
    if kl_coef != 0.0 and ref_logprobs is not None:
        k = ref_logprobs - logp
        per_token = per_token + kl_coef * (torch.exp(k) - k - 1.0)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


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


def compile_available(device: str) -> Optional[str]:
    """None when ``torch.compile`` can run on ``device`` here, else the reason it cannot."""
    try:
        import torch._dynamo as dynamo
    except ImportError as error:  # pragma: no cover - every supported torch ships dynamo
        return f"torch._dynamo cannot be imported ({error})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python / platform"
    if torch.device(device).type == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on CPU needs a C++ compiler (none found)"
    return None
