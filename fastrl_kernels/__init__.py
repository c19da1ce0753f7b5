"""fastrl_kernels: fused, memory-lean loss kernels for RL fine-tuning of language models.

Public API (docs/design.md, "Public API"). Imports are lazy: ``import fastrl_kernels`` loads no kernel backend,
touches no CUDA state and compiles nothing. It does check torch's version (``versions.py``): a torch
outside the admitted range fails here, with one message, rather than inside the first op.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch as _torch

from .versions import check_torch as _check_torch

__version__ = "0.1.0"
_check_torch(_torch.__version__)

_EXPORTS = {
    "PolicyLossConfig": "fastrl_kernels.config",
    "DPOConfig": "fastrl_kernels.config",
    "token_logprobs": "fastrl_kernels.ops.logprobs",
    "policy_loss": "fastrl_kernels.ops.policy_loss",
    "PolicyLossOutput": "fastrl_kernels.ops.policy_loss",
    "policy_loss_from_logprobs": "fastrl_kernels.ops.policy_loss",
    "dpo_loss": "fastrl_kernels.ops.dpo_loss",
    "fused_dpo_loss": "fastrl_kernels.ops.dpo_loss",
    "DPOOutput": "fastrl_kernels.ops.dpo_loss",
    "linear_token_logprobs": "fastrl_kernels.ops.linear",
    "linear_policy_loss": "fastrl_kernels.ops.linear",
    "linear_dpo_loss": "fastrl_kernels.ops.linear",
    "gae": "fastrl_kernels.ops.advantages",
    "group_advantages": "fastrl_kernels.ops.advantages",
    "value_loss": "fastrl_kernels.ops.advantages",
    "outcome_advantages": "fastrl_kernels.ops.outcome_advantages",
    "available_backends": "fastrl_kernels.backends",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrl_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__
