"""Which backends the tests run: the entries of the registry (``backends.PRIMITIVE_BACKENDS``);
"reference" is the oracle. A backend added to the registry joins every test that reads these lists."""

import pytest
import torch

from fastrl_kernels.backends import PRIMITIVE_BACKENDS, available_backends


def cpu_backends() -> list:
    """The registry's backends built for CPU tensors, available here or not (a test may skip them)."""
    return [name for name, spec in PRIMITIVE_BACKENDS.items() if spec.devices is None or "cpu" in spec.devices]


def cpu_fused_backends(interpreted: bool = False) -> list:
    """The registry's backends that run on CPU tensors in this process, in registry order; those built
    for another device (Triton, under its interpreter) only when ``interpreted``: op tests keep the
    interpreter to small shapes."""
    available = available_backends("cpu")
    candidates = list(PRIMITIVE_BACKENDS) if interpreted else cpu_backends()
    return [name for name in candidates if name in available]


# The pytest markers (pyproject.toml) of the backends that have one: `-m "not triton"` leaves Triton out.
MARKS = {"native": pytest.mark.native, "triton": pytest.mark.triton}


def device_of(name: str) -> str:
    """The device type a backend's tests run on: CPU where it runs on CPU tensors, else its first device
    type this machine has, else CPU (Triton under its interpreter, tests/conftest.py)."""
    devices = PRIMITIVE_BACKENDS[name].devices
    if devices is None or "cpu" in devices:
        return "cpu"
    for device in devices:
        if getattr(getattr(torch, device, None), "is_available", lambda: False)():
            return device
    return "cpu"


def every_backend() -> list:
    """pytest parameters: each registry backend that runs here (on ``device_of``), with its marker."""
    return [pytest.param(name, marks=MARKS.get(name, ()), id=name) for name, spec in PRIMITIVE_BACKENDS.items()
            if spec.usable(torch.device(device_of(name)))]
