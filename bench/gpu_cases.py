"""The cases bench/gpu_suite.py times on a GPU: our Triton primitives, naive PyTorch (eager and
compiled) and Liger-Kernel's GRPO loss, each a setup that returns the step to time.

A case is registered with ``@register(name, description, passes)``: ``passes`` is how many times the
step moves the N x V logits (1: a read; 3: a read, then a read and a write), the traffic its GB/s is
computed from; ``missing`` says why the case cannot run here (a peer that is not installed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Inputs:
    """One benchmark problem: logits [N, V] of ``dtype`` on CUDA, targets, upstream coefficients."""

    n: int
    v: int
    dtype: torch.dtype
    logits: torch.Tensor
    targets: torch.Tensor
    g_lp: torch.Tensor
    g_entropy: torch.Tensor
    temperature: float


@dataclass
class Case:
    """A benchmarked op. ``setup(inputs)`` returns the closure timed per repeat (warm-up included in
    setup's caller, never in the timings); ``passes`` is the essential traffic in units of N V
    itemsize; ``missing()`` returns why the case cannot run here (None = it can)."""

    name: str
    description: str
    setup: Callable[[Inputs], Callable[[], object]]
    passes: int
    missing: Callable[[], Optional[str]] = lambda: None


CASES: list[Case] = []


def register(name: str, description: str, passes: int, missing: Callable[[], Optional[str]] = lambda: None):
    def wrap(setup: Callable[[Inputs], Callable[[], object]]) -> Callable[[Inputs], Callable[[], object]]:
        CASES.append(Case(name, description, setup, passes, missing))
        return setup

    return wrap


def _params(x: Inputs):
    from fastrl_kernels.core import CoreParams

    return CoreParams(temperature=x.temperature)


@register("fk_stats", "fastrl Triton stats: logprobs + entropy forward (pass 1)", passes=1)
def _fk_stats(x: Inputs) -> Callable[[], object]:
    import fastrl_kernels.triton as ft

    params = _params(x)
    return lambda: ft.stats(x.logits, x.targets, params)


@register("fk_stats_grad", "fastrl Triton stats + grad into a new buffer (fused fwd + bwd)", passes=3)
def _fk_stats_grad(x: Inputs) -> Callable[[], object]:
    import fastrl_kernels.triton as ft

    params = _params(x)

    def run() -> torch.Tensor:
        stats = ft.stats(x.logits, x.targets, params)
        return ft.grad(x.logits, x.targets, stats, x.g_lp, x.g_entropy, params)

    return run


@register("fk_stats_grad_inplace", "fastrl Triton stats + grad written over the logits", passes=3)
def _fk_stats_grad_inplace(x: Inputs) -> Callable[[], object]:
    import fastrl_kernels.triton as ft

    params = _params(x)

    def run() -> torch.Tensor:
        stats = ft.stats(x.logits, x.targets, params)
        return ft.grad(x.logits, x.targets, stats, x.g_lp, x.g_entropy, params, out=x.logits)

    return run


def naive_loss(logits, targets, g_lp, g_entropy, temperature: float) -> torch.Tensor:
    """Plain PyTorch (the benchmarks' naive baseline): log_softmax + gather + entropy in float32,
    L = sum g_lp logp + g_H H over rows whose target is not -100."""
    from fastrl_kernels.benchmarks.naive import naive_token_logprobs

    logp, entropy = naive_token_logprobs(logits, targets, temperature, ignore_index=-100)
    return (g_lp * logp + g_entropy * entropy).sum()


def _naive_setup(x: Inputs, loss_fn) -> Callable[[], object]:
    leaf = x.logits.detach().requires_grad_(True)

    def run() -> None:
        loss_fn(leaf, x.targets, x.g_lp, x.g_entropy, x.temperature).backward()
        leaf.grad = None  # the gradient counts in the call's peak, not in the next call's baseline

    return run


@register("torch_eager", "naive eager PyTorch log_softmax + gather + entropy, fwd + bwd", passes=3)
def _torch_eager(x: Inputs) -> Callable[[], object]:
    return _naive_setup(x, naive_loss)


@register("torch_compile", "torch.compile of the naive loss, fwd + bwd (compile time excluded)", passes=3)
def _torch_compile(x: Inputs) -> Callable[[], object]:
    # One static-shape graph per benchmark shape: lift dynamo's per-function recompile limit (8) so
    # the later shapes are compiled too rather than silently run eagerly.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return _naive_setup(x, torch.compile(naive_loss, dynamic=False))


def _liger_missing() -> Optional[str]:
    try:
        importlib.import_module("liger_kernel.transformers.grpo_loss")
    except Exception as error:  # ImportError, or a Liger that fails to import on this stack
        return f"liger_kernel GRPO loss not importable ({type(error).__name__}: {error})"
    return None


def _liger_grpo_setup(x: Inputs, inplace: bool) -> Callable[[], object]:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    # Liger takes [B, T + 1, V] logits (the last position is dropped), so the problem is rebuilt in
    # that layout with the same N = B T token rows; the extra rows are part of "the inputs".
    seq = 1024 if x.n % 1024 == 0 else x.n
    batch = x.n // seq
    logits = torch.randn(batch, seq + 1, x.v, device="cuda", dtype=x.dtype).requires_grad_(True)
    x.logits = logits  # releases the [N, V] logits; the caller measures memory against this
    # Liger has no ignore_index: a -100 target indexes outside the row (an illegal address on the
    # GPU). Masked tokens go to its completion mask instead, with a valid id.
    targets = x.targets.view(batch, seq)
    ids = targets.clamp(min=0)
    mask = (targets != -100).to(torch.int32)
    old = torch.full((batch, seq), -5.0, device="cuda")
    ref = old - 0.1
    advantages = torch.randn(batch, device="cuda")

    def run() -> None:
        out = triton_grpo_loss(
            logits, old, ref, ids, advantages, mask, temperature=x.temperature, beta=0.04, inplace=inplace
        )
        (out[0] if isinstance(out, (tuple, list)) else out).sum().backward()
        logits.grad = None

    return run


@register("liger_grpo", "Liger-Kernel triton_grpo_loss (logp, clip, k3 KL), fwd + bwd, inplace=False", 3,
          _liger_missing)
def _liger_grpo(x: Inputs) -> Callable[[], object]:
    return _liger_grpo_setup(x, inplace=False)


@register("liger_grpo_inplace", "Liger-Kernel triton_grpo_loss, fwd + bwd, gradient over the logits", 3,
          _liger_missing)
def _liger_grpo_inplace(x: Inputs) -> Callable[[], object]:
    return _liger_grpo_setup(x, inplace=True)


def make_inputs(n: int, v: int, dtype: torch.dtype, temperature: float, masked_frac: float) -> Inputs:
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + v)
    logits = (2.0 * torch.randn(n, v, device="cuda", generator=gen)).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    if masked_frac > 0:
        targets = targets.masked_fill(torch.rand(n, device="cuda", generator=gen) < masked_frac, -100)
    g = torch.randn(2, n, device="cuda", generator=gen)
    return Inputs(n, v, dtype, logits, targets, g[0], g[1], temperature)
