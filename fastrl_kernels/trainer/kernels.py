"""The trainer's loss calls: the package's fused ops (``--kernel fused``) or ``naive`` plain PyTorch.

Both sides take the same arguments, so a run with either kernel follows the same code path and the
same random draws; only the loss computation (and its memory) differs.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..benchmarks.measure import StepMemory
from ..config import PolicyLossConfig
from . import naive

KERNELS = ("fused", "naive")


def package_api():
    """``fastrl_kernels`` itself, checked for the ops the trainer calls (imported lazily)."""
    fk = importlib.import_module("fastrl_kernels")
    missing = [
        n
        for n in ("token_logprobs", "policy_loss", "group_advantages", "gae", "value_loss", "fused_dpo_loss")
        if not hasattr(fk, n)
    ]
    if missing:
        raise RuntimeError(f"--kernel fused needs fastrl_kernels.{missing} (not available in this install)")
    return fk


class LossKernels:
    """``kind="fused"`` calls ``fk.<op>(..., backend=backend)``; ``kind="naive"`` calls ``trainer.naive``."""

    def __init__(self, kind: str = "fused", backend: str = "auto"):
        if kind not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kind!r}")
        self.kind = kind
        self.backend = backend
        self.fk = package_api() if kind == "fused" else None

    def backend_name(self, device: torch.device) -> str:
        """The concrete backend the fused ops use on ``device`` ("naive" for the plain PyTorch kernel)."""
        if self.fk is None:
            return "naive"
        from ..backends import resolve_backend

        return resolve_backend(self.backend, torch.device(device))

    def token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0):
        if self.fk is None:
            return naive.token_logprobs(logits, targets, temperature)
        return self.fk.token_logprobs(logits, targets, temperature=temperature, backend=self.backend)

    def policy_loss(
        self, logits, targets, old_logprobs, advantages, mask, *, ref_logprobs, config: PolicyLossConfig,
        normalizer: Optional[torch.Tensor] = None,
    ):
        if self.fk is None:
            return naive.policy_loss(
                logits, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, config=config,
                normalizer=normalizer,
            )
        return self.fk.policy_loss(
            logits, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, config=config,
            normalizer=normalizer, backend=self.backend,
        )

    def group_advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        if self.fk is None:
            return naive.group_advantages(rewards, group_size)
        return self.fk.group_advantages(rewards, group_size, scale="std", std_ddof=0)

    def gae(self, rewards, values, mask, *, gamma: float, lam: float):
        if self.fk is None:
            return naive.gae(rewards, values, mask, gamma=gamma, lam=lam)
        return self.fk.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)

    def value_loss(self, values, old_values, returns, mask, *, clip: Optional[float], normalizer=None):
        if self.fk is None:
            return naive.value_loss(values, old_values, returns, mask, clip=clip, normalizer=normalizer)
        return self.fk.value_loss(
            values, old_values, returns, mask, clip=clip, loss_agg="token-mean", normalizer=normalizer
        )

    def dpo_loss(self, logits, targets, mask, ref_chosen_logps, ref_rejected_logps, *, beta: float):
        if self.fk is None:
            return naive.fused_dpo_loss(logits, targets, mask, ref_chosen_logps, ref_rejected_logps, beta=beta)
        return self.fk.fused_dpo_loss(
            logits, targets, mask, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type="sigmoid",
            backend=self.backend,
        )


# The peak extra bytes of a loss step (loss forward + gradient w.r.t. the logits), as ``.peak``: the
# allocator's count on CUDA, live tensor storages created inside the block on CPU (see the benchmarks' measure).
LossStepMemory = StepMemory
