"""Four numpy sketches of GRPO-era losses (PPO with GAE, DPO, group advantages, GRPO), kept as written.

numpy in, numpy out. Each is equal to a call of the package (docs/design.md, "Seed functions"), checked in
tests/test_seed.py:

- ``ppo_loss_with_gae_entropy`` == ``reference.policy_loss_from_logprobs(new, None, old, A,
  ref_logprobs=old, kl_coef=kl_penalty_coef, kl_estimator="k1", entropy_coef=entropy_bonus_coef,
  entropy_mode="sampled", loss_agg="token-mean", clip_eps_low=eps, clip_eps_high=eps)``
- ``dpo_loss`` == -log(sigmoid(beta * h) + 1e-8), i.e. DPO "sigmoid" up to the 1e-8
- ``grae_advantages`` == ``group_advantages(rewards, len(rewards), std_ddof=0)``
- ``grpo_loss`` == the "clip" policy loss with k1 KL to old and ``loss_agg="seq-mean-token-mean"``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


def ppo_loss_with_gae_entropy(
    old_policy_logprobs: np.ndarray,
    new_policy_logprobs: np.ndarray,
    advantages: np.ndarray,
    kl_penalty_coef: float,
    clip_epsilon: float,
    entropy_bonus_coef: float,
) -> float:
    """PPO clipped surrogate + KL penalty - entropy bonus, all means over every token.

    ratio = exp(new - old); policy = -mean(min(ratio A, clip(ratio, 1-eps, 1+eps) A));
    kl = mean(new - old) (the k1 estimator with the old policy as reference); entropy = -mean(new)
    (the sampled-token estimate). total = policy + kl_penalty_coef * kl - entropy_bonus_coef * entropy.
    """
    old = np.asarray(old_policy_logprobs, dtype=np.float64)
    new = np.asarray(new_policy_logprobs, dtype=np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    ratio = np.exp(new - old)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon) * adv)
    policy_loss = -np.mean(surrogate)
    kl_penalty = kl_penalty_coef * np.mean(new - old)
    entropy_bonus = entropy_bonus_coef * (-np.mean(new))
    return float(policy_loss + kl_penalty - entropy_bonus)


def sequence_logps(logits: np.ndarray, ids: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Sum over the response of log softmax(logits)[id]: logits ``[B, T, V]``, ids ``[B, T]`` -> ``[B]``.

    This is how ``dpo_loss`` reads the seed's ``F.log_softmax(logits, dim=-1).gather(...)``: the
    log-probability of the response's own tokens, summed over the response (mask {0,1} ``[B, T]``,
    None = ones) to give one log-likelihood per response, as the Bradley-Terry comparison needs.
    """
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    token = np.take_along_axis(log_softmax, np.asarray(ids)[..., None], axis=-1)[..., 0]
    m = np.ones_like(token) if mask is None else np.asarray(mask, dtype=np.float64)
    return (m * token).sum(axis=-1)


def dpo_loss(
    policy_logits_preferred: np.ndarray,
    policy_logits_dispreferred: np.ndarray,
    ref_logits_preferred: np.ndarray,
    ref_logits_dispreferred: np.ndarray,
    beta_kl: float,
    *,
    preferred_ids: np.ndarray,
    dispreferred_ids: np.ndarray,
    preferred_mask: Optional[np.ndarray] = None,
    dispreferred_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    """DPO loss per pair from logits, ``[B]``.

    Logits ``[B, T, V]`` of each model on each response; the seed's elided ``gather(...)`` is read as
    taking the response token ids (``preferred_ids`` / ``dispreferred_ids``, ``[B, T]``) and summing
    their log-probs over the (masked) response, see ``sequence_logps``. With
    h = (pi_w - pi_l) - (ref_w - ref_l): loss = -log(sigmoid(beta_kl * h) + 1e-8).
    """
    log_ratio = (
        sequence_logps(policy_logits_preferred, preferred_ids, preferred_mask)
        - sequence_logps(policy_logits_dispreferred, dispreferred_ids, dispreferred_mask)
    ) - (
        sequence_logps(ref_logits_preferred, preferred_ids, preferred_mask)
        - sequence_logps(ref_logits_dispreferred, dispreferred_ids, dispreferred_mask)
    )
    preference_prob = 1 / (1 + np.exp(-beta_kl * log_ratio))
    return -np.log(preference_prob + 1e-8)


def grae_advantages(rewards: np.ndarray) -> np.ndarray:
    """Group-relative advantages of one group: (r - mean) / (std + 1e-8), population std (ddof 0)."""
    r = np.asarray(rewards, dtype=np.float64)
    return (r - np.mean(r)) / (np.std(r) + 1e-8)


def grpo_loss(
    old_policy_logprobs_group: Sequence[np.ndarray],
    new_policy_logprobs_group: Sequence[np.ndarray],
    group_advantages: np.ndarray,
    kl_penalty_coef: float,
    clip_epsilon: float,
) -> float:
    """GRPO loss of one group: per response the clipped surrogate plus k1 KL to old, averaged over the group.

    Response i is given by its token log-probs (a 1-D array; lengths may differ) and one advantage.
    The seed leaves the reduction over a response's tokens implicit; we take their mean (for one
    log-prob per response this is the identity), so the result is the seq-mean-token-mean of
    -min(r A, clip(r, 1-eps, 1+eps) A) + kl_penalty_coef * (new - old).
    """
    group_loss = 0.0
    for i in range(len(group_advantages)):
        advantage = float(group_advantages[i])
        new = np.asarray(new_policy_logprobs_group[i], dtype=np.float64)
        old = np.asarray(old_policy_logprobs_group[i], dtype=np.float64)
        ratio = np.exp(new - old)
        clipped_ratio = np.clip(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
        policy_loss = -np.minimum(ratio * advantage, clipped_ratio * advantage)
        kl_penalty = kl_penalty_coef * (new - old)
        group_loss += np.mean(policy_loss + kl_penalty)
    return float(group_loss / len(group_advantages))
