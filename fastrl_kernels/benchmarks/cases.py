"""The format every benchmark case shares, and the registry of op families.

A *case* is one op variant at one shape, dtype and device (``policy_loss/fwd+bwd`` at N=4096,
V=32000, float32, cpu). It names the implementations it can compare ("naive" first: the baseline of
every ratio) and has one ``setup(case, impl) -> step`` function: it builds the inputs for that
implementation (seeded, so every implementation sees the same numbers) and returns a zero-argument
``step`` that runs one measured call. A step must leave nothing behind that grows across calls: it
drops its outputs and sets ``.grad`` back to None, so the memory it holds between calls is the inputs
only. ``setup`` raises ``Unavailable("why")`` when an implementation cannot run here; the suite prints
that line and goes on.

An *op family* (``OpFamily``) is what ``--ops`` selects: a name, a ``make_cases(shape, dtype, device)``
returning its cases for one shape, and its default shapes per device and mode. Families live in
``cases_logits.py`` (token_logprobs, policy_loss), ``cases_linear.py`` (linear_policy_loss, the
lm_head path) and ``cases_primitives.py`` (the backends' stats and grad), each exposing
``FAMILIES: list[OpFamily]``; ``families()`` lists them all. A new family is a module with its own
``FAMILIES`` added to ``families()``.

Implementation names the suite knows (others are allowed; ``setup`` alone decides if they run):
``naive`` (eager PyTorch), ``naive-compile`` (``torch.compile`` of naive), ``trl`` (TRL's
``selective_log_softmax`` + ``entropy_from_logits``), ``liger`` (Liger-Kernel), ``ours[BACKEND]`` and
``ours[BACKEND]+inplace`` (``inplace_grad=True``) for BACKEND in torch, native, triton.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

Step = Callable[[], Any]

NAIVE = "naive"
NAIVE_COMPILE = "naive-compile"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class Unavailable(Exception):
    """An implementation cannot run here; the message says why (printed as one skip line)."""


@dataclass(frozen=True)
class BenchCase:
    """One op variant at one shape, dtype and device.

    Attributes:
        name: ``"<op>/<variant>"``, e.g. ``"policy_loss/fwd+bwd"``; stable across runs (results key).
        op: the family name (the ``--ops`` selector and the plot the case lands in).
        shape: sizes by letter: ``N`` tokens, ``V`` vocabulary and, on the lm_head path, ``H`` hidden.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (the logits' or hidden states' dtype).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"`` accepted).
        impls: implementation names to try, ``"naive"`` first.
        setup: ``setup(case, impl) -> step``; builds inputs, raises ``Unavailable`` when impl can't run.
        traffic_bytes: bytes of logits read + written by one step (GB/s = traffic / time); 0 = none.
        grad_bytes: bytes of the input gradient one step must produce (drawn as a reference line).
        params: fixed settings of the case (temperature, loss options), recorded with the results.
    """

    name: str
    op: str
    shape: Mapping[str, int]
    dtype: str
    device: str
    impls: tuple[str, ...]
    setup: Callable[[BenchCase, str], Step]
    traffic_bytes: int = 0
    grad_bytes: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


CaseFactory = Callable[[Mapping[str, int], str, str], "list[BenchCase]"]
ShapeDefaults = Callable[[str, bool], "list[dict[str, int]]"]


@dataclass(frozen=True)
class OpFamily:
    """What ``--ops NAME`` selects: the cases of one op at any shape, and its default shapes.

    ``default_shapes(device_type, quick)`` lists shape dicts for ``"cpu"`` / ``"cuda"``; in quick mode
    it should stay within a minute or so on 2 CPU cores. ``shape_keys`` orders the letters of
    ``--shapes`` strings (``"4096x32000"`` -> N=4096, V=32000; ``"NxVxH"`` for the lm_head path).
    """

    op: str
    make_cases: CaseFactory
    default_shapes: ShapeDefaults
    shape_keys: tuple[str, ...] = ("N", "V")


def families() -> dict[str, OpFamily]:
    """All op families by name, in a stable order (the logits path, the lm_head path, the primitives)."""
    from . import cases_linear, cases_logits, cases_primitives

    modules = (cases_logits, cases_linear, cases_primitives)
    return {family.op: family for module in modules for family in module.FAMILIES}


def canonical_dtype(name: str) -> str:
    """``"fp32"`` / ``"float32"`` / ``"torch.float32"`` -> ``"float32"``; raises on anything else."""
    short = name.replace("torch.", "")
    short = DTYPE_ALIASES.get(short, short)
    if short not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return short


def parse_shape(text: str, keys: tuple[str, ...] = ("N", "V")) -> dict[str, int]:
    """``"4096x32000"`` -> ``{"N": 4096, "V": 32000}`` (letters from ``keys``; "k" = 1024 allowed)."""
    parts = text.lower().split("x")
    if len(parts) != len(keys):
        raise ValueError(f"--shapes: expected {'x'.join(keys)} (e.g. 4096x32000), got {text!r}")
    values = []
    for part in parts:
        scale = 1024 if part.endswith("k") else 1
        digits = part[:-1] if scale != 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise ValueError(f"--shapes: {text!r} has {part!r}, not a positive integer")
        values.append(int(digits) * scale)
    return dict(zip(keys, values))


def shape_label(shape: Mapping[str, int]) -> str:
    return " ".join(f"{key}={value}" for key, value in shape.items())


def ours(backend: str, inplace: bool = False) -> str:
    """The implementation name of this package's op on ``backend``."""
    return f"ours[{backend}]" + ("+inplace" if inplace else "")


def parse_ours(impl: str) -> Optional[tuple[str, bool]]:
    """``"ours[native]+inplace"`` -> ``("native", True)``; None for other names."""
    if not impl.startswith("ours[") or "]" not in impl:
        return None
    backend, rest = impl[len("ours["):].split("]", 1)
    return backend, rest == "+inplace"


def ours_backends(device: str) -> tuple[str, ...]:
    """The backends worth comparing on a device type (availability is checked when the suite runs)."""
    return ("triton", "torch") if torch.device(device).type == "cuda" else ("torch", "native")


def seeded_generator(device: str, seed: int = 0) -> torch.Generator:
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator
