"""Option dataclasses and input validation: the one place that raises on bad arguments.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

import torch

from .losses.aggregation_modes import AGGREGATIONS
from .losses.dpo_types import DPO_LOSSES, F_DIVERGENCE_SCORES
from .losses.kl import KL_ESTIMATORS
from .losses.policy_types import POLICY_LOSSES

POLICY_LOSS_TYPES = tuple(POLICY_LOSSES)  # the registry's keys: one entry per type
ENTROPY_MODES = ("exact", "sampled")
LOSS_AGG_MODES = tuple(AGGREGATIONS)  # the registry's keys (losses/aggregation_modes.py)
# TRL GRPOConfig.loss_type names -> our aggregation. "dapo" is token-mean over the global token count:
# pass that count as `normalizer` (TRL's num_items_in_batch).
LOSS_AGG_ALIASES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
BACKENDS = ("auto", "torch", "native", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def canonical_loss_agg(mode: str, argument: str = "loss_agg") -> str:
    """Map a TRL / verl aggregation name to ours; raise on an unknown one."""
    mode = LOSS_AGG_ALIASES.get(mode, mode)
    if mode not in LOSS_AGG_MODES:
        choices = LOSS_AGG_MODES + tuple(LOSS_AGG_ALIASES)
        raise ValueError(f"{argument}: expected one of {choices}, got {mode!r}")
    return mode


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_real(name: str, value: Any, expected: str, ok: Callable[[float], bool] = lambda x: True, *,
               allow_inf: bool = False) -> None:
    """Raise ValueError unless ``value`` is a real number (not a bool) for which ``ok`` holds.

    NaN is always refused, +-inf unless ``allow_inf``. ``expected`` reads "a number > 0" (or "None or a
    number ..."); for a NaN or an infinite value the message says "a finite number > 0".
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if real and not math.isnan(value) and (allow_inf or math.isfinite(value)) and ok(value):
        return
    if real and not allow_inf and not math.isfinite(value):
        expected = expected.replace("a ", "a finite ", 1)
    raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_nonneg(name: str, value: Any) -> None:
    # +inf is allowed: a clip range of inf is no clipping on that side.
    check_real(name, value, "a number >= 0", lambda x: x >= 0, allow_inf=True)


def check_temperature(temperature: Any) -> None:
    check_real("temperature", temperature, "a number > 0", lambda x: x > 0)


def check_normalizer(normalizer: Any, name: str = "normalizer") -> None:
    """None, a finite number > 0, or a one-element float / int tensor of such a value.

    A tensor's values are read only on CPU and outside torch.compile tracing (on an accelerator the
    read would sync the host): there a normalizer of 0 gives inf / NaN, as a division by 0 does.
    """
    if normalizer is None:
        return
    if not isinstance(normalizer, torch.Tensor):
        check_real(name, normalizer, "None, a number > 0 or a tensor of them", lambda x: x > 0)
        return
    if normalizer.dtype == torch.bool or normalizer.is_complex():
        raise TypeError(f"{name}: expected a float or integer tensor, got {normalizer.dtype}")
    if normalizer.numel() != 1:  # a [T] or [B, 1] tensor would broadcast into a silently wrong loss
        raise ValueError(f"{name}: expected one value (a 0-d or one-element tensor), got shape "
                         f"{tuple(normalizer.shape)}")
    if normalizer.device.type == "cpu" and not torch.compiler.is_compiling():
        values = normalizer.detach().double()
        if not bool((torch.isfinite(values) & (values > 0)).all()):
            bad = values[~(torch.isfinite(values) & (values > 0))][0].item()
            raise ValueError(f"{name}: expected finite values > 0, got {bad!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the PPO / GRPO family (docs/design.md, "The loss math").

    ``loss_agg`` accepts our names (verl's ``loss_agg_mode``: "token-mean", "seq-mean-token-mean",
    "seq-mean-token-sum", "seq-mean-token-sum-norm") plus "sum", and TRL's ``loss_type`` names
    ("grpo", "bnpo", "dr_grpo", "dapo"), stored canonical.
    """

    loss_type: str = "clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    delta: Optional[float] = None
    dual_clip: Optional[float] = None
    sapo_temp_pos: float = 1.0
    sapo_temp_neg: float = 1.05
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = None
    kl_value_cap: Optional[float] = None
    kl_agg: Optional[str] = None
    entropy_coef: float = 0.0
    entropy_mode: str = "exact"
    entropy_agg: Optional[str] = None
    loss_agg: str = "token-mean"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        _check_nonneg("clip_eps_low", self.clip_eps_low)
        _check_nonneg("clip_eps_high", self.clip_eps_high)
        # Options that None turns off must be finite (inf would only spell None another way).
        if self.delta is not None:
            check_real("delta", self.delta, "a ratio cap > 1", lambda x: x > 1.0)
        if self.dual_clip is not None:
            check_real("dual_clip", self.dual_clip, "a constant > 1", lambda x: x > 1.0)
        for name in ("sapo_temp_pos", "sapo_temp_neg"):
            check_real(name, getattr(self, name), "a number > 0", lambda x: x > 0)
        # The KL term is a penalty: a negative weight would reward moving away from the reference.
        check_real("kl_coef", self.kl_coef, "a number >= 0", lambda x: x >= 0)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_clamp is not None:
            check_real("kl_clamp", self.kl_clamp, "a number > 0", lambda x: x > 0)
        if self.kl_value_cap is not None:
            check_real("kl_value_cap", self.kl_value_cap, "None or a number > 0", lambda x: x > 0)
        if self.kl_agg is not None:
            object.__setattr__(self, "kl_agg", canonical_loss_agg(self.kl_agg, "kl_agg"))
        # Any sign: a negative entropy_coef penalises entropy instead of rewarding it.
        check_real("entropy_coef", self.entropy_coef, "a number")
        _check_choice("entropy_mode", self.entropy_mode, ENTROPY_MODES)
        object.__setattr__(self, "loss_agg", canonical_loss_agg(self.loss_agg))
        if self.entropy_agg is not None:
            object.__setattr__(self, "entropy_agg", canonical_loss_agg(self.entropy_agg, "entropy_agg"))
        check_temperature(self.temperature)

    @property
    def resolved_entropy_agg(self) -> str:
        return self.entropy_agg if self.entropy_agg is not None else self.loss_agg

    @property
    def resolved_kl_agg(self) -> str:
        return self.kl_agg if self.kl_agg is not None else self.loss_agg

    def with_overrides(self, **overrides: Any) -> PolicyLossConfig:
        return replace(self, **_known_fields(type(self), overrides))


# Field names per config class, filled once the classes exist (end of module): a plain dict lookup,
# which torch.compile traces, where dataclasses.fields on a class is not supported.
_FIELD_NAMES: dict = {}


def _field_names(cls: type) -> frozenset:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return names


def _known_fields(cls: type, overrides: dict) -> dict:
    names = _field_names(cls)
    unknown = sorted(key for key in overrides if key not in names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; {cls.__name__} fields are {sorted(names)}")
    return overrides


def resolve_config(cls: type, config: Any, overrides: dict) -> Any:
    """``config`` (an instance or None) updated with keyword ``overrides``."""
    if config is None:
        return cls(**_known_fields(cls, overrides))
    if not isinstance(config, cls):
        raise TypeError(f"config: expected {cls.__name__} or None, got {type(config).__name__}")
    return config.with_overrides(**overrides) if overrides else config


# ---------------------------------------------------------------------------------------------
# Tensor checks shared by every op family.


def check_backend(backend: str) -> None:
    _check_choice("backend", backend, BACKENDS)


def check_float_tensor(name: str, tensor: Any, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")


def check_shape(name: str, tensor: Optional[torch.Tensor], shape: Sequence[int], what: str) -> None:
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {tuple(shape)}, got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({what}), got {tuple(tensor.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, tensor in others.items():
        if isinstance(tensor, torch.Tensor) and tensor.device != reference.device:
            raise ValueError(
                f"{name}: expected a tensor on {reference.device} like {reference_name}, got {tensor.device}"
            )


def check_targets(targets: Any, leading: Sequence[int], vocab: int, ignore_index: int, like_name: str,
                  like: torch.Tensor) -> None:
    """int64 ``targets`` of shape ``leading`` (that of ``like_name`` without its last dimension) on the
    device of ``like``, in [0, vocab) or ignore_index. The range check reads values on the host: it runs
    only on CPU tensors (on an accelerator it would sync the host) and never while torch.compile traces."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected an int64 torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets: expected dtype torch.int64, got {targets.dtype}")
    check_shape("targets", targets, leading, f"the leading shape of {like_name}")
    check_same_device(like_name, like, targets=targets)
    if targets.device.type == "cpu" and targets.numel() > 0 and not torch.compiler.is_compiling():
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            raise ValueError(f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                             f"got {int(targets[bad][0])}")


def check_logits_targets(logits: Any, targets: Any, ignore_index: int = -100) -> None:
    """logits ``[N, V]`` or ``[B, T, V]`` float; targets int64 of the leading shape, in [0, V) or ignore_index."""
    check_float_tensor("logits", logits, FLOAT_DTYPES)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape [N, V] or [B, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits: expected a vocabulary dimension >= 1, got {tuple(logits.shape)}")
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, "logits", logits)


def check_linear_inputs(hidden: Any, weight: Any, bias: Any, targets: Any, ignore_index: int) -> None:
    """hidden ``[N, H]`` / ``[B, T, H]``, weight ``[V, H]``, bias ``[V]``, same float dtype and device;
    targets as ``check_targets`` with V the rows of weight."""
    check_float_tensor("hidden", hidden, FLOAT_DTYPES)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    check_float_tensor("weight", weight, (hidden.dtype,))
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (V >= 1, H of hidden), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, (hidden.dtype,))
        check_shape("bias", bias, (weight.shape[0],), "[V], the rows of weight")
    check_same_device("hidden", hidden, weight=weight, bias=bias)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, "hidden", hidden)


