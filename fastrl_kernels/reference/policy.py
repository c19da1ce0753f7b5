"""PPO / GRPO family losses in float64, written out term by term (docs/design.md, "The loss math").

Inputs of leading shape ``[B, T]`` (B sequences of T tokens) or ``[N]`` (one sequence, B=1, T=N).
Nothing here is fused or chunked; every backend of ``fastrl_kernels.ops`` is checked against it.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..config import PolicyLossConfig, canonical_loss_agg, resolve_config
from .logprobs import token_logprobs

Number = Union[float, int, torch.Tensor]


def _f64(x: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=like.device)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def _float_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(like, dtype=torch.float64)
    if mask.shape != like.shape:
        raise ValueError(f"mask: expected shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=torch.float64)


def kl_penalty(
    logp: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[float] = None,
    value_cap: Optional[float] = None,
) -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference policy, float64, shape of ``logp``.

    k = ref - logp, clamped to [-clamp, clamp] when ``clamp`` is given (verl clamps at 20 / 10), then
    "k1" = -k, "abs" = |k|, "k2" = k^2 / 2, "k3" = e^k - k - 1 (Schulman's estimators, verl's names).
    "k1+" / "k3+": the value of k1 / k3 with the gradient of k2 (straight-through, verl's "+" suffix).
    ``value_cap``: the value is clamped to [-value_cap, value_cap] (verl caps k3 at 10, OpenRLHF every
    estimator), with zero gradient where the cap binds, except that "+" estimators keep k2's gradient.
    Differentiable in ``logp``; ``ref_logprobs`` is treated as a constant.
    """
    logp = logp.to(torch.float64)
    k = ref_logprobs.detach().to(torch.float64) - logp
    if clamp is not None:
        k = torch.clamp(k, -clamp, clamp)
    if estimator not in KL_TERMS:
        raise ValueError(f"estimator: expected one of {tuple(KL_TERMS)}, got {estimator!r}")
    if value_cap is None:
        return KL_TERMS[estimator](k)
    value = torch.clamp(KL_TERMS[estimator.rstrip("+")](k), -value_cap, value_cap)
    if estimator.endswith("+"):
        return 0.5 * k * k + (value - 0.5 * k * k).detach()
    return value


def _straight_through(value):
    """The value of `value(k)` with the gradient of k^2 / 2."""
    return lambda k: 0.5 * k * k + (value(k) - 0.5 * k * k).detach()


# Estimator -> float64 value from k = ref - logp; the fused algebra's table is losses/kl.py, and a test
# checks both have the same names.
KL_TERMS = {
    "k1": lambda k: -k,
    "abs": lambda k: k.abs(),
    "k2": lambda k: 0.5 * k * k,
    "k3": lambda k: torch.exp(k) - k - 1.0,
    "k1+": _straight_through(lambda k: -k),
    "k3+": _straight_through(lambda k: torch.exp(k) - k - 1.0),
}


# Each canonical loss_agg name -> (x, m) -> (the masked total, the default divisor) of the docstring below,
# formed here from the definitions (independently of losses/aggregation_modes.py, whose keys a test checks).
AGGREGATIONS = {
    "token-mean": lambda x, m: ((m * x).sum(), torch.clamp(m.sum(), min=1.0)),
    "seq-mean-token-mean": lambda x, m: (((m * x).sum(dim=-1) / torch.clamp(m.sum(dim=-1), min=1.0)).sum(),
                                         float(x.shape[0])),
    "seq-mean-token-sum": lambda x, m: ((m * x).sum(), float(x.shape[0])),
    "seq-mean-token-sum-norm": lambda x, m: ((m * x).sum(), float(x.shape[0] * x.shape[1])),
    "sum": lambda x, m: ((m * x).sum(), 1.0),
}


def aggregate(
    values: torch.Tensor,
    mask: Optional[torch.Tensor],
    mode: str,
    normalizer: Optional[Number] = None,
) -> torch.Tensor:
    """Reduce per-token ``values`` ``[B, T]`` (or ``[N]`` = one sequence) to a 0-d float64 loss.

    With m = mask as float (None = ones) and D the divisor (``normalizer`` when given, else the default):

        "token-mean"               sum(m x) / D,                      D = max(sum(m), 1)
        "seq-mean-token-mean"      sum_b [sum_t m x / max(sum_t m, 1)] / D,   D = B
        "seq-mean-token-sum"       sum_b sum_t m x / D,               D = B
        "seq-mean-token-sum-norm"  sum(m x) / D,                      D = B * T  (Dr. GRPO)
        "sum"                      sum(m x) / D,                      D = 1

    These are verl's ``loss_agg_mode`` values; TRL's names ("grpo", "bnpo", "dapo", "dr_grpo") are
    accepted through ``config.canonical_loss_agg``. All-masked input gives 0.
    """
    mode = canonical_loss_agg(mode)
    x = _as_2d(values.to(torch.float64))
    m = _float_mask(None if mask is None else _as_2d(mask), x)
    total, default = AGGREGATIONS[mode](x, m)
    divisor = default if normalizer is None else normalizer
    return total / _f64(divisor, x)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (m * x).sum() / torch.clamp(m.sum(), min=1.0)


def _clip_term(ratio, adv, logp, cfg):
    low, high = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    capped = torch.clamp(ratio, max=cfg.delta) if cfg.delta is not None else ratio
    per_token = torch.maximum(-adv * capped, -adv * torch.clamp(ratio, low, high))
    if cfg.dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -cfg.dual_clip * adv), per_token)
    return per_token


def _cispo_term(ratio, adv, logp, cfg):
    return -torch.clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high).detach() * adv * logp


def _sapo_term(ratio, adv, logp, cfg):
    tau = torch.where(adv > 0, _f64(cfg.sapo_temp_pos, logp), _f64(cfg.sapo_temp_neg, logp))
    return -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv


def _gpg_term(ratio, adv, logp, cfg):
    return -adv * logp


# loss_type -> (how the ratio is formed, the float64 policy term of each token): written out here on its
# own; the fused algebra's registry is losses/policy_types.py, and a test checks both have the same names.
POLICY_TERMS = {
    "clip": ("token", _clip_term),
    "gspo": ("sequence", _clip_term),
    "gspo_token": ("sequence_token", _clip_term),
    "cispo": ("token", _cispo_term),
    "sapo": ("token", _sapo_term),
    "gpg": ("token", _gpg_term),
}


def policy_loss_from_logprobs(
    logp: torch.Tensor,
    entropy: Optional[torch.Tensor],
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    normalizer: Optional[Number] = None,
    is_weights: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    **config_overrides: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss given per-token log-probs: ``(loss, metrics)``, float64, differentiable in logp, entropy.

    Shapes: logp, old_logprobs, mask, ref_logprobs, is_weights ``[B, T]`` (or ``[N]``); advantages
    ``[B, T]`` or per sequence ``[B]`` (broadcast over T); ``entropy`` like logp, may be None only when
    ``entropy_mode="sampled"``. With r = exp(logp - old), A the advantage, eps_low / eps_high:

        clip   l = max(-A min(r, delta), -A clip(r, 1-eps_low, 1+eps_high)); dual clip c: for A < 0,
               l = min(l, -c A) (verl's clip_ratio_c)
        gspo   the same with r = s_b = exp(sum_t m (logp - old) / max(sum_t m, 1)) for every token
        gspo_token  r = exp(sg(log s_b) + logp - sg(logp))    (sg = stop-gradient)
        cispo  l = -sg(clip(r, 1-eps_low, 1+eps_high)) A logp
        sapo   l = -sigmoid(tau (r - 1)) (4 / tau) A, tau = sapo_temp_pos if A > 0 else sapo_temp_neg
        gpg    l = -A logp

    then l *= is_weights (no gradient), and loss = aggregate(l, m, loss_agg) + kl_coef * aggregate(kl, m,
    kl_agg) - entropy_coef * aggregate(H, m, entropy_agg) with kl = kl_penalty(logp, ref, kl_estimator,
    kl_clamp, kl_value_cap) when ``ref_logprobs`` is given (kl_agg, entropy_agg None: loss_agg) and
    H = entropy ("exact") or -logp ("sampled"). Masked tokens contribute nothing and get zero gradient.
    Metrics (0-d, detached): clip_frac_low / clip_frac_high (fraction of unmasked tokens with r below
    1-eps_low and A < 0 / above 1+eps_high and A > 0), ratio_mean, ratio_max (0 when all masked),
    kl_mean (0 without ref), entropy_mean, approx_kl = mean((r - 1) - log r); for gspo* r is the
    sequence ratio.
    """
    cfg = resolve_config(PolicyLossConfig, config, config_overrides)
    if cfg.kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={cfg.kl_coef})")
    if entropy is None and cfg.entropy_mode == "exact":
        raise ValueError("entropy: required when entropy_mode='exact'; pass it or use entropy_mode='sampled'")

    per_sequence_advantages = logp.dim() == 2 and advantages.dim() == 1
    logp = _as_2d(logp.to(torch.float64))
    m = _float_mask(None if mask is None else _as_2d(mask), logp)
    unmasked = m > 0
    logp = torch.where(unmasked, logp, 0.0)
    # Masked positions may hold padding garbage: pin their ratio to 1 and their KL to 0 so that no
    # inf * 0 = NaN reaches the loss or the gradient.
    old = torch.where(unmasked, _as_2d(old_logprobs).detach().to(torch.float64), logp.detach())
    adv = advantages.detach().to(torch.float64)
    adv = adv.unsqueeze(-1) if per_sequence_advantages else _as_2d(adv)
    if adv.shape not in (logp.shape, (logp.shape[0], 1)):
        raise ValueError(
            f"advantages: expected shape {tuple(logp.shape)} or [{logp.shape[0]}], got {tuple(advantages.shape)}"
        )
    # Garbage at masked positions (advantages, is_weights, entropy) is pinned to a neutral value too.
    adv = torch.where(unmasked, adv.expand_as(logp), 0.0)

    ratio_kind, term = POLICY_TERMS[cfg.loss_type]
    log_ratio = logp - old
    if ratio_kind != "token":
        seq_log_ratio = (m * log_ratio).sum(dim=-1, keepdim=True) / torch.clamp(m.sum(dim=-1, keepdim=True), min=1.0)
        if ratio_kind == "sequence":
            log_ratio = seq_log_ratio.expand_as(logp)
        else:
            log_ratio = seq_log_ratio.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    per_token = term(ratio, adv, logp, cfg)
    if is_weights is not None:
        per_token = per_token * torch.where(unmasked, _as_2d(is_weights).detach().to(torch.float64), 1.0)

    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        ref = torch.where(unmasked, _as_2d(ref_logprobs).detach().to(torch.float64), logp.detach())
        kl = kl_penalty(logp, ref, cfg.kl_estimator, cfg.kl_clamp, cfg.kl_value_cap)

    if cfg.entropy_mode == "exact":
        h = torch.where(unmasked, _as_2d(entropy.to(torch.float64)), 0.0)
    else:
        h = -logp
    loss = aggregate(per_token, m, cfg.loss_agg, normalizer)
    if cfg.kl_coef != 0:
        loss = loss + cfg.kl_coef * aggregate(kl, m, cfg.resolved_kl_agg, normalizer)
    if cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * aggregate(h, m, cfg.resolved_entropy_agg, normalizer)

    with torch.no_grad():
        r = ratio.detach()
        low, high = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
        metrics = {
            "clip_frac_low": _masked_mean(((r < low) & (adv < 0)).to(torch.float64), m),
            "clip_frac_high": _masked_mean(((r > high) & (adv > 0)).to(torch.float64), m),
            "ratio_mean": _masked_mean(r, m),
            # ratios are > 0, so a 0 at masked tokens leaves the max of the unmasked ones (0 if none)
            "ratio_max": torch.where(unmasked, r, torch.zeros_like(r)).amax()
            if r.numel()
            else torch.zeros((), dtype=torch.float64),
            "kl_mean": _masked_mean(kl.detach(), m),
            "entropy_mean": _masked_mean(h.detach(), m),
            "approx_kl": _masked_mean((r - 1.0) - log_ratio.detach(), m),
        }
    return loss, metrics


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    normalizer: Optional[Number] = None,
    is_weights: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    **config_overrides: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss from logits: ``(loss, logp, entropy, metrics)``, float64, differentiable in logits.

    logits ``[B, T, V]`` or ``[N, V]``, targets int64 of the leading shape. logp and entropy are
    ``token_logprobs(logits, targets, temperature=config.temperature, logit_scale=..., softcap=...)``
    (``logit_scale`` / ``softcap`` as in ``transformed_logits``); tokens whose target is
    ``ignore_index`` count as masked; logp and entropy are 0 at masked tokens. The rest is
    ``policy_loss_from_logprobs`` (same arguments).
    """
    cfg = resolve_config(PolicyLossConfig, config, config_overrides)
    keep = _float_mask(mask, targets.to(torch.float64)) * (targets != ignore_index).to(torch.float64)
    # Logits of masked tokens may hold anything (NaN included): replaced before any arithmetic, so
    # neither the value nor autograd's backward (0 * NaN) ever sees them.
    logits = torch.where(keep[..., None] > 0, logits.to(torch.float64), 0.0)
    logp, entropy = token_logprobs(
        logits,
        targets,
        temperature=cfg.temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
    )
    m = _float_mask(mask, logp) * (targets != ignore_index).to(torch.float64)
    # Masked tokens carry no log-prob or entropy (the fused ops never read their logits, which may
    # hold anything, NaN included).
    logp, entropy = torch.where(m > 0, logp, 0.0), torch.where(m > 0, entropy, 0.0)
    loss, metrics = policy_loss_from_logprobs(
        logp,
        entropy,
        old_logprobs,
        advantages,
        m,
        ref_logprobs=ref_logprobs,
        normalizer=normalizer,
        is_weights=is_weights,
        config=cfg,
    )
    return loss, logp, entropy, metrics
