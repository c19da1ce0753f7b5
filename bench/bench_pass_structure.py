"""CPU timing of a training step's passes over the logits: the loss costs what token_logprobs costs.

Usage: python bench/bench_pass_structure.py [--shape 4096x32000] [--repeats 9] [--backend native]
                                            [--json PATH] [--markdown PATH]

At one shape (fp32 logits, normal(0, 2^2)) it times forward + backward of
  token_logprobs          logp.sum() + 0.01 entropy.sum(): pass 1, then pass 2 into a new buffer
  policy_loss             GRPO clip + k3 KL + entropy bonus, DAPO aggregation: the same two passes
  policy_loss in place    inplace_grad=True: pass 2 writes over the logits
  policy_loss 40% masked  in place, 40% of the tokens masked (skipped by both passes)
  naive eager             log_softmax + gather + entropy + the same loss, autograd backward
Each time is the median of ``--repeats`` runs, the implementations interleaved run by run so drift
on a shared machine hits them alike; the logits are refilled outside the timed region (an in-place
step destroys them). The gradient is taken with ``torch.autograd.grad``, as it reaches the lm_head
in a model: accumulating it into a leaf's ``.grad`` would add a copy of N x V that no training step
pays. Ratios are within this run. No assertions: the numbers are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fastrl_kernels as fk
from fastrl_kernels import native
from fastrl_kernels.benchmarks.measure import time_step
from fastrl_kernels.benchmarks.naive import naive_policy_loss

OPTIONS = dict(loss_type="clip", clip_eps_high=0.28, kl_coef=0.04, kl_estimator="k3", entropy_coef=0.01,
               loss_agg="dapo")


def inputs(n: int, v: int, masked: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    old = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1) + 0.1 * torch.randn(n, generator=g)
    ref = old + 0.1 * torch.randn(n, generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) >= masked
    return logits, targets, old, ref, adv, mask


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4096x32000")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--backend", default="native")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    load_average = list(os.getloadavg())  # a busy machine makes every number here slower and noisier
    n, v = (int(x) for x in args.shape.split("x"))
    logits, targets, old, ref, adv, mask = inputs(n, v, 0.0)
    masked = inputs(n, v, 0.4)[5]

    def step(kind: str):
        leaf = logits.clone().requires_grad_(True)  # outside the timer: the in-place runs overwrite it

        def run():
            if kind == "token_logprobs":
                logp, entropy = fk.token_logprobs(leaf, targets, backend=args.backend)
                torch.autograd.grad(logp.sum() + 0.01 * entropy.sum(), leaf)
            elif kind == "naive":
                loss, _, _ = naive_policy_loss(leaf, targets, old, adv, mask, ref, temperature=1.0, clip_eps_low=0.2,
                                               clip_eps_high=0.28, kl_coef=0.04)
                torch.autograd.grad(loss, leaf)
            else:
                out = fk.policy_loss(leaf, targets, old, adv, masked if kind == "masked" else mask, ref_logprobs=ref,
                                     backend=args.backend, inplace_grad=kind in ("inplace", "masked"), **OPTIONS)
                torch.autograd.grad(out.loss, leaf)

        return time_step(run, "cpu", warmup=0, repeats=1)[0] / 1e3

    kinds = ["token_logprobs", "policy_loss", "inplace", "masked", "naive"]
    for kind in kinds:  # warm-up: extension build, first-touch page faults
        step(kind)
    times = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(step(kind))
    medians = {kind: statistics.median(ts) * 1e3 for kind, ts in times.items()}
    ratios = {
        "policy_loss in place / token_logprobs": medians["inplace"] / medians["token_logprobs"],
        "policy_loss / token_logprobs": medians["policy_loss"] / medians["token_logprobs"],
        "naive / policy_loss in place": medians["naive"] / medians["inplace"],
        "naive / policy_loss": medians["naive"] / medians["policy_loss"],
        "40% masked / unmasked (in place)": medians["masked"] / medians["inplace"],
    }
    meta = {"shape": [n, v], "dtype": "float32", "backend": args.backend, "repeats": args.repeats,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "native_isa": native.load().isa if args.backend == "native" else None,
            "load_average_at_start": load_average,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "command": "python bench/bench_pass_structure.py " + " ".join(argv or [])}
    labels = {"token_logprobs": "token_logprobs fwd+bwd", "policy_loss": "policy_loss fwd+bwd",
              "inplace": "policy_loss fwd+bwd, inplace_grad", "masked": "policy_loss fwd+bwd, inplace_grad, 40% masked",
              "naive": "naive eager policy loss fwd+bwd"}
    lines = [f"# Passes over the logits per training step, CPU ({args.backend} backend)", "",
             f"{n} x {v} fp32, torch {meta['torch']}, {meta['threads']} threads ({meta['cpu']}"
             + (f", native {meta['native_isa']} build" if meta["native_isa"] else "")
             + f"), median of {args.repeats} interleaved runs, {meta['date']}, load average at the start "
             f"{load_average[0]:.2f}.", "", "| step | median ms |", "|---|---|"]
    lines += [f"| {labels[k]} | {medians[k]:.1f} |" for k in kinds]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {r:.2f} |" for k, r in ratios.items()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "median_ms": medians, "ratios": ratios,
                                         "runs_ms": {k: [t * 1e3 for t in ts] for k, ts in times.items()}}, indent=1))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
