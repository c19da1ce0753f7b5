"""CPU timing of the native primitives against chunked torch and naive eager PyTorch.

Usage: python bench/bench_native.py [--threads 2] [--repeats 5] [--shapes 4096x32000,1024x151936]

For each shape (fp32 logits, normal(0, 2^2), temperature 1) it times
  native stats          pass 1 (reads the logits once)
  native stats+grad     pass 1 + pass 2 into a preallocated buffer (reads twice, writes once)
  torch stats+grad      the same two primitives from ``fastrl_kernels.torch_backend``
  naive eager fwd+bwd   log_softmax + gather + entropy, then autograd backward
and prints the best time, the bytes moved by the logits / gradient (read + written) per second, that
rate as a share of a large-tensor copy measured in the same run, and speedups. No assertions.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from fastrl_kernels import native, torch_backend
from fastrl_kernels.benchmarks import measure
from fastrl_kernels.benchmarks.naive import naive_token_logprobs
from fastrl_kernels.core import CoreParams


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls after one untimed call (first-touch page faults, lazy init)."""
    return min(measure.time_step(fn, "cpu", warmup=1, repeats=repeats, max_seconds=float("inf"))) / 1e3


def naive_eager(logits, targets, g_lp, g_entropy):
    z = logits.detach().requires_grad_(True)
    logp, entropy = naive_token_logprobs(z, targets)
    (logp * g_lp + entropy * g_entropy).sum().backward()
    return z.grad


def run_shape(n: int, v: int, repeats: int, copy_bps: float) -> list:
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    g_lp = torch.rand(n, generator=g) - 0.5
    g_entropy = torch.rand(n, generator=g) - 0.5
    params = CoreParams()
    out = torch.empty_like(logits)
    elem = n * v * logits.element_size()

    def native_both():
        stats = native.stats(logits, targets, params)
        return native.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)

    def torch_both():
        stats = torch_backend.stats(logits, targets, params)
        return torch_backend.grad(logits, targets, stats, g_lp, g_entropy, params, out=out)

    cases = [
        ("native stats", lambda: native.stats(logits, targets, params), elem),
        ("native stats+grad", native_both, 3 * elem),
        ("torch_backend stats+grad", torch_both, 3 * elem),
        ("naive eager fwd+bwd", lambda: naive_eager(logits, targets, g_lp, g_entropy), 3 * elem),
    ]
    rows = []
    for name, fn, nbytes in cases:
        seconds = best_seconds(fn, repeats)
        rows.append((f"{n}x{v}", name, seconds, nbytes / seconds, nbytes / seconds / copy_bps))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="4096x32000,1024x151936")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native.load()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    copy_bps = measure.copy_bandwidth("cpu", 4 * max(n * v for n, v in shapes), args.repeats) * 1e9
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"native isa {native.load().isa}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# copy bandwidth (read + write): {copy_bps / 1e9:.1f} GB/s")
    header = f"{'shape':>12}  {'case':<32}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'native x':>10}"
    print(header)
    print("-" * len(header))
    for n, v in shapes:
        rows = run_shape(n, v, args.repeats, copy_bps)
        native_both = rows[1][2]
        for shape, name, seconds, bps, share in rows:
            speedup = f"{seconds / native_both:.1f}" if "stats+grad" in name or "fwd+bwd" in name else ""
            print(f"{shape:>12}  {name:<32}{seconds * 1e3:9.1f}{bps / 1e9:8.1f}{100 * share:7.0f}%{speedup:>10}")


if __name__ == "__main__":
    main()
