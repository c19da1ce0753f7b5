"""Float64 formulas of the DPO family: per-pair losses, sequence log-probs, LD-DPO and WPO weights.

Plain, unfused and obvious on purpose: every backend and ``fastrl_kernels.losses.dpo`` is tested
against these functions. Notation for pair i (all sequence log-probs, i.e. sums over response tokens):

    u_c = pc - rc,  u_r = pr - rr               policy/reference log-ratios (chosen, rejected)
    s_c = f(u_c),   s_r = f(u_r)                scores after the f-divergence map f (``f_divergence_scores``)
    h = beta * (s_c - s_r)                      the DPO logit (reverse KL: beta * [(pc - rc) - (pr - rr)])
    chosen_reward = beta * u_c,  rejected_reward = beta * u_r

Each loss type matches TRL's ``DPOTrainer`` ``loss_type`` of the same name (its current pair formulas,
looked up in TRL's source); deviations are named in ``PAIR_LOSSES``'s docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "f_divergence_scores",
    "ld_token_weights",
    "sequence_logprobs",
    "wpo_weights",
]

# exp() argument cap of the alpha-divergence map: keeps float32 finite (TRL caps at 80 too).
ALPHA_EXP_CAP = 80.0
# EXO needs 0 < eps < 1; TRL substitutes 1e-3 for label_smoothing == 0.
EXO_DEFAULT_EPS = 1e-3


def _alpha_divergence(u: torch.Tensor, f_alpha: float) -> torch.Tensor:
    if f_alpha == 1.0:
        return u
    return torch.exp(torch.clamp((f_alpha - 1.0) * u, max=ALPHA_EXP_CAP)) / (f_alpha - 1.0)


# f_divergence name -> (u, f_alpha) -> float64 scores, as listed in f_divergence_scores' docstring.
F_DIVERGENCE_SCORES = {
    "reverse_kl": lambda u, f_alpha: u,
    "forward_kl": lambda u, f_alpha: -torch.exp(-u),
    "js_divergence": lambda u, f_alpha: F.logsigmoid(u),
    "alpha_divergence": _alpha_divergence,
}


def f_divergence_scores(logratios: torch.Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
    """Map log-ratios u = log(pi/pi_ref) to the scores f'(e^u) of f-DPO (Wang et al. 2023, "Beyond
    Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
    arXiv:2309.16240), constants dropped (they cancel in s_c - s_r). Matches TRL ``f_divergence_type``:

    - "reverse_kl": u (standard DPO)
    - "forward_kl": -e^{-u}
    - "js_divergence": log sigmoid(u)  (= log(2t/(1+t)) - log 2, t = e^u)
    - "alpha_divergence": e^{(alpha-1) u} / (alpha-1), exponent capped at 80; alpha = 1 is the reverse-KL
      limit. This is current TRL's convention; earlier TRL versions wrote (1 - t^-alpha)/alpha, i.e.
      their alpha is our 1 - alpha (both agree at the default 0.5).
    """
    if f_divergence not in F_DIVERGENCE_SCORES:
        raise ValueError(f"f_divergence: expected one of {', '.join(F_DIVERGENCE_SCORES)}, got {f_divergence!r}")
    return F_DIVERGENCE_SCORES[f_divergence](logratios.double(), f_alpha)


def _smoothed_sigmoid(h: torch.Tensor, ls: float) -> torch.Tensor:
    # Without smoothing the second term is absent, not 0 * log sigmoid(-h) (NaN at h = +inf).
    loss = -(1.0 - ls) * F.logsigmoid(h)
    return loss - ls * F.logsigmoid(-h) if ls != 0 else loss


def _sigmoid(t: dict) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) with conservative label smoothing
    (cDPO, Mitchell 2023): -(1-ls) log sigmoid(h) - ls log sigmoid(-h). TRL "sigmoid"."""
    return _smoothed_sigmoid(t["h"], t["ls"])


def _hinge(t: dict) -> torch.Tensor:
    """RSO hinge (Liu et al. 2023, arXiv:2309.06657): relu(1 - h). TRL "hinge"."""
    return torch.relu(1.0 - t["h"])


def _ipo(t: dict) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (s_c - s_r - 1/(2 beta))^2. TRL "ipo" divides the
    scores by the response lengths inside the loss; here the caller passes length-averaged log-probs
    (``average_logps=True``), identical for a single loss type."""
    return (t["s_c"] - t["s_r"] - 1.0 / (2.0 * t["beta"])) ** 2


def _robust(t: dict) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label-flip rate ls:
    [-(1-ls) log sigmoid(h) + ls log sigmoid(-h)] / (1 - 2 ls). TRL "robust"."""
    ls = t["ls"]
    return (-(1.0 - ls) * F.logsigmoid(t["h"]) + ls * F.logsigmoid(-t["h"])) / (1.0 - 2.0 * ls)


