"""Peers the suite compares against when they are importable: TRL and Liger-Kernel.

Each loader returns what the benchmark needs or raises ``Unavailable`` with the reason, which the
suite prints as one skip line (``pip install fastrl-kernels[bench]`` brings both). Nothing here is
imported by the package itself.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .cases import Unavailable


class TrlLogprobs(NamedTuple):
    selective_log_softmax: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    entropy_from_logits: Callable[[torch.Tensor], torch.Tensor]
    version: str


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as error:  # a peer's own broken dependency is a skip too, never a crash
        raise Unavailable(f"{what}: `import {module}` failed ({type(error).__name__}: {error})") from None


@functools.cache
def trl_logprobs() -> TrlLogprobs:
    """TRL's ``selective_log_softmax(logits, index)`` and ``entropy_from_logits(logits)``."""
    trl = _import("trl", "TRL")
    utils = _import("trl.trainer.utils", "TRL")
    missing = [name for name in ("selective_log_softmax", "entropy_from_logits") if not hasattr(utils, name)]
    if missing:
        raise Unavailable(f"TRL {trl.__version__}: trl.trainer.utils lacks {missing}")
    return TrlLogprobs(utils.selective_log_softmax, utils.entropy_from_logits, trl.__version__)


@functools.cache
def liger_grpo_loss() -> Callable[..., Any]:
    """Liger-Kernel's Triton GRPO loss on logits (``triton_grpo_loss``; CUDA only)."""
    if not torch.cuda.is_available():
        raise Unavailable("Liger-Kernel triton_grpo_loss: needs a CUDA device")
    module = _import("liger_kernel.transformers.grpo_loss", "Liger-Kernel")
    if not hasattr(module, "triton_grpo_loss"):
        raise Unavailable("Liger-Kernel: liger_kernel.transformers.grpo_loss has no triton_grpo_loss")
    return module.triton_grpo_loss


def peer_versions() -> dict[str, str]:
    """Installed peer versions (without importing them), for the results' metadata."""
    from importlib import metadata

    found = {}
    for distribution in ("trl", "liger-kernel", "transformers"):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return found
