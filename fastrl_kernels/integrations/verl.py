"""verl adapters: per-token log-prob / entropy helpers on the core op and verl-convention policy losses.

verl (0.9.1) computes ``log_prob`` (and entropy) from the actor's logits with
``verl.utils.torch_functional.logprobs_from_logits`` / ``entropy_from_logits``, then calls the policy
loss registered under ``actor.policy_loss.loss_mode`` in ``verl.trainer.ppo.core_algos``:
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``.

- ``logprobs_from_logits``, ``entropy_from_logits``, ``logprobs_and_entropy_from_logits``: drop-in helpers on
  ``fk.token_logprobs`` (one streamed pass; no fp32 softmax copy of the logits).
- ``make_policy_loss_fn(loss_mode)`` / ``register_verl_policy_losses()``: the "vanilla" (PPO with verl's
  dual clip ``clip_ratio_c``), "gspo", "sapo", "cispo" and "gpg" losses with verl's signature and conventions,
  registered as ``"fastrl_<mode>"`` (set ``actor.policy_loss.loss_mode=fastrl_vanilla``).
- ``fused_policy_loss(logits, responses, ...)``: the same loss straight from logits (``fk.policy_loss``:
  one streamed pass in the forward, one in the backward), for actors that can hand over logits.

verl conventions reproduced: ``clip_ratio_low / clip_ratio_high`` default to ``clip_ratio``; the
log-ratio is clamped to [-20, 20] (vanilla, sapo, cispo); gpg (-A log_prob) has no ratio and,
like verl's, reports no metrics; vanilla applies the dual clip for A < 0 with
``clip_ratio_c`` (default 3); sapo always aggregates "seq-mean-token-mean"; ``agg_loss``'s
``global_batch_info`` (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) sets the
normaliser, and the seq-mean modes count only sequences with at least one token. Not reproduced: gspo's
clamp of the sequence log-ratio at 10 (reached only when a sequence's mean log-ratio exceeds 10).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import fastrl_kernels as fk

from ..config import PolicyLossConfig
from ..losses.policy import policy_loss_from_logprobs

LOSS_MODES = {"vanilla": "clip", "gspo": "gspo_token", "sapo": "sapo", "cispo": "cispo", "gpg": "gpg"}
# Modes whose gradient flows through log_prob itself, outside verl's [-20, 20] log-ratio clamp.
_UNCLAMPED = ("gspo_token", "cispo", "gpg")
_AGG = {
    "token-mean": "token-mean",
    "token-sum": "sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}
LOG_RATIO_CLAMP = 20.0


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True,
                         *, temperature: float = 1.0) -> torch.Tensor:
    """verl's ``logprobs_from_logits``: log softmax(logits / temperature)[labels], fp32, shape of labels.

    logits ``[..., V]`` fp32 / bf16 / fp16 (verl divides by the temperature before the call: keep 1.0
    then); labels int64 ``[...]``. Differentiable in logits. ``inplace_backward`` is accepted for
    signature compatibility (the backward never holds an extra fp32 copy).
    """
    return fk.token_logprobs(logits, labels, temperature=temperature, with_entropy=False)[0]


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """verl's ``entropy_from_logits``: H = logsumexp(x) - sum softmax(x) x per row, fp32 ``[...]``."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return fk.token_logprobs(logits, labels, temperature=temperature)[1]


def logprobs_and_entropy_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0):
    """Both of the above in one pass over the logits: ``(log_prob, entropy)``, fp32, differentiable."""
    return fk.token_logprobs(logits, labels, temperature=temperature)