def as_float_mask(mask: Optional[torch.Tensor], shape: Sequence[int], like: torch.Tensor, name: str = "mask", *,
                  like_name: str = "logits", what: Optional[str] = None):
    """A bool / {0,1} mask of ``shape`` as float32 (None = all ones). Errors name ``like`` as ``like_name``
    and describe ``shape`` as ``what`` (default: "the leading shape of <like_name>")."""
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.float32, device=like.device)
    check_shape(name, mask, shape, what or f"the leading shape of {like_name}")
    check_same_device(like_name, like, **{name: mask})
    if mask.dtype == torch.bool:
        return mask.to(torch.float32)
    if mask.is_floating_point() or mask.dtype in (torch.int32, torch.int64, torch.uint8, torch.int8):
        return mask.to(torch.float32)
    raise TypeError(f"{name}: expected a bool or {{0,1}} numeric tensor, got {mask.dtype}")


def check_policy_inputs(like: torch.Tensor, old_logprobs, advantages, ref_logprobs, is_weights, normalizer,
                        cfg: PolicyLossConfig, *, leading: Optional[Sequence[int]] = None,
                        name: str = "logits") -> None:
    """The per-token inputs of every policy-loss entry point: float tensors of the token shape ``leading``
    ([B, T] or [N]; default: ``like``'s shape without its last dimension), advantages per token or
    ``[B]`` per sequence, all on the device of ``like`` (named ``name``)."""
    what = f"the leading shape of {name}" if leading is None else f"the shape of {name}"
    leading = tuple(like.shape[:-1]) if leading is None else tuple(leading)
    batch = leading[0] if len(leading) == 2 else None
    for arg, tensor in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("is_weights", is_weights)):
        if tensor is not None:
            check_float_tensor(arg, tensor)
            check_shape(arg, tensor, leading, what)
    check_float_tensor("advantages", advantages)
    if tuple(advantages.shape) != leading and (batch is None or tuple(advantages.shape) != (batch,)):
        expected = f"{leading} per token" + (f" or ({batch},) per sequence" if batch is not None else "")
        raise ValueError(f"advantages: expected shape {expected}, got {tuple(advantages.shape)}")
    check_same_device(
        name, like, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs,
        is_weights=is_weights, normalizer=normalizer if isinstance(normalizer, torch.Tensor) else None,
    )
    if cfg.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (kl_coef={cfg.kl_coef}), got None")
    check_normalizer(normalizer)


