"""TRL adapters: TRL's GRPO loss computed by the fused kernels (TRL is imported lazily).

Use either the subclass or the patch::

    from fastrl_kernels.integrations.trl import FastGRPOTrainer    # a trl.GRPOTrainer subclass
    trainer = FastGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), ...)

    from fastrl_kernels.integrations.trl import patch_grpo_trainer
    patch_grpo_trainer(trainer)                                     # an existing GRPOTrainer instance

Both replace ``GRPOTrainer._compute_loss(model, inputs)`` (TRL 1.16): the model runs its backbone, and
the loss, per-token log-probs, entropy and all gradients come from ``fk.linear_policy_loss`` on the last
hidden state and the lm_head weight (``path="linear"``, default: never N x V logits in fp32) or from
``fk.policy_loss`` on the completion logits (``path="logits"``). The value and gradients equal TRL's own
``_compute_loss`` (tested for every loss type below). Mapping from ``GRPOConfig``:

- ``loss_type``: "grpo" / "sapo" -> seq-mean-token-mean / B; "bnpo" -> token-mean / local tokens; "dr_grpo" ->
  token sum / (B * max_completion_length); "dapo" / "cispo" -> token sum / (num_items_in_batch /
  num_processes * grad_accum / steps_per_generation); "luspo" -> seq-mean-token-sum. Every mode is also
  divided by the gradient-accumulation steps in training, exactly as TRL does.
- ``epsilon`` / ``epsilon_high`` -> clip_eps_low / clip_eps_high; ``delta`` -> delta; cispo caps the ratio at
  ``epsilon_high`` only (clip_eps_low=1, clip_eps_high=epsilon_high-1); ``sapo_temperature_pos/neg``.
- ``importance_sampling_level="sequence"`` -> loss_type "gspo" (GSPO's length-normalised sequence ratio).
- ``beta`` -> kl_coef with the "k3" estimator on ``ref_per_token_logps``; ``temperature`` -> temperature.
- vLLM importance-sampling correction (``importance_sampling_ratio``) -> ``is_weights``; ``tool_mask`` is
  multiplied into the completion mask.
- ``entropy_coef`` (static): minus coef x token-mean entropy / grad_accum, on the kernels' entropy.

Features with no fused equivalent fall back to TRL's own ``_compute_loss`` (same numbers, no fusion):
loss_type "vespo", ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``, ``use_bias_correction_kl``,
adaptive entropy, MoE aux loss, vision inputs, sequence-level "sapo" / "cispo", cispo with epsilon_high < 1.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import PolicyLossConfig

_TRL_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "luspo": "seq-mean-token-sum",
}
_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "image_position_ids")


def linear_path_available() -> bool:
    """True when ``fk.linear_policy_loss`` (the lm_head path) is importable."""
    try:
        from ..ops import linear  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(trainer: Any, inputs: dict) -> Optional[str]:
    """Why ``trainer`` / ``inputs`` need TRL's own loss (None when the fused loss reproduces it)."""
    args = trainer.args
    checks = (
        (trainer.loss_type not in _TRL_AGG, f"loss_type={trainer.loss_type!r}"),
        (trainer.off_policy_mask_threshold is not None, "off_policy_mask_threshold"),
        (trainer.top_entropy_quantile < 1.0, "top_entropy_quantile < 1"),
        (trainer.beta != 0.0 and getattr(args, "use_bias_correction_kl", False), "use_bias_correction_kl"),
        (getattr(trainer, "use_adaptive_entropy", False), "use_adaptive_entropy"),
        (getattr(trainer, "aux_loss_enabled", False), "MoE aux loss"),
        (any(inputs.get(k) is not None for k in _VISION_KEYS), "vision inputs"),
        (trainer.importance_sampling_level == "sequence" and trainer.loss_type in ("sapo", "cispo"),
         "sequence-level sapo/cispo"),
        (trainer.loss_type == "cispo" and trainer.epsilon_high < 1.0, "cispo with epsilon_high < 1"),
    )
    for failed, reason in checks:
        if failed:
            return reason
    return None


