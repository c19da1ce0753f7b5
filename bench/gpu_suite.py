"""GPU suite: the Triton tests on the device, then timings and memory of the core op (docs/design.md, "Benchmarks").

    python bench/gpu_suite.py --out bench/results/gpu-h100      # tests + benchmarks, JSON + table
    python bench/gpu_suite.py --out DIR --skip-tests --cases fk_stats,torch_eager --shapes 4096x32000
    python bench/gpu_suite.py --out DIR --sweep                 # also time alternative launch configs

(a) ``pytest -m triton`` runs on the GPU (no interpreter); its result goes into the JSON.
(b) Each registered case runs at every shape: time is the median of CUDA-event timings after warm-up,
GB/s is the op's essential traffic (bytes read + written: N V itemsize for stats, 3 N V itemsize for
a forward + backward: read for the statistics, read + write for the gradient) over that time, "% peak"
compares it with the device's HBM bandwidth, and peak extra MB is ``torch.cuda.max_memory_allocated``
minus what the inputs hold. All rows are valid unless ``--masked-frac`` is set.
The cases are implementations of fastrl-bench's ``primitives`` family, named in bench/gpu_cases.py.
Benchmarks record numbers and never assert on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from gpu_cases import CASES, Case, make_inputs, missing  # noqa: E402

from fastrl_kernels.benchmarks.cases import Unavailable  # noqa: E402
from fastrl_kernels.benchmarks.measure import cuda_event_times, cuda_peak_extra, hbm_peak_tbps  # noqa: E402

SHAPES = [(n, v) for n in (4096, 8192, 16384) for v in (32000, 128256, 151936)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def run_case(case: Case, n: int, v: int, args: argparse.Namespace, peak_tbps: Optional[float]) -> dict:
    row = {"case": case.name, "n": n, "v": v, "dtype": args.dtype, "temperature": args.temperature}
    reason = missing(case)
    if reason is not None:
        return {**row, "status": "skipped", "error": reason}
    fn = None
    try:
        fn = case.setup(case.bench_case(n, v, args.dtype, args.temperature, args.masked_frac))
        fn()  # compiles (Triton / torch.compile) outside the measurements
        peak_extra = cuda_peak_extra(fn)
        times = cuda_event_times(fn, warmup=args.warmup, repeats=args.repeats)
    except Unavailable as error:
        return {**row, "status": "skipped", "error": str(error)}
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "status": "oom", "error": str(error).splitlines()[0]}
    except Exception as error:  # a peer's API drift must not stop the suite
        return {**row, "status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        del fn
        torch.cuda.empty_cache()
    median = statistics.median(times)
    traffic = case.passes * n * v * torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    gbps = traffic / (median * 1e-3) / 1e9
    return {
        **row,
        "status": "ok",
        "time_ms": median,
        "time_ms_min": min(times),
        "repeats": len(times),
        "traffic_bytes": traffic,
        "gbps": gbps,
        "pct_hbm_peak": 100.0 * gbps / (peak_tbps * 1e3) if peak_tbps else None,
        "peak_extra_mb": peak_extra / 2**20,
    }


def sweep_launches(n: int, v: int, args: argparse.Namespace) -> list[dict]:
    """Time the stats kernel and, apart, the grad kernel over alternative LaunchConfigs (input for the
    launch table): each kernel's row names its own config; the other kernel is not in the time."""
    import fastrl_kernels.triton as ft
    from fastrl_kernels.core import CoreParams

    rows = []
    x = make_inputs(n, v, DTYPES[args.dtype], args.temperature, args.masked_frac)
    params = CoreParams(temperature=args.temperature)
    st = ft.stats(x.logits, x.targets, params)
    out = torch.empty_like(x.logits)
    defaults = {kernel: ft.launch_config(v, DTYPES[args.dtype], kernel) for kernel in ("stats", "grad")}
    grid = {"stats": ((2048, 4096, 8192, 16384), (2, 4, 8)), "grad": ((2048, 4096, 8192), (2, 4, 8))}
    for kernel, (blocks, warps) in grid.items():
        for block_v in blocks:
            for num_warps in warps:
                cfg = ft.LaunchConfig(block_v=block_v, rows=1, num_warps=num_warps)
                if kernel == "stats":
                    call = lambda cfg=cfg: ft.stats(x.logits, x.targets, params, launch=cfg)
                else:
                    call = lambda cfg=cfg: ft.grad(x.logits, x.targets, st, x.g_lp, x.g_entropy, params,
                                                   out=out, launch=cfg)
                ms = statistics.median(cuda_event_times(call, warmup=2, repeats=args.repeats))
                default = defaults[kernel]
                rows.append({"n": n, "v": v, "dtype": args.dtype, "kernel": kernel, **asdict(cfg), "ms": ms,
                             "is_default": block_v == default.block_v and num_warps == default.num_warps})
    return rows