DPO_LOSS_TYPES = tuple(DPO_LOSSES)  # the registry's keys (losses/dpo_types.py)
F_DIVERGENCES = tuple(F_DIVERGENCE_SCORES)  # the registry's keys (losses/dpo_types.py)


@dataclass(frozen=True)
class DPOConfig:
    """Options of the DPO family (docs/design.md, "The loss math"); see ``fastrl_kernels.reference.dpo``.

    ``loss_type`` is one name of ``DPO_LOSS_TYPES`` or a sequence of them (a mixture, TRL's list
    ``loss_type`` with ``loss_weights``; None = weight 1 each), stored as a str or a tuple.
    ``ld_alpha``, ``use_weighting`` and ``average_logps`` shape the sequence log-probs and therefore
    act in ``fused_dpo_loss`` only.
    """

    beta: float = 0.1
    loss_type: Union[str, tuple] = "sigmoid"
    loss_weights: Optional[tuple] = None
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    ld_alpha: Optional[float] = None
    use_weighting: bool = False
    average_logps: bool = False
    discopop_tau: float = 0.05

    def __post_init__(self) -> None:
        check_real("beta", self.beta, "a number > 0", lambda x: x > 0)
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not types:
            raise ValueError("loss_type: expected a name or a non-empty sequence of names, got []")
        for name in types:
            _check_choice("loss_type", name, DPO_LOSS_TYPES)
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", types)
        if self.loss_weights is not None:
            weights = tuple(self.loss_weights)
            for weight in weights:
                check_real("loss_weights", weight, "numbers >= 0", lambda x: x >= 0)
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(types):
                raise ValueError(
                    f"loss_weights: expected {len(types)} weight(s), one per loss_type, got {len(weights)}"
                )
            object.__setattr__(self, "loss_weights", weights)
        check_real("label_smoothing", self.label_smoothing, "a number in [0, 0.5)", lambda x: 0.0 <= x < 0.5)
        _check_choice("f_divergence", self.f_divergence, F_DIVERGENCES)
        check_real("f_alpha", self.f_alpha, "a number")
        if self.ld_alpha is not None:
            check_real("ld_alpha", self.ld_alpha, "None or a number in [0, 1]", lambda x: 0.0 <= x <= 1.0)
        check_real("discopop_tau", self.discopop_tau, "a number > 0", lambda x: x > 0)
        for name in ("use_weighting", "average_logps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    @property
    def loss_types(self) -> tuple:
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def resolved_loss_weights(self) -> tuple:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    def with_overrides(self, **overrides: Any) -> DPOConfig:
        return replace(self, **_known_fields(type(self), overrides))


for _config_class in (PolicyLossConfig, DPOConfig):
    _field_names(_config_class)