def grpo_loss_config(trainer: Any) -> PolicyLossConfig:
    """The ``PolicyLossConfig`` equal to ``trainer``'s (TRL ``GRPOTrainer``) loss settings."""
    args = trainer.args
    sequence = trainer.importance_sampling_level == "sequence"
    if trainer.loss_type == "cispo":
        kind, low, high = "cispo", 1.0, trainer.epsilon_high - 1.0
    elif trainer.loss_type == "sapo":
        kind, low, high = "sapo", trainer.epsilon_low, trainer.epsilon_high
    else:
        kind, low, high = ("gspo" if sequence else "clip"), trainer.epsilon_low, trainer.epsilon_high
    return PolicyLossConfig(
        loss_type=kind,
        clip_eps_low=low,
        clip_eps_high=high,
        delta=args.delta if kind in ("clip", "gspo") else None,
        sapo_temp_pos=args.sapo_temperature_pos,
        sapo_temp_neg=args.sapo_temperature_neg,
        kl_coef=float(trainer.beta),
        kl_estimator="k3",
        loss_agg=_TRL_AGG[trainer.loss_type],
        temperature=float(trainer.temperature),
    )


def _accumulation(trainer: Any, training: bool) -> float:
    return float(trainer.current_gradient_accumulation_steps) if training else 1.0


def grpo_normalizer(trainer: Any, inputs: dict, mask: torch.Tensor, training: bool):
    """The denominator TRL divides the masked per-token loss by (see the module docstring)."""
    ga = _accumulation(trainer, training)
    batch = mask.shape[0]
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo", "luspo"):
        return batch * ga
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * ga
    if loss_type == "dr_grpo":
        return batch * trainer.max_completion_length * ga
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if training:
        normalizer = normalizer * ga / trainer.args.steps_per_generation
    return normalizer


def _lm_head(model: Any) -> tuple[torch.Tensor, Optional[torch.Tensor], float, Optional[float]]:
    """(weight, bias, logit_scale, softcap) of the output layer, read as TRL's fused head reads them."""
    head = model.get_output_embeddings()
    text_config = model.config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scale = 1.0 / text_config.logits_scaling
    return head.weight, head.bias, 1.0 if scale is None else float(scale), getattr(
        text_config, "final_logit_softcapping", None)


def fused_grpo_compute_loss(trainer: Any, model: Any, inputs: dict, *, path: str = "linear") -> torch.Tensor:
    """TRL's ``GRPOTrainer._compute_loss(model, inputs)``, with the loss on the fused kernels.

    ``inputs`` is TRL's batch: prompt_ids / prompt_mask ``[B, P]``, completion_ids / completion_mask
    ``[B, T]``, advantages ``[B]`` or ``[B, T]``, optional old_per_token_logps / ref_per_token_logps /
    importance_sampling_ratio ``[B, T]`` fp32, num_items_in_batch (0-d), optional tool_mask. ``path`` is
    "linear" (hidden state x lm_head weight, falls back to "logits" when unavailable) or "logits".
    Returns the scalar loss to backpropagate; logs TRL's metrics (entropy, kl, clip_ratio/*).
    """
    if path not in ("linear", "logits"):
        raise ValueError(f"path: expected 'linear' or 'logits', got {path!r}")
    import fastrl_kernels as fk

    training = trainer.model.training
    completion_ids = inputs["completion_ids"]
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    keep = completion_ids.size(1)
    cfg = grpo_loss_config(trainer)
    advantages = inputs["advantages"]
    normalizer = grpo_normalizer(trainer, inputs, mask, training)
    is_weights = None
    if trainer.use_vllm and trainer.args.vllm_importance_sampling_correction:
        is_weights = inputs["importance_sampling_ratio"].expand_as(mask)
    ref = inputs.get("ref_per_token_logps") if cfg.kl_coef != 0.0 else None
    unwrapped = trainer.accelerator.unwrap_model(model)
    if hasattr(unwrapped, "get_base_model"):
        unwrapped = unwrapped.get_base_model()
    use_linear = path == "linear" and linear_path_available()
    # Through the (possibly DDP-wrapped) model so data-parallel hooks run; logits for one position only
    # on the linear path, for the completion positions (+1 shifted) on the logits path.
    with trainer.accelerator.autocast():
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        logits_to_keep=1 if use_linear else keep + 1, output_hidden_states=use_linear)
    old = inputs.get("old_per_token_logps")
    if use_linear:
        hidden = outputs.hidden_states[-1][:, -keep - 1:-1]
        weight, bias, scale, softcap = _lm_head(unwrapped)
        hidden = hidden.to(weight.dtype)
        if old is None:
            with torch.no_grad():
                old = fk.linear_token_logprobs(hidden, weight, completion_ids, bias=bias,
                                               temperature=cfg.temperature)[0]
        out = fk.linear_policy_loss(
            hidden, weight, completion_ids, old, advantages, mask, bias=bias, ref_logprobs=ref, config=cfg,
            normalizer=normalizer, is_weights=is_weights, logit_scale=scale, softcap=softcap,
        )
    else:
        logits = outputs.logits[:, :-1]
        if old is None:
            with torch.no_grad():
                old = fk.token_logprobs(logits, completion_ids, temperature=cfg.temperature,
                                        with_entropy=False)[0]
        out = fk.policy_loss(logits, completion_ids, old, advantages, mask, ref_logprobs=ref, config=cfg,
                             normalizer=normalizer, is_weights=is_weights)
    loss = out.loss
    if getattr(trainer, "_entropy_bonus_enabled", False):
        # TRL's bonus is a token mean over the local tokens whatever the policy normaliser is, so it is
        # taken from the op's (differentiable) entropy output rather than folded into the config.
        policy_loss = loss.detach()
        fmask = mask.to(out.entropy.dtype)
        bonus = (out.entropy * fmask).sum() / fmask.sum().clamp(min=1.0) / _accumulation(trainer, training)
        loss = loss - trainer.entropy_coef * bonus
        mode = "train" if training else "eval"
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    _log_grpo_metrics(trainer, out, old, ref, advantages, mask, training)
    return loss


