"""Tolerances of SPEC section 6 and a comparison helper that names what it compares."""

from __future__ import annotations

from typing import Any

import torch

_FULL_PRECISION = (torch.float32, torch.float64)
_HALF_PRECISION = (torch.bfloat16, torch.float16)

# SPEC section 6: vs the float64 reference evaluated on the same (already rounded) inputs.
_TOLERANCES = {
    ("full", "forward"): {"rtol": 1e-5, "atol": 1e-6},
    ("full", "grad"): {"rtol": 1e-4, "atol": 1e-5},
    ("half", "forward"): {"rtol": 1e-3, "atol": 1e-3},
    ("half", "grad"): {"rtol": 2e-2, "atol": 1e-3},
}


def tolerances(dtype: torch.dtype, kind: str = "forward") -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for results computed from inputs of ``dtype``.

    kind "forward" (values: logprobs, entropy, losses, metrics) or "grad". float32 and float64 inputs:
    rtol 1e-5 / atol 1e-6 forward, rtol 1e-4 / atol 1e-5 grads; bfloat16 / float16 inputs: rtol 1e-3
    / atol 1e-3 forward, rtol 2e-2 / atol 1e-3 grads.
    """
    if dtype in _FULL_PRECISION:
        precision = "full"
    elif dtype in _HALF_PRECISION:
        precision = "half"
    else:
        raise ValueError(f"dtype: expected one of float32, float64, bfloat16, float16, got {dtype}")
    if kind not in ("forward", "grad"):
        raise ValueError(f"kind: expected 'forward' or 'grad', got {kind!r}")
    return dict(_TOLERANCES[(precision, kind)])


def assert_close_to_reference(
    actual: Any,
    expected: Any,
    *,
    dtype: torch.dtype,
    kind: str = "forward",
    name: str = "",
) -> None:
    """Assert ``actual`` (a backend's result) matches ``expected`` (the float64 reference).

    Both are compared in float64 on CPU with ``tolerances(dtype, kind)``, where ``dtype`` is the dtype
    of the inputs the backend saw; shapes must match; NaN never matches. The failure message starts
    with ``name``.
    """
    tol = tolerances(dtype, kind)
    a = torch.as_tensor(actual).detach().to(device="cpu", dtype=torch.float64)
    e = torch.as_tensor(expected).detach().to(device="cpu", dtype=torch.float64)
    label = name or "value"

    def message(default: str) -> str:
        return f"{label} ({kind}, inputs {dtype}, rtol={tol['rtol']}, atol={tol['atol']}): {default}"

    torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"], equal_nan=False, msg=message)
