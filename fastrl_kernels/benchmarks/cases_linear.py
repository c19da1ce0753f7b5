"""Benchmark cases of the lm_head path: ``linear_policy_loss`` fwd + bwd vs naive PyTorch (docs/design.md, "Benchmarks")

``cases(device, quick)`` returns plain dicts, one per (op, shape, dtype), each with ``make_inputs()`` and
two callables ``ours(inputs)`` / ``naive(inputs)`` that run forward + backward once and return the loss.
Naive = logits = hidden @ W^T (+ b) -> log_softmax in float32 -> gather -> PPO clip loss, token-mean,
all by autograd (N x V logits, log-probs and their gradients live at once).

``python -m fastrl_kernels.benchmarks.cases_linear [--quick] [--device cpu] [--repeats 3]`` runs every
case with each side in a fresh subprocess: time is the median of ``repeats`` runs after one untimed run;
peak extra memory is, on CPU, the RSS high-water mark (``VmHWM``, reset after the untimed run; else
``ru_maxrss``) during the timed runs minus the RSS before them (inputs allocated, grads None); on
CUDA ``max_memory_allocated`` minus ``memory_allocated`` before them. ``peak_beyond_grads_mb`` also
subtracts the gradients the step must produce (hidden and weight grads, the same on both sides).
Prints one JSON line per case and side; records numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_SHAPES = [(2048, 896, 151936)]  # (N, H, V): Qwen2.5-0.5B's head
CPU_QUICK_SHAPES = [(256, 896, 32000)]
CUDA_SHAPES = [(8192, 896, 151936), (8192, 4096, 128256), (16384, 1536, 151936)]
CUDA_QUICK_SHAPES = [(4096, 896, 151936)]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """hidden [N, H], weight [V, H] (both requiring grad), targets, old log-probs near the model's,
    per-token advantages, a mask with ~30% padding."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": torch.randint(0, v, (n,), generator=g).to(device),
        "old_logprobs": (-torch.rand(n, generator=g) * 3.0 - 10.0).to(device),
        "advantages": torch.randn(n, generator=g).to(device),
        "mask": (torch.rand(n, generator=g) > 0.3).to(device),
    }


def ours(inputs: dict) -> torch.Tensor:
    from fastrl_kernels.ops.linear import linear_policy_loss

    out = linear_policy_loss(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["old_logprobs"],
                             inputs["advantages"], inputs["mask"], loss_type="clip", loss_agg="token-mean")
    out.loss.backward()
    return out.loss.detach()


def naive(inputs: dict) -> torch.Tensor:
    from .naive import naive_linear_policy_loss

    loss = naive_linear_policy_loss(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["old_logprobs"],
                                    inputs["advantages"], inputs["mask"])
    loss.backward()
    return loss.detach()


def cases(device: str = "cpu", quick: bool = False) -> list[dict[str, Any]]:
    """One dict per case: name, op, n, h, v, dtype, device, make_inputs(), ours(inputs), naive(inputs)."""
    if device == "cuda":
        shapes, dtypes = (CUDA_QUICK_SHAPES if quick else CUDA_SHAPES), ("bf16",)
    else:
        shapes, dtypes = (CPU_QUICK_SHAPES if quick else CPU_SHAPES), ("fp32",)
    result = []
    for n, h, v in shapes:
        for dtype_name in dtypes:
            dtype = _DTYPES[dtype_name]
            result.append({
                "name": f"linear_policy_loss/N{n}-H{h}-V{v}-{dtype_name}-{device}",
                "op": "linear_policy_loss", "n": n, "h": h, "v": v, "dtype": dtype_name, "device": device,
                "make_inputs": (lambda n=n, h=h, v=v, dtype=dtype: make_inputs(n, h, v, dtype, device)),
                "ours": ours,
                "naive": naive,
            })
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> int:
    """Reset the RSS high-water mark (Linux >= 4.0: clear_refs 5) so that temporaries freed while making
    the inputs do not hide the op's peak; returns the baseline RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset(inputs: dict) -> None:
    for tensor in inputs.values():
        if tensor.requires_grad:
            tensor.grad = None


def measure(case: dict, side: str, repeats: int) -> dict:
    """Time and peak extra memory of one side of one case in this process (call it in a fresh one)."""
    fn: Callable[[dict], torch.Tensor] = case[side]
    # Module imports and the native library load are one-time process costs, not the op's memory.
    from fastrl_kernels.backends import resolve_backend
    from fastrl_kernels.ops import linear  # noqa: F401

    resolve_backend("auto", torch.device(case["device"]))
    inputs = case["make_inputs"]()
    cuda = case["device"] == "cuda"

    def run() -> tuple[float, torch.Tensor]:
        _reset(inputs)
        start = time.perf_counter()
        loss = fn(inputs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss

    # The untimed first run also pays one-time initialisation (BLAS / OpenMP buffers, autograd engine
    # threads); the peak is taken over the timed runs only: the steady state of a training step.
    first, loss = run()
    _reset(inputs)  # the gradients a step produces count as its memory, on both sides
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_rss_peak()
    times = [run()[0] for _ in range(max(repeats, 1))]
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()) - base
    grad_bytes = sum(t.grad.nbytes for t in inputs.values() if t.requires_grad and t.grad is not None)
    return {"case": case["name"], "side": side, "loss": float(loss), "first_run_s": first,
            "time_s": statistics.median(times), "times_s": times, "peak_extra_mb": peak / 2**20,
            "peak_beyond_grads_mb": (peak - grad_bytes) / 2**20, "threads": torch.get_num_threads()}


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", type=int, default=None, help="run one case index in this process")
    parser.add_argument("--side", choices=("ours", "naive"), default=None)
    args = parser.parse_args(argv)
    all_cases = cases(args.device, args.quick)
    if args.case is not None:
        print(json.dumps(measure(all_cases[args.case], args.side, args.repeats)))
        return
    for index, case in enumerate(all_cases):
        for side in ("naive", "ours"):
            command = [sys.executable, "-m", "fastrl_kernels.benchmarks.cases_linear", "--device", args.device,
                       "--repeats", str(args.repeats), "--case", str(index), "--side", side]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            failure = {"case": case["name"], "side": side, "error": done.stderr[-2000:]}
            print(lines[-1] if lines else json.dumps(failure), flush=True)


if __name__ == "__main__":
    main()
