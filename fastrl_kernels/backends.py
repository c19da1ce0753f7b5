"""Backend dispatch, in one place: which module computes the two primitives for a tensor.

``PRIMITIVE_BACKENDS`` is the registry: one ``BackendSpec`` per backend of the primitives, in the
order of ``config.BACKENDS``. Dispatch, ``available_backends``, the trainer's checks and the tests
read it; adding a backend is an entry here and its module.

"auto": CUDA tensor -> "triton"; CPU tensor -> "native" when the C++ extension builds, else "torch"
(with one warning). "reference" is not a primitives backend: ops route it to the unfused float64 math.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, cast

import torch

from .config import check_backend
from .core import Primitives


@dataclass(frozen=True)
class BackendSpec:
    """One backend of the primitives.

    ``devices``: the device types it is built for (None: any device torch runs on); ``load()``: the
    module whose ``stats`` and ``grad`` are the primitives (``core.Primitives``); ``usable(device)``:
    whether it runs on that device in this process (never raises); ``require(device)``: raises
    RuntimeError saying why it cannot run there, else returns; ``note``: what it is, in a few words.
    """

    name: str
    devices: Optional[tuple[str, ...]]
    load: Callable[[], ModuleType]
    usable: Callable[[torch.device], bool]
    require: Callable[[torch.device], None]
    note: str


def _torch_module() -> ModuleType:
    return importlib.import_module("fastrl_kernels.torch_backend")


def _native_module() -> ModuleType:
    return importlib.import_module("fastrl_kernels.native")


def _triton_module() -> ModuleType:
    return importlib.import_module("fastrl_kernels.triton")


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_require(device: torch.device) -> None:
    if not _triton_usable(device):
        raise RuntimeError(
            f"backend='triton': needs a CUDA tensor and the triton package (or TRITON_INTERPRET=1 set "
            f"before triton is imported, to run the kernels on CPU); got a tensor on {device}"
        )


def _native_usable(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    try:
        return bool(_native_module().is_available())
    except ImportError:
        return False


def _native_require(device: torch.device) -> None:
    if device.type != "cpu":
        raise RuntimeError(f"backend='native': runs on CPU tensors only; got a tensor on {device}")
    try:
        _native_module().load()
    except ImportError as error:
        raise RuntimeError(f"backend='native': the native module is unavailable ({error})") from error


def _anywhere(device: torch.device) -> bool:
    return True


def _no_requirement(device: torch.device) -> None:
    return None


PRIMITIVE_BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec("torch", None, _torch_module, _anywhere, _no_requirement,
                    "chunked PyTorch, on any device"),
        BackendSpec("native", ("cpu",), _native_module, _native_usable, _native_require,
                    "the C++ kernels run on the CPU"),
        BackendSpec("triton", ("cuda",), _triton_module, _triton_usable, _triton_require,
                    "Triton kernels run on the GPU"),
    )
}
_warned_native_fallback = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` on ``device``; raises when it cannot run there."""
    check_backend(backend)
    return _resolve(backend, device.type)


def _resolve(backend: str, device_type: str) -> str:
    device = torch.device(device_type)
    if backend == "auto":
        return _auto(device)
    spec = PRIMITIVE_BACKENDS.get(backend)
    if spec is not None:
        spec.require(device)
    return backend


def _auto(device: torch.device) -> str:
    """CUDA: triton, else torch; CPU: native, else torch with one warning; other devices: torch."""
    global _warned_native_fallback
    if device.type == "cuda":
        return "triton" if PRIMITIVE_BACKENDS["triton"].usable(device) else "torch"
    if device.type == "cpu" and PRIMITIVE_BACKENDS["native"].usable(device):
        return "native"
    if device.type == "cpu" and not _warned_native_fallback:
        _warned_native_fallback = True
        warnings.warn(
            "fastrl_kernels: the native C++ CPU backend could not be built; using the chunked torch "
            "backend (run `python -m fastrl_kernels.native build` to see why)",
            RuntimeWarning,
            stacklevel=4,
        )
    return "torch"


# torch.compile evaluates _resolve once while tracing and keeps the name as a constant: the answer
# depends on the installation (a build, an import), never on tensor values. This is the mark that
# torch.compiler.assume_constant_result sets; the decorator itself would import Dynamo, and with it
# triton, at `import fastrl_kernels` (tests/test_compile.py fails if the mark stops working).
_resolve._dynamo_marked_constant = True

_MODULES: dict = {}


def primitives(backend: str) -> Primitives:
    """The module with ``stats`` and ``grad`` for a concrete backend name."""
    module = _MODULES.get(backend)
    if module is None:
        module = _MODULES[backend] = _import_primitives(backend)
    return module


def _import_primitives(backend: str) -> Primitives:
    spec = PRIMITIVE_BACKENDS.get(backend)
    if spec is None:
        raise ValueError(f"backend: expected one of {tuple(PRIMITIVE_BACKENDS)} here, got {backend!r}")
    module = spec.load()
    missing = [name for name in ("stats", "grad") if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(f"backend {backend!r}: module {module.__name__} does not provide the primitives "
                        f"{' and '.join(missing)} (core.Primitives)")
    return cast(Primitives, module)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process (building the native one if needed).

    "torch" (it runs everywhere), "reference", then the other usable backends in registry order.
    """
    device = torch.device(device)
    usable = [name for name, spec in PRIMITIVE_BACKENDS.items() if spec.usable(device)]
    return [usable[0], "reference", *usable[1:]]