def _get(config: Any, name: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def policy_config(config: Any, loss_mode: str = "vanilla", loss_agg_mode: str = "token-mean",
                  **overrides: Any) -> PolicyLossConfig:
    """``PolicyLossConfig`` for verl's actor ``config`` (ActorConfig / DictConfig / any attribute holder)."""
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode: expected one of {tuple(LOSS_MODES)}, got {loss_mode!r}")
    if loss_agg_mode not in _AGG:
        raise ValueError(f"loss_agg_mode: expected one of {tuple(_AGG)}, got {loss_agg_mode!r}")
    clip = _get(config, "clip_ratio", 0.2)
    fields = dict(
        loss_type=LOSS_MODES[loss_mode],
        clip_eps_low=_get(config, "clip_ratio_low", clip),
        clip_eps_high=_get(config, "clip_ratio_high", clip),
        dual_clip=_get(config, "clip_ratio_c", 3.0) if loss_mode == "vanilla" else None,
        sapo_temp_pos=_get(config, "tau_pos", 1.0),
        sapo_temp_neg=_get(config, "tau_neg", 1.05),
        loss_agg="seq-mean-token-mean" if loss_mode == "sapo" else _AGG[loss_agg_mode],
    )
    fields.update(overrides)
    return PolicyLossConfig(**fields)


def verl_normalizer(response_mask: torch.Tensor, loss_agg_mode: str, config: Any = None):
    """The denominator of verl's ``agg_loss`` given ``config.global_batch_info`` (empty: local batch).

    token-mean: batch_num_tokens / dp_size; token-sum: 1 / dp_size; seq-mean-*: global_batch_size / dp_size
    (default: sequences with >= 1 token); seq-mean-token-sum-norm also x loss_scale_factor (default T).
    """
    info = dict(_get(config, "global_batch_info", {}) or {})
    dp = info.get("dp_size") or 1
    mask = response_mask.to(torch.float32)
    if loss_agg_mode == "token-mean":
        tokens = info.get("batch_num_tokens")
        return (mask.sum().clamp(min=1.0) if tokens is None else tokens) / dp
    if loss_agg_mode == "token-sum":
        return 1.0 / dp
    sequences = info.get("global_batch_size")
    if sequences is None:
        sequences = (mask.sum(dim=-1) > 0).to(torch.float32).sum()
    normalizer = sequences / dp
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor") or _get(config, "loss_scale_factor", None) or mask.shape[-1]
        normalizer = normalizer * scale
    return normalizer


def _clamped_logp(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """old + clamp(log_prob - old, -20, 20): the ratio and its gradient of verl's clamped log-ratio."""
    return old_log_prob + (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _verl_metrics(old_log_prob, log_prob, advantages, mask, cfg: PolicyLossConfig) -> dict[str, float]:
    """verl's pg_clipfrac, ppo_kl, pg_clipfrac_lower (masked means, as Python floats like verl)."""
    with torch.no_grad():
        mask = mask.to(torch.float32)
        log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        if cfg.loss_type == "gspo_token":
            raw = log_prob - old_log_prob
            seq = (raw * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
            ratio = torch.exp(seq.clamp(max=10.0)).expand_as(raw)
        count = mask.sum().clamp(min=1.0)
        clipped = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
        if cfg.loss_type == "cispo":
            frac = ((ratio != clipped).float() * mask).sum() / count
        elif cfg.loss_type == "sapo":
            frac = torch.zeros(())
        else:
            frac = ((-advantages * clipped > -advantages * ratio).float() * mask).sum() / count
        lower = torch.zeros(())
        if cfg.dual_clip is not None:
            unclipped = torch.maximum(-advantages * ratio, -advantages * clipped)
            lower = ((unclipped > -advantages * cfg.dual_clip) & (advantages < 0)).float()
            lower = (lower * mask).sum() / count
        kl = -(log_prob - old_log_prob) if cfg.loss_type == "gspo_token" else -log_ratio
        return {"actor/pg_clipfrac": frac.item(), "actor/ppo_kl": ((kl * mask).sum() / count).item(),
                "actor/pg_clipfrac_lower": lower.item()}


def make_policy_loss_fn(loss_mode: str = "vanilla"):
    """A verl ``PolicyLossFn`` for ``loss_mode`` (a key of ``LOSS_MODES``) on our loss algebra.

    Returns ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
    rollout_is_weights=None) -> (pg_loss 0-d, metrics dict of floats)``; all tensors ``[B, T]``,
    ``rollout_is_weights`` multiplies the per-token policy term. Equal to verl's function of the same name.
    """
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode: expected one of {tuple(LOSS_MODES)}, got {loss_mode!r}")

    def policy_loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                       config=None, rollout_is_weights=None):
        cfg = policy_config(config, loss_mode, loss_agg_mode)
        mask = response_mask.to(log_prob.dtype)
        logp = log_prob if cfg.loss_type in _UNCLAMPED else _clamped_logp(log_prob, old_log_prob)
        loss, _ = policy_loss_from_logprobs(
            logp, None, old_log_prob, advantages, mask, is_weights=rollout_is_weights,
            normalizer=verl_normalizer(response_mask, "seq-mean-token-mean" if loss_mode == "sapo"
                                       else loss_agg_mode, config),
            config=cfg,
        )
        if cfg.loss_type == "gpg":  # verl's gpg reports no metrics
            return loss, {}
        return loss, _verl_metrics(old_log_prob, log_prob, advantages, mask, cfg)

    policy_loss_fn.__name__ = f"fastrl_{loss_mode}_policy_loss"
    return policy_loss_fn


def register_verl_policy_losses(prefix: str = "fastrl_") -> list[str]:
    """Register every mode with verl's ``register_policy_loss`` as ``prefix + mode``; returns the names."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    names = []
    for mode in LOSS_MODES:
        register_policy_loss(prefix + mode)(make_policy_loss_fn(mode))
        names.append(prefix + mode)
    return names


def fused_policy_loss(
    logits: torch.Tensor,
    responses: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    *,
    loss_mode: str = "vanilla",
    temperature: float = 1.0,
    **options: Any,
):
    """verl's policy loss computed from ``logits [B, T, V]`` and ``responses [B, T]`` by ``fk.policy_loss``.

    Same value as ``make_policy_loss_fn(loss_mode)`` on ``logprobs_from_logits(logits / temperature)``
    while the log-ratio stays inside verl's [-20, 20] clamp. ``options`` are extra ``PolicyLossConfig``
    fields (e.g. kl_coef with kl_estimator "k3" and kl_clamp=20, entropy_coef: verl aggregates the entropy
    bonus with the same ``loss_agg_mode``) and ``policy_loss`` keywords (``ref_logprobs=``, ``backend=``).
    Returns ``fk.PolicyLossOutput``; ``loss.backward()`` reaches the logits.
    """
    call = {k: options.pop(k) for k in ("ref_logprobs", "backend", "inplace_grad") if k in options}
    agg = "seq-mean-token-mean" if loss_mode == "sapo" else loss_agg_mode
    cfg = policy_config(config, loss_mode, loss_agg_mode, temperature=temperature, **options)
    return fk.policy_loss(logits, responses, old_log_prob, advantages, response_mask, config=cfg,
                          normalizer=verl_normalizer(response_mask, agg, config),
                          is_weights=rollout_is_weights, **call)
