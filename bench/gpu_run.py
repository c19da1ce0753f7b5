"""One GPU run: correctness on CUDA, then timings, every result written the moment it is known.

    python -u bench/gpu_run.py --out $OUT                 # on a CUDA machine, about 6 minutes on an H100
    python -u bench/gpu_run.py --out DIR --dry-run        # on CPU: Triton interpreter, tiny shapes

Runs against whatever torch / triton the machine has (``PYTHONPATH`` = the checkout; nothing is
installed but a peer wheel found under ``peers/``, without dependencies and without the network). Each
stage is its own process with its own time limit, so a CUDA fault or a hang costs one stage, and the
whole run keeps within ``--budget`` seconds (a stage that no longer fits is recorded as skipped).
Everything lands in ``OUT/results.jsonl`` (one JSON record per check or measurement) and
``OUT/run.log`` (every stage's output); the stages, in order:

  env             device, clocks, driver, versions;
  breakdown       stats, grad and policy-loss times at N = 8192, V = 151936 bf16, peak memory, kernels per step;
  lm_head         linear_policy_loss at the Llama-3-8B head against three bare GEMMs and naive PyTorch;
  rows_past_2_31  the primitives at N x V > 2^31 (N = 16384, V = 151936 bf16), out of place and in place;
  ops             every public op, Triton vs the float64 reference, forward and gradients;
  no_sync_step    a training step under torch.cuda.set_sync_debug_mode("error");
  core:<case>     bench/gpu_suite.py cases at the target shape with 40% masked tokens: our primitives,
                  naive eager, naive under torch.compile, Liger's GRPO loss;
  policy_suite    fastrl-bench's policy_loss comparison (naive, Liger, ours, ours in place);
  pytest          ``pytest -m triton`` on the device (no interpreter);
  sweep           alternative launch tiles for the stats and the grad kernel;
  ncu             Nsight Compute's throughput, occupancy and stall sections of one stats and one grad
                  launch at the target shape (where ``ncu`` is installed).

``--skip STAGE`` (repeatable; ``core`` skips every core case) leaves stages out, e.g. for a second run
that only checks fixes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = "8192x151936"
CORE_CASES = ("fk_stats", "fk_stats_grad", "fk_stats_grad_inplace", "torch_eager", "torch_compile", "liger_grpo",
              "liger_grpo_inplace")
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
POLICY_SUITE = """
import json, sys
from fastrl_kernels.benchmarks.runner import run_suite
rows = run_suite(device="cuda", ops=["policy_loss"], shapes=["{shape}"], dtype="bfloat16",
                 impls=["naive", "liger", "ours[triton]", "ours[triton]+inplace"], compile_mode="off")
for row in rows:
    print("RESULT " + json.dumps(row, default=str), flush=True)
"""


class Run:
    """The output folder, the clock of the whole run and the two files every stage writes to."""

    def __init__(self, out: Path, budget: float, dry_run: bool, skip: frozenset = frozenset()):
        self.out, self.budget, self.dry_run, self.skip = out, budget, dry_run, skip
        self.start = time.time()
        out.mkdir(parents=True, exist_ok=True)
        self.results, self.log = out / "results.jsonl", out / "run.log"

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def record(self, **record) -> None:
        record = {"t": round(time.time() - self.start, 1), **record}
        with open(self.results, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"[{record['t']:6.1f}s] {json.dumps(record, default=str)[:300]}", flush=True)

    def stage(self, name: str, command: list, limit: float, env: dict) -> tuple:
        """Run ``command`` as stage ``name`` within ``limit`` seconds (less if the budget is short);
        its output goes to run.log. Returns (returncode or None, output)."""
        if name in self.skip or name.split(":")[0] in self.skip:
            self.record(stage=name, status="skipped", reason="--skip")
            return None, ""
        limit = min(limit, self.left() - 5)
        if limit < 10:
            self.record(stage=name, status="skipped", reason="no time left in the budget")
            return None, ""
        started = time.time()
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {shlex.join(map(str, command))}\n")
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            rc = None
            output = (_text(error.stdout) + _text(error.stderr)) + f"\nTIMEOUT after {limit:.0f} s"
        with open(self.log, "a") as log:
            log.write(output)
        status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
        tail = [line for line in output.splitlines() if line.strip()][-3:]
        self.record(stage=name, status=status, returncode=rc, seconds=round(time.time() - started, 1), tail=tail)
        return rc, output


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def environment(run: Run) -> None:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        query = "name,driver_version,clocks.max.sm,clocks.sm,clocks.max.mem,memory.total,power.limit"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or None
    # A copied working tree may carry a stale .git: the sources' own digest says what ran.
    info["sources_sha256"] = sources_digest()
    info["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run.record(stage="env", status="ok", **info)


def sources_digest() -> str:
    """SHA-256 over the package's and bench/'s Python and C++ sources (path and content, sorted)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("fastrl_kernels/**/*.py"), *REPO.glob("csrc/*"), *REPO.glob("bench/*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def install_peer_wheels(run: Run, env: dict) -> None:
    """Peers that are not on the GPU machine travel as wheels under peers/ (git-ignored). They go into
    a folder of their own put on PYTHONPATH: the machine's Python may refuse installs into its own
    site-packages (an externally managed environment)."""
    wheels = sorted((REPO / "peers").glob("*.whl"))
    if not wheels:
        run.record(stage="peers", status="skipped", reason="no wheel under peers/")
        return
    target = Path("/tmp/fastrl-peers")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--upgrade",
               "--target", str(target), *map(str, wheels)]
    rc, _ = run.stage("peers", command, 60, dict(os.environ))
    if rc == 0:
        env["PYTHONPATH"] = os.pathsep.join((env["PYTHONPATH"], str(target)))


