"""The policy loss types: one registry entry per ``PolicyLossConfig.loss_type`` (docs/design.md, "Recipes").

A type is (how the ratio is formed, the per-token policy term). ``config.POLICY_LOSS_TYPES`` is this
registry's keys, and ``reference/policy.py`` has an entry of its own for every key (a test checks both).
This module imports no other part of the package: ``config.py`` reads its keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# How the ratio r that the policy term sees is formed from logp and the old log-probs:
#   "token":          r_t = exp(logp_t - old_t)
#   "sequence":       GSPO's s_b = exp(sum_t m (logp - old) / max(sum_t m, 1)), the same for every token
#   "sequence_token": exp(sg(log s_b) + logp_t - sg(logp_t)) (sg = stop-gradient): the value of s_b with the
#                     gradient of a token ratio
RATIO_KINDS = ("token", "sequence", "sequence_token")

# term(logp, ratio, adv, cfg) -> the policy term of each token (before is_weights, KL and entropy);
# cfg is a PolicyLossConfig.
TokenTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class PolicyLossType:
    ratio: str
    term: TokenTerm

    @property
    def separable(self) -> bool:
        """Per-token ratio: the loss is a sum of per-token terms whose weights depend on the mask only."""
        return self.ratio == "token"


def clipped_surrogate(logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: Any) -> torch.Tensor:
    capped = ratio.clamp(max=cfg.delta) if cfg.delta is not None else ratio
    clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    neg_adv = -adv
    loss = torch.maximum(neg_adv * capped, neg_adv * clipped)
    if cfg.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -cfg.dual_clip * adv), loss)
    return loss


def cispo_term(logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: Any) -> torch.Tensor:
    weight = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high).detach()
    return -weight * adv * logp


def sapo_term(logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: Any) -> torch.Tensor:
    # The temperatures in the ratio's precision, at least float32, whatever the default dtype.
    dtype = torch.promote_types(ratio.dtype, torch.float32)
    temp_pos = torch.tensor(cfg.sapo_temp_pos, dtype=dtype, device=ratio.device)
    temp = torch.where(adv > 0, temp_pos, cfg.sapo_temp_neg)
    x = temp * (ratio - 1.0)
    # sigmoid(x) as 1 - sigmoid(-x) for x > 0: autograd's s (1 - s) then works on the smaller of
    # sigmoid(+-x), which keeps its precision where the gate saturates (float32 1 - s would not).
    gate = torch.where(x > 0, 1.0 - torch.sigmoid(-x), torch.sigmoid(x))
    return -gate * (4.0 / temp) * adv


def gpg_term(logp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: Any) -> torch.Tensor:
    return -adv * logp


# The formulas of each term: docs/design.md, "The loss math".
POLICY_LOSSES: dict[str, PolicyLossType] = {
    "clip": PolicyLossType("token", clipped_surrogate),  # PPO's clipped surrogate (delta cap, dual clip)
    "gspo": PolicyLossType("sequence", clipped_surrogate),
    "gspo_token": PolicyLossType("sequence_token", clipped_surrogate),
    "cispo": PolicyLossType("token", cispo_term),
    "sapo": PolicyLossType("token", sapo_term),
    "gpg": PolicyLossType("token", gpg_term),  # the policy gradient itself, no ratio or clip (verl's gpg)
}


def policy_loss_type(name: str) -> PolicyLossType:
    """The registry entry of ``name``; a config that skipped validation still cannot pick a missing one."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"loss_type: unknown policy loss {name!r}") from None
