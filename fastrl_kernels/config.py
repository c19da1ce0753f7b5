"""Option dataclasses and input validation: the one place that raises on bad arguments.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

import torch

POLICY_LOSS_TYPES = ("clip", "gspo", "gspo_token", "cispo", "sapo")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "k3+")
ENTROPY_MODES = ("exact", "sampled")
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "sum",
)
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


def _check_nonneg(name: str, value: Optional[float]) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the PPO / GRPO family (SPEC section 4).

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
    entropy_coef: float = 0.0
    entropy_mode: str = "exact"
    entropy_agg: Optional[str] = None
    loss_agg: str = "token-mean"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("loss_type", self.loss_type, POLICY_LOSS_TYPES)
        _check_nonneg("clip_eps_low", self.clip_eps_low)
        _check_nonneg("clip_eps_high", self.clip_eps_high)
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(f"delta: expected a ratio cap > 1, got {self.delta!r}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip: expected a constant > 1, got {self.dual_clip!r}")
        for name in ("sapo_temp_pos", "sapo_temp_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)!r}")
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp: expected a number > 0, got {self.kl_clamp!r}")
        _check_choice("entropy_mode", self.entropy_mode, ENTROPY_MODES)
        object.__setattr__(self, "loss_agg", canonical_loss_agg(self.loss_agg))
        if self.entropy_agg is not None:
            object.__setattr__(self, "entropy_agg", canonical_loss_agg(self.entropy_agg, "entropy_agg"))
        check_temperature(self.temperature)

    @property
    def resolved_entropy_agg(self) -> str:
        return self.entropy_agg if self.entropy_agg is not None else self.loss_agg

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


def check_logits_targets(logits: Any, targets: Any, ignore_index: int = -100) -> None:
    """logits ``[N, V]`` or ``[B, T, V]`` float; targets int64 of the leading shape, in [0, V) or ignore_index.

    The range check runs only on CPU tensors (on CUDA it would sync the host).
    """
    check_float_tensor("logits", logits, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits: expected shape [N, V] or [B, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits: expected a vocabulary dimension >= 1, got {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected an int64 torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets: expected dtype torch.int64, got {targets.dtype}")
    check_shape("targets", targets, logits.shape[:-1], "the leading shape of logits")
    check_same_device("logits", logits, targets=targets)
    # The range check reads values on the host: skipped on CUDA (a sync) and while torch.compile traces.
    if targets.device.type == "cpu" and targets.numel() > 0 and not torch.compiler.is_compiling():
        vocab = logits.shape[-1]
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            value = int(targets[bad][0])
            raise ValueError(
                f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {value}"
            )


def as_float_mask(mask: Optional[torch.Tensor], shape: Sequence[int], like: torch.Tensor, name: str = "mask"):
    """A bool / {0,1} mask of ``shape`` as float32 (None = all ones)."""
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.float32, device=like.device)
    check_shape(name, mask, shape, "the leading shape of logits")
    check_same_device("logits", like, **{name: mask})
    if mask.dtype == torch.bool:
        return mask.to(torch.float32)
    if mask.is_floating_point() or mask.dtype in (torch.int32, torch.int64, torch.uint8, torch.int8):
        return mask.to(torch.float32)
    raise TypeError(f"{name}: expected a bool or {{0,1}} numeric tensor, got {mask.dtype}")


DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "aot",
    "aot_unpaired",
    "discopop",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class DPOConfig:
    """Options of the DPO family (SPEC section 4, DPO paragraph); see ``fastrl_kernels.reference.dpo``.

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
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta: expected a number > 0, got {self.beta!r}")
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        if not types:
            raise ValueError("loss_type: expected a name or a non-empty sequence of names, got []")
        for name in types:
            _check_choice("loss_type", name, DPO_LOSS_TYPES)
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", types)
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in self.loss_weights)
            if len(weights) != len(types):
                raise ValueError(
                    f"loss_weights: expected {len(types)} weight(s), one per loss_type, got {len(weights)}"
                )
            object.__setattr__(self, "loss_weights", weights)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing!r}")
        _check_choice("f_divergence", self.f_divergence, F_DIVERGENCES)
        if not (isinstance(self.f_alpha, (int, float)) and abs(self.f_alpha) < float("inf")):
            raise ValueError(f"f_alpha: expected a finite number, got {self.f_alpha!r}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha: expected None or a number in [0, 1], got {self.ld_alpha!r}")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau: expected a number > 0, got {self.discopop_tau!r}")

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