def gpu_suite_rows(run: Run, name: str, output_dir: Path) -> None:
    """gpu_suite.py writes one results.json per call: turn its rows into records, drop the folder."""
    path = output_dir / "results.json"
    if path.exists():
        for row in json.loads(path.read_text()).get("results", []):
            run.record(stage=name, measurement=row)
        for row in json.loads(path.read_text()).get("sweep", []):
            run.record(stage=name, measurement=row)
        path.unlink()
    for leftover in output_dir.glob("*"):
        leftover.unlink()
    if output_dir.exists():
        output_dir.rmdir()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl and run.log")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds for the whole run (default 360)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timings")
    parser.add_argument("--skip", action="append", default=[], metavar="STAGE", help="leave this stage out")
    args = parser.parse_args(argv)
    run = Run(args.out, args.budget, args.dry_run, skip=set(args.skip))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    environment(run)
    python = sys.executable
    if not args.dry_run:
        install_peer_wheels(run, env)
    # the timings a GPU run exists for come first, so a short budget still brings them back
    checks = (("breakdown", 75), ("lm_head", 60), ("rows_past_2_31", 75), ("ops", 90), ("no_sync_step", 45))
    for section, limit in checks:
        if args.dry_run and section in ("breakdown", "lm_head"):
            continue
        command = [python, "bench/gpu_checks.py", section, str(run.results)] + (["--dry-run"] if args.dry_run else [])
        run.stage(section, command, limit, env)
    if args.dry_run:
        run.record(stage="timings", status="skipped", reason="dry run: no CUDA events on CPU")
        return 0
    for case in CORE_CASES:
        folder = args.out / f"core-{case}"
        command = [python, "bench/gpu_suite.py", "--out", str(folder), "--skip-tests", "--skip-ops", "--cases", case,
                   "--shapes", TARGET, "--masked-frac", "0.4", "--repeats", "10"]
        run.stage(f"core:{case}", command, 75 if case == "torch_compile" else 40, env)
        gpu_suite_rows(run, f"core:{case}", folder)
    rc, output = run.stage("policy_suite", [python, "-c", POLICY_SUITE.format(shape=TARGET)], 75, env)
    for line in output.splitlines():
        if line.startswith("RESULT "):
            run.record(stage="policy_suite", measurement=json.loads(line[len("RESULT "):]))
    junit = args.out / "pytest-triton.xml"
    run.stage("pytest", [python, "-m", "pytest", "-m", "triton", "tests", "-q", "-p", "no:cacheprovider",
                         # CPU-side checks (ahead-of-time compile, the interpreter dry run of this script)
                         "--deselect", "tests/test_triton_inspect.py", "--deselect", "tests/test_gpu_run.py",
                         f"--junitxml={junit}"], 150, env)
    folder = args.out / "sweep"
    run.stage("sweep", [python, "bench/gpu_suite.py", "--out", str(folder), "--skip-tests", "--skip-ops", "--cases",
                        "fk_stats", "--shapes", TARGET, "--sweep", "--repeats", "5"], 90, env)
    gpu_suite_rows(run, "sweep", folder)
    ncu = shutil.which("ncu") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/ncu")), None)
    if ncu:
        sections = [arg for name in NCU_SECTIONS for arg in ("--section", name)]
        run.stage("ncu", [ncu, "--kernel-name", "regex:_stats_kernel|_grad_kernel", "--launch-skip", "2",
                          "--launch-count", "2", *sections, python, "bench/gpu_checks.py", "kernels_for_profiler",
                          str(args.out / "ncu-records.jsonl")], 120, env)
    else:
        run.record(stage="ncu", status="skipped", reason="ncu not found")
    run.record(stage="done", status="ok", seconds=round(time.time() - run.start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
