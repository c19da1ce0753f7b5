"""The cases bench/gpu_suite.py times on a GPU: names for the implementations of fastrl-bench's
``primitives`` family (``fastrl_kernels/benchmarks/cases_primitives.py``: our Triton primitives, naive
PyTorch eager and compiled, Liger-Kernel's GRPO loss), which builds the inputs and the step to time.

A case names the family's variant (``stats``: 1 pass over the N x V logits, a read; ``stats+grad``: 3
passes, a read, then a read and a write) and implementation. A new case is a row of ``CASES``; a new
implementation belongs in the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from fastrl_kernels.benchmarks import cases_primitives
from fastrl_kernels.benchmarks.cases import BenchCase, canonical_dtype


@dataclass(frozen=True)
class Case:
    """A benchmarked op: ``variant`` of the primitives family ("stats" or "stats+grad") run by ``impl``."""

    name: str
    description: str
    variant: str
    impl: str

    @property
    def passes(self) -> int:
        """The essential traffic in units of N V itemsize."""
        return 1 if self.variant == "stats" else 3

    def bench_case(self, n: int, v: int, dtype: str, temperature: float, masked_frac: float) -> BenchCase:
        family = cases_primitives.FAMILIES[0]
        case = next(c for c in family.make_cases({"N": n, "V": v}, canonical_dtype(dtype), "cuda")
                    if c.name == f"primitives/{self.variant}")
        return dataclasses.replace(case, params={"temperature": temperature, "masked_frac": masked_frac})

    def setup(self, case: BenchCase) -> Callable[[], object]:
        """The step to time (raises ``Unavailable`` when it cannot run here)."""
        return case.setup(case, self.impl)


CASES: list[Case] = [
    Case("fk_stats", "fastrl Triton stats: logprobs + entropy forward (pass 1)", "stats", "ours[triton]"),
    Case("fk_stats_grad", "fastrl Triton stats + grad into a new buffer (fused fwd + bwd)", "stats+grad",
         "ours[triton]"),
    Case("fk_stats_grad_inplace", "fastrl Triton stats + grad written over the logits", "stats+grad",
         "ours[triton]+inplace"),
    Case("torch_eager", "naive eager PyTorch log_softmax + gather + entropy, fwd + bwd", "stats+grad", "naive"),
    Case("torch_compile", "torch.compile of the naive loss, fwd + bwd (compile time excluded)", "stats+grad",
         "naive-compile"),
    Case("liger_grpo", "Liger-Kernel triton_grpo_loss (logp, clip, k3 KL), fwd + bwd, inplace=False", "stats+grad",
         "liger"),
    Case("liger_grpo_inplace", "Liger-Kernel triton_grpo_loss, fwd + bwd, gradient over the logits", "stats+grad",
         "liger+inplace"),
]


@dataclass
class Inputs:
    """One problem for the launch sweep: logits [N, V] on CUDA, targets, upstream coefficients."""

    n: int
    v: int
    dtype: torch.dtype
    logits: torch.Tensor
    targets: torch.Tensor
    g_lp: torch.Tensor
    g_entropy: torch.Tensor
    temperature: float


def make_inputs(n: int, v: int, dtype: torch.dtype, temperature: float, masked_frac: float) -> Inputs:
    """The family's inputs (same seed, same values) for the launch sweep."""
    name = str(dtype).replace("torch.", "")
    case = CASES[0].bench_case(n, v, name, temperature, masked_frac)
    x = cases_primitives.make_inputs(case)
    return Inputs(n, v, dtype, x["logits"], x["targets"], x["g_lp"], x["g_h"], temperature)


def missing(case: Case) -> Optional[str]:
    """Why ``case`` cannot run here before any input is built (None: try it; its setup decides)."""
    from fastrl_kernels.benchmarks.runner import unavailable_reason

    return unavailable_reason(case.impl, "cuda", compile_mode="on")
