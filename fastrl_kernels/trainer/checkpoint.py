"""Reading a run's ``checkpoint.pt`` for ``--resume``, refusing anything that is not one of ours.

``torch.load(..., weights_only=True)`` only unpickles tensors and plain containers, so a file cannot run
code; what it holds is then checked against what ``Trainer.state_dict()`` writes (keys, types, the
config's fields, every weight's and optimizer moment's shape against the model the config builds).
Every problem becomes a ``CheckpointError`` whose one-line message names the file, so the CLI reports
it instead of failing later inside ``load_state_dict`` or in the middle of the first step.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import BACKENDS
from .algos import ALGOS, TrainConfig, model_config
from .kernels import KERNELS
from .model import TinyGPT
from .tasks import REWARDS, TASKS

CHECKPOINT = "checkpoint.pt"
# What Trainer.state_dict() writes: key -> accepted types ("rank_rng" only in data-parallel runs).
_REQUIRED = {
    "config": (dict,),
    "step": (int,),
    "model": (dict,),
    "ref": (dict,),
    "optimizer": (dict,),
    "torch_rng": (torch.Tensor,),
    "cuda_rng": (list, type(None)),
    "task_rng": (tuple,),
}
_CHOICES = {"algo": ALGOS, "task": TASKS, "reward": REWARDS, "kernel": KERNELS, "backend": BACKENDS,
            "device": ("cpu", "cuda")}
_MAX_LISTED = 3  # mismatching names shown in one message
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class CheckpointError(ValueError):
    """A ``--resume`` path that holds no usable checkpoint; the message names the file."""


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: Path) -> dict:
    """The checkpoint in ``path`` (a run directory or the file), its structure checked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume: {path}: no such file or directory, so no {CHECKPOINT} to resume from")
    file = checkpoint_file(path)
    if not file.exists():
        raise CheckpointError(f"--resume: no {CHECKPOINT} in {path}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"--resume: {file}: holds objects other than tensors and plain containers, or is corrupt "
            f"(read with weights_only=True, which runs no code from the file): {_one_line(exc)}"
        ) from None
    except Exception as exc:  # any other failure to parse means the file is unusable, whatever torch raised
        raise CheckpointError(
            f"--resume: {file}: not a readable torch checkpoint (empty, truncated or corrupt): {_one_line(exc)}"
        ) from None
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(f"--resume: {file}: not a fastrl-train checkpoint: {problem}")
    return state


def check_compatible(state: dict, cfg: TrainConfig, file: Path) -> None:
    """Raise ``CheckpointError`` unless ``state``'s weights and optimizer fit the model ``cfg`` builds."""
    mcfg = model_config(cfg)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in TinyGPT(mcfg).state_dict().items()}
        params = [tuple(p.shape) for p in TinyGPT(mcfg).parameters()]
    problem = (
        _weights_problem("model", state["model"], expected)
        or _weights_problem("ref", state["ref"], expected)
        or _optimizer_problem(state["optimizer"], params)
    )
    if problem:
        shape = f"d_model={cfg.d_model}, layers={cfg.layers}, heads={cfg.heads}, vocab={mcfg.vocab_size}"
        raise CheckpointError(f"--resume: {file}: does not match its own config ({cfg.algo}, {shape}): {problem}")


def _one_line(exc: BaseException) -> str:
    """The exception's type and its most specific line (torch wraps load errors in advice to the user
    of ``torch.load``, such as retrying with ``weights_only=False``, which does not apply here)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
    text = (specific or lines or [""])[0].split(" In PyTorch 2.6")[0]
    text = text.removeprefix("WeightsUnpickler error:").strip()[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _structure_problem(state: Any) -> Optional[str]:
    if not isinstance(state, dict):
        return f"expected a dict of {sorted(_REQUIRED)}, got {type(state).__name__}"
    missing = sorted(k for k in _REQUIRED if k not in state)
    if missing:
        return f"missing keys {missing}"
    for key, types in _REQUIRED.items():
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"{key}: expected {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}"
    if state["step"] < 0:
        return f"step: expected an integer >= 0, got {state['step']}"
    for key in ("model", "ref"):
        bad = [k for k, v in state[key].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            return f"{key}: expected a state dict of named tensors, got entries {bad[:_MAX_LISTED]}"
    return _config_problem(state["config"]) or _rng_problem(state)


def _config_problem(config: dict) -> Optional[str]:
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        return f"config: unknown fields {unknown[:_MAX_LISTED]}"
    if "algo" not in config:
        return "config: no 'algo'"
    for name, value in config.items():
        want = type(known[name].default)
        ok = isinstance(value, (int, float)) if want is float else isinstance(value, want)
        if not ok or (want is not bool and isinstance(value, bool)):
            return f"config.{name}: expected {want.__name__}, got {value!r}"
        if name in _CHOICES and value not in _CHOICES[name]:
            return f"config.{name}: expected one of {_CHOICES[name]}, got {value!r}"
    return None


def _rng_problem(state: dict) -> Optional[str]:
    reference = torch.get_rng_state()
    rng = state["torch_rng"]
    if rng.dtype != reference.dtype or rng.shape != reference.shape:
        want = f"a {reference.dtype} tensor of shape {list(reference.shape)}"
        return f"torch_rng: expected {want}, got {rng.dtype} {list(rng.shape)}"
    try:
        random.Random().setstate(state["task_rng"])
    except (TypeError, ValueError) as exc:
        return f"task_rng: not a random.Random state ({_one_line(exc)})"
    if state["cuda_rng"] is not None and not all(isinstance(t, torch.Tensor) for t in state["cuda_rng"]):
        return "cuda_rng: expected a list of tensors"
    return None


def _weights_problem(key: str, weights: dict, expected: dict) -> Optional[str]:
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        return f"{key}: missing weights {missing[:_MAX_LISTED]}, unexpected weights {unexpected[:_MAX_LISTED]}"
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            return f"{key}.{name}: expected shape {list(shape)}, got {list(weights[name].shape)}"
        if not weights[name].is_floating_point():
            return f"{key}.{name}: expected floating-point weights, got {weights[name].dtype}"
    return None


def _optimizer_problem(opt: dict, params: list) -> Optional[str]:
    groups, per_param = opt.get("param_groups"), opt.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        return "optimizer: expected 'state' and 'param_groups' (an AdamW state dict)"
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", ())]
    if len(groups) != 1 or ids != list(range(len(params))):
        return f"optimizer: expected one parameter group of {len(params)} parameters, got {len(ids)} in {len(groups)}"
    for i, entry in per_param.items():
        if i not in range(len(params)) or not isinstance(entry, dict):
            return f"optimizer: state for unknown parameter {i!r}"
        for moment in ("exp_avg", "exp_avg_sq"):
            t = entry.get(moment)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != params[i]:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return f"optimizer: parameter {i} {moment}: expected shape {list(params[i])}, got {got}"
    return None
