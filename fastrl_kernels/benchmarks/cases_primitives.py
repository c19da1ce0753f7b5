"""Cases of the two primitives every op is built on: ``stats`` (pass 1) and ``stats`` + ``grad`` (passes 2, 3).

Inputs (seeded, identical for every implementation): logits ``[N, V]`` ~ 2 N(0, 1); uniform targets, a
fraction ``masked_frac`` of them set to -100 (rows the primitives skip); upstream coefficients g_lp,
g_H ~ N(0, 1) per row. Params: ``temperature`` (1.0) and ``masked_frac`` (0.0).

- ``primitives/stats``: ``BACKEND.stats`` (log-prob, entropy and the row statistics); naive is
  ``naive_token_logprobs`` without autograd. Traffic N V itemsize.
- ``primitives/stats+grad``: ``BACKEND.stats`` then ``BACKEND.grad`` into a new buffer (``+inplace``:
  over the logits); naive is log_softmax + gather + entropy with L = sum g_lp logp + g_H H, backward
  by autograd (``naive-compile``: the same under ``torch.compile``); ``liger`` / ``liger+inplace`` is
  Liger-Kernel's Triton GRPO loss on the same N rows (it reads ``[B, T + 1, V]``). Traffic 3 N V itemsize.

``ours[BACKEND]`` calls the backend module's primitives directly (``torch_backend``, ``native``,
``triton``), without the op layers around them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from . import naive, peers
from .cases import NAIVE, NAIVE_COMPILE, BenchCase, OpFamily, Step, Unavailable, ours, ours_backends, parse_ours

PRIMITIVE_PARAMS = {"temperature": 1.0, "masked_frac": 0.0}
BACKEND_MODULES = {"torch": "fastrl_kernels.torch_backend", "native": "fastrl_kernels.native",
                   "triton": "fastrl_kernels.triton"}
IGNORE = -100


def make_inputs(case: BenchCase) -> dict[str, torch.Tensor]:
    n, v = case.shape["N"], case.shape["V"]
    device = torch.device(case.device)
    gen = torch.Generator(device=device).manual_seed(n * 7 + v)
    logits = (2.0 * torch.randn(n, v, device=device, generator=gen)).to(case.torch_dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    masked_frac = case.params.get("masked_frac", 0.0)
    if masked_frac > 0:
        targets = targets.masked_fill(torch.rand(n, device=device, generator=gen) < masked_frac, IGNORE)
    g = torch.randn(2, n, device=device, generator=gen)
    return {"logits": logits, "targets": targets, "g_lp": g[0], "g_h": g[1]}


def naive_loss(logits, targets, g_lp, g_h, temperature: float) -> torch.Tensor:
    """L = sum g_lp logp + g_H H over the rows whose target is not -100 (naive log_softmax + gather)."""
    logp, entropy = naive.naive_token_logprobs(logits, targets, temperature, ignore_index=IGNORE)
    return (g_lp * logp + g_h * entropy).sum()


def compiled_naive_loss(device: str):
    reason = naive.compile_available(device)
    if reason is not None:
        raise Unavailable(f"naive-compile: {reason}")
    # One static-shape graph per shape: lift dynamo's per-function recompile limit (8) so later
    # shapes are compiled too rather than silently run eagerly.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(naive_loss, dynamic=False)


def _backend(name: str) -> Any:
    if name not in BACKEND_MODULES:
        raise Unavailable(f"ours[{name}]: no primitives module for this backend")
    module = importlib.import_module(BACKEND_MODULES[name])
    if name == "native":
        module.load()
    return module


def _setup(case: BenchCase, impl: str) -> Step:
    from ..core import CoreParams

    temperature = case.params["temperature"]
    fwd_only = case.name.endswith("/stats")
    if impl.startswith("liger") and not fwd_only:
        return _setup_liger(case, inplace=impl.endswith("+inplace"))
    x = make_inputs(case)
    logits, targets, g_lp, g_h = x["logits"], x["targets"], x["g_lp"], x["g_h"]
    parsed = parse_ours(impl)
    if parsed is not None and not (fwd_only and parsed[1]):
        ft, params = _backend(parsed[0]), CoreParams(temperature=temperature)
        if fwd_only:
            return lambda: ft.stats(logits, targets, params)
        out = logits if parsed[1] else None
        return lambda: ft.grad(logits, targets, ft.stats(logits, targets, params), g_lp, g_h, params, out=out)
    if impl == NAIVE and fwd_only:
        def forward():
            with torch.no_grad():
                naive.naive_token_logprobs(logits, targets, temperature, ignore_index=IGNORE)
        return forward
    if impl in (NAIVE, NAIVE_COMPILE) and not fwd_only:
        loss_fn = naive_loss if impl == NAIVE else compiled_naive_loss(case.device)
        leaf = logits.requires_grad_(True)

        def step():
            loss_fn(leaf, targets, g_lp, g_h, temperature).backward()
            leaf.grad = None  # the gradient counts in the call's peak, not in the next call's baseline
        return step
    raise Unavailable(f"{impl}: not an implementation of {case.name}")


def _setup_liger(case: BenchCase, inplace: bool) -> Step:
    """Liger's GRPO loss (logp, clip, k3 KL) on ``[B, T + 1, V]`` logits with the same N = B T rows;
    a -100 target goes to its completion mask with a valid id (it has no ignore_index)."""
    grpo = peers.liger_grpo_loss()
    n, v = case.shape["N"], case.shape["V"]
    targets = make_inputs(case)["targets"]
    seq = 1024 if n % 1024 == 0 else n
    batch = n // seq
    device = torch.device(case.device)
    logits = torch.randn(batch, seq + 1, v, device=device, dtype=case.torch_dtype).requires_grad_(True)
    targets = targets.view(batch, seq)
    ids, mask = targets.clamp(min=0), (targets != IGNORE).to(torch.int32)
    old = torch.full((batch, seq), -5.0, device=device)
    ref, advantages = old - 0.1, torch.randn(batch, device=device)

    def step():
        out = grpo(logits, old, ref, ids, advantages, mask, temperature=case.params["temperature"], beta=0.04,
                   inplace=inplace)
        (out[0] if isinstance(out, (tuple, list)) else out).sum().backward()
        logits.grad = None

    return step


def _cases(shape: Mapping[str, int], dtype: str, device: str) -> list[BenchCase]:
    elements = shape["N"] * shape["V"] * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    backends = ours_backends(device)
    common = dict(op="primitives", shape=dict(shape), dtype=dtype, device=device, setup=_setup,
                  params=dict(PRIMITIVE_PARAMS))
    both = (NAIVE, NAIVE_COMPILE, "liger", "liger+inplace") + tuple(ours(b) for b in backends)
    return [
        BenchCase(name="primitives/stats", impls=(NAIVE,) + tuple(ours(b) for b in backends),
                  traffic_bytes=elements, **common),
        BenchCase(name="primitives/stats+grad", impls=both + tuple(ours(b, inplace=True) for b in backends),
                  traffic_bytes=3 * elements, grad_bytes=elements, **common),
    ]


def _default_shapes(device_type: str, quick: bool) -> list[dict[str, int]]:
    if device_type == "cuda":
        n_values, v_values = ((8192,), (151936,)) if quick else ((4096, 8192, 16384), (32000, 128256, 151936))
    else:
        n_values, v_values = ((256,), (32000,)) if quick else ((4096,), (32000,))
    return [{"N": n, "V": v} for n in n_values for v in v_values]


FAMILIES = [OpFamily("primitives", _cases, _default_shapes)]