def _log_grpo_metrics(trainer, out, old, ref, advantages, mask, training) -> None:
    """TRL's metric names and global (all-rank) masked means, from detached O(N) tensors."""
    mode = "train" if training else "eval"
    mask = mask.float()
    logp = out.logprobs.detach()

    def global_masked_mean(x: torch.Tensor) -> float:
        totals = trainer.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    if trainer.beta != 0.0:
        k = ref - logp
        trainer._metrics[mode]["kl"].append(global_masked_mean(torch.expm1(k) - k))
    trainer._metrics[mode]["entropy"].append(global_masked_mean(out.entropy.detach()))
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logp - old
    if trainer.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    ratio = torch.exp(log_ratio).expand_as(mask)
    if trainer.loss_type == "cispo":
        clipped = ((ratio > trainer.epsilon_high) & (adv > 0)).float()
        trainer._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
    elif trainer.loss_type != "sapo":
        low = ((ratio < 1 - trainer.epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + trainer.epsilon_high) & (adv > 0)).float()
        trainer._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        trainer._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        trainer._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(low + high))


def _compute_loss_or_fallback(trainer: Any, model: Any, inputs: dict, trl_compute_loss) -> torch.Tensor:
    if unsupported_reason(trainer, inputs) is not None:
        return trl_compute_loss(model, inputs)
    return fused_grpo_compute_loss(trainer, model, inputs, path=getattr(trainer, "fastrl_path", "linear"))


def patch_grpo_trainer(trainer: Any, *, path: str = "linear") -> Any:
    """Make an existing TRL ``GRPOTrainer`` compute its loss with the fused kernels; returns it.

    Settings without a fused equivalent (``unsupported_reason``) keep TRL's own loss per batch.
    """
    if path not in ("linear", "logits"):
        raise ValueError(f"path: expected 'linear' or 'logits', got {path!r}")
    original = trainer._compute_loss
    trainer.fastrl_path = path

    def _compute_loss(model, inputs):
        return _compute_loss_or_fallback(trainer, model, inputs, original)

    trainer._compute_loss = _compute_loss
    return trainer


_CLASSES: dict[str, type] = {}


def _fast_grpo_trainer() -> type:
    from trl import GRPOTrainer

    class FastGRPOTrainer(GRPOTrainer):
        """``trl.GRPOTrainer`` whose loss runs on fastrl_kernels (see ``fastrl_kernels.integrations.trl``).

        Set ``fastrl_path`` ("linear" default, or "logits") on the instance to pick the path.
        """

        fastrl_path = "linear"

        def _compute_loss(self, model, inputs):
            return _compute_loss_or_fallback(self, model, inputs, super()._compute_loss)

    return FastGRPOTrainer


def __getattr__(name: str) -> Any:
    if name == "FastGRPOTrainer":
        if name not in _CLASSES:
            _CLASSES[name] = _fast_grpo_trainer()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
