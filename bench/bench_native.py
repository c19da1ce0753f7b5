"""CPU timing of the native primitives against chunked torch and naive eager PyTorch.

Usage: python bench/bench_native.py [--threads 2] [--repeats 5] [--shapes 4096x32000,1024x151936]

A preset of fastrl-bench's runner (``fastrl_kernels.benchmarks``): the ``primitives`` family (fp32
logits, normal(0, 2^2), temperature 1) in this process, for
  native stats          pass 1 (reads the logits once)
  native stats+grad     pass 1 + pass 2 into a new buffer (reads twice, writes once)
  torch stats+grad      the same two primitives from ``fastrl_kernels.torch_backend``
  naive eager fwd+bwd   log_softmax + gather + entropy, then autograd backward
and prints the median time, the bytes moved by the logits / gradient (read + written) per second,
that rate as a share of a large-tensor copy measured in the same run, and each time over native
stats+grad's. No assertions.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastrl_kernels import native  # noqa: E402
from fastrl_kernels.benchmarks.runner import run_suite  # noqa: E402

ROWS = (  # (case, implementation, label), in print order
    ("primitives/stats", "ours[native]", "native stats"),
    ("primitives/stats+grad", "ours[native]", "native stats+grad"),
    ("primitives/stats+grad", "ours[torch]", "torch_backend stats+grad"),
    ("primitives/stats+grad", "naive", "naive eager fwd+bwd"),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="4096x32000,1024x151936")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_suite("cpu", ops=["primitives"], shapes=args.shapes.split(","), impls=["ours[native]", "ours[torch]"],
                     compile_mode="off", repeats=args.repeats, max_seconds=float("inf"), isolate=False,
                     log=lambda line: None)
    copy_gbps = rows[0]["copy_gbps"] if rows else float("nan")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"native isa {native.load().isa}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"# copy bandwidth (read + write): {copy_gbps:.1f} GB/s")
    header = f"{'shape':>12}  {'case':<32}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'native x':>10}"
    print(header)
    print("-" * len(header))
    found = {(r["N"], r["V"], r["case"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for shape in args.shapes.split(","):
        n, v = (int(x) for x in shape.split("x"))
        base = found.get((n, v, "primitives/stats+grad", "ours[native]"))
        for case, impl, label in ROWS:
            row = found.get((n, v, case, impl))
            if row is None:
                print(f"{shape:>12}  {label:<32}  not measured")
                continue
            ratio = f"{row['time_ms'] / base['time_ms']:.1f}" if base and case.endswith("+grad") else ""
            print(f"{shape:>12}  {label:<32}{row['time_ms']:9.1f}{row['gbps']:8.1f}"
                  f"{row['pct_copy_bandwidth']:7.0f}%{ratio:>10}")


if __name__ == "__main__":
    main()
