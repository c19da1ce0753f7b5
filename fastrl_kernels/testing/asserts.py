"""Tolerances by dtype and a comparison helper that names what it compares (docs/testing.md).

Gradients of a loss are tiny where they should be (about p_j / N per element), so an absolute
tolerance hides whole wrong terms: with ``atol=1e-5`` a 2x error passes on most elements of a float32
gradient. Gradients are therefore compared against the size of what is compared: every element may
be off by ``rtol`` of itself, plus ``row_atol`` of the largest element of its row (the last dimension),
plus ``tensor_atol`` of the largest element of the whole tensor, plus ``atol`` (a floor that only the
float16 subnormal range needs). A sign error or a 2x error on any term worth more than ``row_atol``
of its row fails.

Forward values (log-probs, entropies, losses, metrics) are O(1) numbers and keep a per-element
``rtol`` with an absolute ``atol``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

_FULL_PRECISION = (torch.float32, torch.float64)
_HALF_PRECISION = (torch.bfloat16, torch.float16)

# vs the float64 reference evaluated on the same (already rounded) inputs.
_TOLERANCES = {
    ("full", "forward"): {"rtol": 1e-5, "atol": 1e-6},
    ("full", "grad"): {"rtol": 1e-4, "row_atol": 1e-5, "tensor_atol": 1e-6, "atol": 0.0},
    ("half", "forward"): {"rtol": 1e-3, "atol": 1e-3},
    # A half-precision gradient is rounded to 8 (bf16) or 11 (fp16) bits when stored: 2^-8 = 4e-3.
    ("half", "grad"): {"rtol": 2e-2, "row_atol": 4e-3, "tensor_atol": 1e-4, "atol": 0.0},
}
# float16 stores nothing below its smallest subnormal (2^-24); a gradient element there reads as 0.
_FLOAT16_GRAD_FLOOR = 2.0**-24


def tolerances(dtype: torch.dtype, kind: str = "forward") -> dict[str, float]:
    """The tolerances for results computed from inputs of ``dtype``.

    kind "forward" (values: logprobs, entropy, losses, metrics): ``{"rtol", "atol"}``; float32 and
    float64 inputs rtol 1e-5 / atol 1e-6, bfloat16 / float16 inputs rtol 1e-3 / atol 1e-3.
    kind "grad": ``{"rtol", "row_atol", "tensor_atol", "atol"}``, the last three relative to the largest
    magnitude of the row / the tensor / absolute: float32 and float64 1e-4, 1e-5, 1e-6, 0; bfloat16 and
    float16 2e-2, 4e-3, 1e-4, 0 (float16: atol 2^-24, its subnormal step).
    """
    if dtype in _FULL_PRECISION:
        precision = "full"
    elif dtype in _HALF_PRECISION:
        precision = "half"
    else:
        raise ValueError(f"dtype: expected one of float32, float64, bfloat16, float16, got {dtype}")
    if kind not in ("forward", "grad"):
        raise ValueError(f"kind: expected 'forward' or 'grad', got {kind!r}")
    tol = dict(_TOLERANCES[(precision, kind)])
    if kind == "grad" and dtype == torch.float16:
        tol["atol"] = _FLOAT16_GRAD_FLOOR
    return tol


def _allowed_error(expected: torch.Tensor, tol: dict[str, float], row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-element bound ``rtol |e| + row_atol s_row + tensor_atol max|e| + atol``, s_row the larger of
    the row's largest |e| and ``row_scale``."""
    magnitude = expected.abs()
    bound = tol["rtol"] * magnitude + tol["atol"]
    if magnitude.numel() == 0 or "row_atol" not in tol:
        return bound
    row = magnitude.amax(dim=-1, keepdim=True) if magnitude.dim() >= 1 else magnitude
    if row_scale is not None:
        row = torch.maximum(row, row_scale.detach().to(device="cpu", dtype=torch.float64).abs().reshape(row.shape))
    return bound + tol["row_atol"] * row + tol["tensor_atol"] * magnitude.max()


def assert_close_to_reference(
    actual: Any,
    expected: Any,
    *,
    dtype: torch.dtype,
    kind: str = "forward",
    name: str = "",
    row_scale: Optional[torch.Tensor] = None,
) -> None:
    """Assert ``actual`` (a backend's result) matches ``expected`` (the float64 reference).

    Both are compared in float64 on CPU with ``tolerances(dtype, kind)``, where ``dtype`` is the dtype
    of the inputs the backend saw; for kind "grad" the bound scales with the largest magnitude of each
    row and of the tensor (module docstring). ``row_scale`` (shape of ``expected`` without its last
    dimension) raises a row's scale to the size of the terms that cancel in it: for a gradient wrt
    logits, |dL/dlogp| + |dL/dH| of the row (``coefficient_scale``). Without it, a row whose gradient
    is small by cancellation (1 - p_y with p_y ~ 1) is held to a precision float32 cannot give.
    Shapes must match; NaN matches only NaN at the same place and infinities only the same infinity.
    The failure message starts with ``name`` and gives the worst element.
    """
    tol = tolerances(dtype, kind)
    a = torch.as_tensor(actual).detach().to(device="cpu", dtype=torch.float64)
    e = torch.as_tensor(expected).detach().to(device="cpu", dtype=torch.float64)
    label = name or "value"
    where = f"{label} ({kind}, inputs {dtype}, " + ", ".join(f"{k}={v:g}" for k, v in tol.items()) + ")"
    if a.shape != e.shape:
        raise AssertionError(f"{where}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        index = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{where}: NaN mismatch at {index}: got {a[tuple(index)]}, expected {e[tuple(index)]}")
    inf_e = e.isinf()
    inf_mismatch = (a.isinf() | inf_e) & (a != e)
    if bool(inf_mismatch.any()):
        index = inf_mismatch.nonzero()[0].tolist()
        raise AssertionError(f"{where}: inf mismatch at {index}: got {a[tuple(index)]}, expected {e[tuple(index)]}")
    finite = ~(nan_e | inf_e)
    error = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = _allowed_error(torch.where(finite, e, torch.zeros_like(e)), tol, row_scale)
    excess = error - bound
    if excess.numel() and bool((excess > 0).any()):
        failing = int((excess > 0).sum())
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(excess / bound.clamp_min(1e-300)), e.shape))
        raise AssertionError(
            f"{where}: {failing} of {e.numel()} elements out of tolerance; worst at {list(worst)}: "
            f"got {a[worst].item():.9g}, expected {e[worst].item():.9g}, |error| {error[worst].item():.3g} > "
            f"allowed {bound[worst].item():.3g}"
        )



def coefficient_scale(loss: torch.Tensor, logprobs: torch.Tensor, entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """|dL/dlogp| + |dL/dH| per token, from a reference graph in which ``loss`` was computed from
    ``logprobs`` and ``entropy`` (non-leaf tensors): the ``row_scale`` of a gradient wrt logits.

    The logits gradient of row i is g_lp (1[j=y] - p_j) - g_H p_j (x_j - E): its terms are of size
    |g_lp| and |g_H|, whatever the row's largest element after cancellation. When g_lp is itself a sum
    of terms that cancel (a policy term, a KL term, an entropy bonus), add the scales of the terms
    computed one at a time (``sum_of_scales``): float32 algebra is exact only to ~1e-7 of each term."""
    inputs = [t for t in (logprobs, entropy) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True) if inputs else []
    scale = torch.zeros_like(logprobs, dtype=torch.float64)
    for g in grads:
        if g is not None:
            scale = scale + g.detach().to(torch.float64).abs()
    return scale
