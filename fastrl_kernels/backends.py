"""Backend dispatch, in one place: which module computes the two primitives for a tensor.

"auto": CUDA tensor -> "triton"; CPU tensor -> "native" when the C++ extension builds, else "torch"
(with one warning). "reference" is not a primitives backend: ops route it to the unfused float64 math.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

from .config import check_backend

_PRIMITIVE_BACKENDS = ("torch", "native", "triton")
_warned_native_fallback = False


def _native_module() -> ModuleType:
    return importlib.import_module("fastrl_kernels.native")


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _native_usable() -> bool:
    try:
        return bool(_native_module().is_available())
    except ImportError:
        return False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``; raises when it cannot run there."""
    check_backend(backend)
    return _resolve(backend, device.type)


def _resolve(backend: str, device_type: str) -> str:
    global _warned_native_fallback
    device = torch.device(device_type)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if _triton_usable(device) else "torch"
        if device.type == "cpu" and _native_usable():
            return "native"
        if device.type == "cpu" and not _warned_native_fallback:
            _warned_native_fallback = True
            warnings.warn(
                "fastrl_kernels: the native C++ CPU backend could not be built; using the chunked torch "
                "backend (run `python -m fastrl_kernels.native build` to see why)",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if backend == "triton" and not _triton_usable(device):
        raise RuntimeError(
            f"backend='triton': needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 set "
            f"before triton is imported, to run the kernels on CPU); got a tensor on {device}"
        )
    if backend == "native":
        if device.type != "cpu":
            raise RuntimeError(f"backend='native': runs on CPU tensors only; got a tensor on {device}")
        try:
            _native_module().load()
        except ImportError as error:
            raise RuntimeError(f"backend='native': the native module is unavailable ({error})") from error
    return backend


# torch.compile evaluates _resolve once while tracing and keeps the name as a constant: the answer
# depends on the installation (a build, an import), never on tensor values. This is the mark that
# torch.compiler.assume_constant_result sets; the decorator itself would import Dynamo, and with it
# triton, at `import fastrl_kernels` (tests/test_compile.py fails if the mark stops working).
_resolve._dynamo_marked_constant = True

_MODULES: dict = {}


def primitives(backend: str) -> ModuleType:
    """The module with ``stats`` and ``grad`` for a concrete backend name."""
    module = _MODULES.get(backend)
    if module is None:
        module = _MODULES[backend] = _import_primitives(backend)
    return module


def _import_primitives(backend: str) -> ModuleType:
    if backend not in _PRIMITIVE_BACKENDS:
        raise ValueError(f"backend: expected one of {_PRIMITIVE_BACKENDS} here, got {backend!r}")
    if backend == "torch":
        return importlib.import_module("fastrl_kernels.torch_backend")
    if backend == "native":
        return _native_module()
    return importlib.import_module("fastrl_kernels.triton")


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process (building the native one if needed)."""
    device = torch.device(device)
    names = ["torch", "reference"]
    if device.type == "cpu" and _native_usable():
        names.append("native")
    if _triton_usable(device):
        names.append("triton")
    return names