def _exo_pair(t: dict) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16): KL(q || p) over {chosen, rejected} with
    q = (sigmoid(h), sigmoid(-h)) and p = (1-eps, eps), eps = label_smoothing (1e-3 when 0, as earlier
    TRL versions; TRL's current code would give inf there). TRL "exo_pair"."""
    eps = t["ls"] if t["ls"] > 0 else EXO_DEFAULT_EPS
    h = t["h"]
    return (torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps))
            + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps)))


def _nca_pair(t: dict) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369, pairwise form): with c = beta s_c, r = beta s_r,
    -log sigmoid(c) - 0.5 log sigmoid(-c) - 0.5 log sigmoid(-r). TRL "nca_pair"."""
    c, r = t["beta"] * t["s_c"], t["beta"] * t["s_r"]
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _bco_pair(t: dict) -> torch.Tensor:
    """BCO (Jung et al. 2024, arXiv:2404.04656, pairwise form):
    -log sigmoid(beta s_c) - log sigmoid(-beta s_r). Current TRL "bco_pair"; earlier TRL versions also
    subtracted a running mean of the rewards (stateful, not reproduced)."""
    return -F.logsigmoid(t["beta"] * t["s_c"]) - F.logsigmoid(-t["beta"] * t["s_r"])


def _sppo_hard(t: dict) -> torch.Tensor:
    """SPPO (Wu et al. 2024, arXiv:2405.00675, eq. 4.7) with hard win probabilities 1 / 0:
    (s_c - 1/(2 beta))^2 + (s_r + 1/(2 beta))^2. TRL "sppo_hard"."""
    half = 0.5 / t["beta"]
    return (t["s_c"] - half) ** 2 + (t["s_r"] + half) ** 2


def _apo_zero(t: dict) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7):
    1 - sigmoid(beta u_c) + sigmoid(beta u_r) on the raw log-ratios (not f-divergence scores), as TRL
    "apo_zero"."""
    return 1.0 - torch.sigmoid(t["beta"] * t["u_c"]) + torch.sigmoid(t["beta"] * t["u_r"])


def _apo_down(t: dict) -> torch.Tensor:
    """APO-down (same paper, eq. 8): sigmoid(beta u_c) + 1 - sigmoid(h). TRL "apo_down"."""
    return torch.sigmoid(t["beta"] * t["u_c"]) + 1.0 - torch.sigmoid(t["h"])


def _aot(t: dict) -> torch.Tensor:
    """AOT paired (Melnyk et al. 2024, arXiv:2406.05882): d = sort(pc - pr) - sort(rc - rr) over the batch
    (first-order stochastic dominance via 1-D optimal transport), then the smoothed sigmoid loss of
    beta d. Per-pair entries are in sorted order, their mean is the loss. TRL "aot"."""
    d = torch.sort(t["pc"] - t["pr"]).values - torch.sort(t["rc"] - t["rr"]).values
    return _smoothed_sigmoid(t["beta"] * d, t["ls"])


def _aot_unpaired(t: dict) -> torch.Tensor:
    """AOT unpaired (same paper): d = sort(u_c) - sort(u_r), smoothed sigmoid of beta d. TRL "aot_unpaired"
    (called "aot_pair" in earlier TRL versions)."""
    d = torch.sort(t["u_c"]).values - torch.sort(t["u_r"]).values
    return _smoothed_sigmoid(t["beta"] * d, t["ls"])


def _discopop(t: dict) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, eq. 5): with m = sigmoid(h/tau),
    (1 - m)(-log sigmoid(h)) + m e^{-h}; tau = ``discopop_tau`` (TRL default 0.05). TRL "discopop"."""
    h = t["h"]
    m = torch.sigmoid(h / t["tau"])
    return (1.0 - m) * -F.logsigmoid(h) + m * torch.exp(-h)


PAIR_LOSSES = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "discopop": _discopop,
}
DPO_LOSS_TYPES = tuple(PAIR_LOSSES)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    loss_weights: Optional[Sequence[float]] = None,
    chosen_weights: Optional[torch.Tensor] = None,
    rejected_weights: Optional[torch.Tensor] = None,
    discopop_tau: float = 0.05,
):
    """Per-pair DPO losses and implicit rewards, float64.

    Inputs: four ``[B]`` tensors of sequence log-probs (any float dtype, promoted to float64).
    ``loss_type``: a name of ``DPO_LOSS_TYPES`` or a list of them; a list is TRL's mixture (MPO):
    per-pair loss = sum_k loss_weights[k] * loss_k (``loss_weights`` None = all 1).
    ``chosen_weights`` / ``rejected_weights``: optional ``[B]`` per-sequence weights (WPO, see
    ``wpo_weights``); each pair's loss is multiplied by their product, with no gradient through them
    (TRL ``use_weighting``).

    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` in float64; the batch loss is
    ``losses.mean()``; rewards are beta * (policy - ref), detached as in TRL.
    """
    pc, pr, rc, rr = (x.double() for x in (policy_chosen_logps, policy_rejected_logps,
                                            ref_chosen_logps, ref_rejected_logps))
    u_c, u_r = pc - rc, pr - rr
    s_c = f_divergence_scores(u_c, f_divergence, f_alpha)
    s_r = f_divergence_scores(u_r, f_divergence, f_alpha)
    terms = dict(pc=pc, pr=pr, rc=rc, rr=rr, u_c=u_c, u_r=u_r, s_c=s_c, s_r=s_r, h=beta * (s_c - s_r),
                 beta=float(beta), ls=float(label_smoothing), tau=float(discopop_tau))
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"loss_weights: expected {len(types)} weight(s), got {len(weights)}")
    losses = torch.zeros_like(pc)
    for name, weight in zip(types, weights):
        if name not in PAIR_LOSSES:
            raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {name!r}")
        losses = losses + weight * PAIR_LOSSES[name](terms)
    if chosen_weights is not None or rejected_weights is not None:
        if chosen_weights is None or rejected_weights is None:
            raise ValueError("chosen_weights / rejected_weights: expected both or neither")
        losses = losses * (chosen_weights.double() * rejected_weights.double()).detach()
    return losses, (beta * u_c).detach(), (beta * u_r).detach()


def _response_mask(targets: torch.Tensor, mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return valid.double()


def ld_token_weights(mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411), rows ``[0:B]`` paired with ``[B:2B]``: response token k (1-based rank among the
    row's unmasked tokens) weighs 1 if k <= l_p = min(len_chosen, len_rejected), else ``ld_alpha``;
    masked tokens weigh 0. Matches current TRL ``ld_alpha`` (which ranks by cumulative mask as here).

    mask ``[2B, T]`` (bool or {0,1}) -> float64 ``[2B, T]``.
    """
    m = mask.double()
    if m.shape[0] % 2:
        raise ValueError(f"mask: expected an even number of rows [2B, T] for ld_alpha, got {tuple(m.shape)}")
    half = m.shape[0] // 2
    lengths = m.sum(dim=1)
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
    rank = torch.cumsum(m, dim=1)
    return m * torch.where(rank <= shared[:, None], 1.0, float(ld_alpha))


def sequence_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    average: bool = False,
    ld_alpha: Optional[float] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sequence log-probs ``[R]`` float64 from logits ``[R, T, V]`` and targets ``[R, T]`` (TRL's
    ``concatenated_forward`` with labels already shifted).

    Response tokens: ``mask`` (None = all) and target != ignore_index. Sum over them of the token
    log-probs of ``reference.logprobs.token_logprobs``; with ``ld_alpha`` the tokens are weighted by
    ``ld_token_weights`` (R = 2B, rows [0:B] chosen, [B:2B] rejected); ``average=True`` then divides by
    the number of response tokens (IPO-style; a row with none gives 0).
    """
    from .logprobs import token_logprobs

    m = _response_mask(targets, mask, ignore_index)
    # Logits of non-response tokens may hold anything (NaN included): they are replaced before any
    # arithmetic, so neither the value nor autograd's backward (0 * NaN) ever sees them.
    logits = torch.where(m[..., None] > 0, logits.double(), 0.0)
    logp, _ = token_logprobs(logits, targets, temperature=temperature, logit_scale=logit_scale,
                             softcap=softcap, ignore_index=ignore_index)
    w = m if ld_alpha is None else ld_token_weights(m, ld_alpha)
    # where, not a product: a masked token's logits may hold anything (NaN included), and 0 * NaN = NaN.
    total = torch.where(w != 0, logp.double() * w, 0.0).sum(dim=1)
    if average:
        total = total / m.sum(dim=1).clamp(min=1.0)
    return total


def wpo_weights(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """WPO per-sequence weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, eq. 2), float64 ``[R]``, detached:

        w = exp( mean over response tokens t of [ log p(y_t) - log sum_v p_v^2 ] )

    (the per-token probability normalised by the distribution's self-overlap, geometric mean over the
    response; a row with no response token gets exp(0) = 1). A pair's loss is multiplied by
    w_chosen * w_rejected, as current TRL ``use_weighting`` (earlier TRL versions also clamped the
    product at 1).
    """
    from .logprobs import token_stats

    with torch.no_grad():
        stats = token_stats(logits, targets, temperature=temperature, logit_scale=logit_scale,
                            softcap=softcap, ignore_index=ignore_index)
        m = _response_mask(targets, mask, ignore_index)
        mean = torch.where(m > 0, stats.logp - stats.log_sum_p2, 0.0).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.exp(mean)
