"""Helpers for checking any backend against ``fastrl_kernels.reference``.

``tolerances`` and ``assert_close_to_reference`` are always available; the hypothesis strategies in
``fastrl_kernels.testing.strategies`` (``core_inputs``, ``policy_inputs``, ``policy_configs``, ...)
need ``hypothesis`` and are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .asserts import assert_close_to_reference, coefficient_scale, tolerances

_STRATEGIES = (
    "core_inputs",
    "logit_kinds",
    "make_logits",
    "masks",
    "policy_configs",
    "policy_inputs",
    "seeds",
    "vocab_sizes",
)

__all__ = ["assert_close_to_reference", "coefficient_scale", "tolerances", "strategies", *_STRATEGIES]


def __getattr__(name: str) -> Any:
    if name == "strategies" or name in _STRATEGIES:
        module = importlib.import_module(f"{__name__}.strategies")
        return module if name == "strategies" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
