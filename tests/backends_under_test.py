"""Which backends the tests run: the entries of the registry (``backends.PRIMITIVE_BACKENDS``);
"reference" is the oracle. A backend added to the registry joins every test that reads these lists."""

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