def run_tests(out: Path, timeout: int) -> dict:
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "triton",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests",
        f"--junitxml={out / 'pytest-triton.xml'}",
    ]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as error:
        log, rc = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT after {timeout} s", None
    (out / "pytest-triton.log").write_text(log if isinstance(log, str) else str(log))
    lines = [line for line in str(log).splitlines() if line.strip()]
    return {
        "command": shlex.join(cmd),
        "returncode": rc,
        "seconds": time.time() - start,
        "summary": lines[-1] if lines else "",
        "passed": rc == 0,
    }


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "liger-kernel", "fastrl-kernels"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def print_table(results: list[dict], header: dict) -> None:
    print(f"# {header['device']} | peak HBM {header['hbm_peak_tbps']} TB/s | {header['date']}")
    print(f"# versions: {header['versions']}")
    print(f"# command: {header['command']}")
    naive = {(r["n"], r["v"]): r["time_ms"] for r in results if r["case"] == "torch_eager" and r["status"] == "ok"}
    cols = f"{'case':24} {'N':>6} {'V':>7} {'ms':>9} {'GB/s':>8} {'%peak':>6} {'extra MB':>10} {'vs eager':>8}"
    print(cols)
    print("-" * len(cols))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['case']:24} {r['n']:>6} {r['v']:>7}  {r['status']}: {r.get('error', '')[:70]}")
            continue
        pct = f"{r['pct_hbm_peak']:.0f}" if r["pct_hbm_peak"] is not None else "-"
        ratio = naive.get((r["n"], r["v"]))
        speed = f"{ratio / r['time_ms']:.2f}x" if ratio else "-"
        print(
            f"{r['case']:24} {r['n']:>6} {r['v']:>7} {r['time_ms']:9.3f} {r['gbps']:8.0f} {pct:>6} "
            f"{r['peak_extra_mb']:10.1f} {speed:>8}"
        )


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    names = ", ".join(case.name for case in CASES)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for results.json, the pytest log and junit xml"
    )
    parser.add_argument("--cases", default="", help=f"comma-separated subset of: {names}")
    parser.add_argument(
        "--shapes", default="", help="comma-separated NxV subset, e.g. 4096x32000 (default: the standard grid)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--masked-frac", type=float, default=0.0, help="fraction of rows with target -100")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m triton first")
    parser.add_argument("--test-timeout", type=int, default=300)
    parser.add_argument("--sweep", action="store_true", help="also time LaunchConfig alternatives per shape")
    parser.add_argument(
        "--skip-ops", action="store_true", help="do not run the package-op suite (policy_loss, lm_head path)"
    )
    return parser.parse_args(argv)


# The targets on an H100: the fused policy loss at N=8192, V=151936 and the lm_head path with the
# Qwen2.5-0.5B, Qwen2.5-7B and Llama-3-8B heads, bf16, through the shared suite of fastrl_kernels.benchmarks.
PACKAGE_OPS = (
    ("policy_loss", ["8192x151936", "16384x151936", "8192x128256"]),
    ("linear_policy_loss", ["8192x151936x896", "8192x152064x3584", "8192x128256x4096", "16384x128256x4096"]),
)


def run_package_ops(out: Path) -> dict:
    """fastrl-bench's runner on CUDA for the package's fused ops vs naive / compiled naive / peers."""
    from fastrl_kernels.benchmarks import report as bench_report
    from fastrl_kernels.benchmarks.runner import environment, run_suite

    rows: list = []
    errors: dict = {}
    for op, shapes in PACKAGE_OPS:
        try:
            rows += run_suite(device="cuda", ops=[op], shapes=shapes, dtype="bfloat16")
        except Exception as error:  # recorded, the remaining ops still run
            errors[op] = f"{type(error).__name__}: {error}"
            print(f"package ops {op}: {errors[op]}", flush=True)
    meta = environment("cuda", command=shlex.join([sys.executable, *sys.argv]))
    if rows and "copy_gbps" in rows[0]:
        meta["copy_gbps"] = rows[0]["copy_gbps"]
    if rows:
        bench_report.write_json(rows, meta, out / "package_ops.json")
        bench_report.write_markdown(rows, meta, out / "package_ops.md")
    return {"rows": len(rows), "errors": errors, "json": str(out / "package_ops.json")}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_suite: needs a CUDA GPU (torch.cuda.is_available() is False); the CPU suite lives in "
            "bench/ (fastrl-bench). Nothing was run.",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(p) for p in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    wanted = {c for c in args.cases.split(",") if c}
    unknown = wanted - {case.name for case in CASES}
    if unknown:
        print(f"gpu_suite: unknown case(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    cases = [case for case in CASES if not wanted or case.name in wanted]
    name = torch.cuda.get_device_name()
    header = {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "device_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "hbm_peak_tbps": hbm_peak_tbps(name),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "traffic_model": "stats: N V itemsize; fwd+bwd: 3 N V itemsize (read, read + write)",
    }
    report: dict = {**header, "settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_tests:
        report["pytest"] = run_tests(args.out, args.test_timeout)
        print(f"pytest -m triton: {report['pytest']['summary']} (rc {report['pytest']['returncode']})")
    results = []
    for n, v in shapes:
        for case in cases:
            results.append(run_case(case, n, v, args, header["hbm_peak_tbps"]))
            r = results[-1]
            print(f"  {case.name} N={n} V={v}: {r['status']} {r.get('time_ms', '')}", flush=True)
    report["results"] = results
    if not args.skip_ops:
        report["package_ops"] = run_package_ops(args.out)
    if args.sweep:
        report["sweep"] = [row for n, v in shapes for row in sweep_launches(n, v, args)]
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print_table(results, header)
    print(f"wrote {args.out / 'results.json'}")
    return 0 if report.get("pytest", {"passed": True})["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
