"""Which CPU backends the op tests run (the fused ones; "reference" is the oracle)."""

import fastrl_kernels as fk


def cpu_fused_backends() -> list:
    return [name for name in fk.available_backends("cpu") if name in ("torch", "native")]
