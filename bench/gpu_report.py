"""Turn the records of GPU runs (bench/gpu_run.py's results.jsonl) into the committed evidence.

    python bench/gpu_report.py RUN.jsonl [RUN.jsonl ...] --name gpu-h200-2026-11-28 [--dir bench/results]

Writes ``NAME.json`` (the device, versions, every goal's number and the records it came from),
``NAME.md`` (the same as tables) and ``NAME.png`` (policy-loss step times). When several runs are
given, a later run's number replaces an earlier one's; each number keeps the run it came from.
Goals are those of the GPU path (docs/gpu.md): they are stated for an H100, and every number here is
labelled with the card that gave it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET = "N = 8192, V = 151936, bf16"
LM_HEAD = "H = 4096, V = 128256, N = 8192, bf16"
GOAL_FIELDS = ("goal", "target_h100", "measured", "met", "run")
CHECK_FIELDS = ("section", "passed", "failed", "failures", "run")
# fastrl-bench's "liger" runs Liger's GRPO loss with its gradient written over the logits
SUITE_LABELS = {"liger": "liger, inplace=True"}


def load(paths: list) -> dict:
    """The latest record of each kind across the runs, keyed by what it measures."""
    found: dict = {"checks": {}, "stages": {}, "policy_suite": {}, "core": {}, "sweep": []}
    for run, path in enumerate(paths, 1):
        sweep = []
        for line in Path(path).read_text().splitlines():
            record = {**json.loads(line), "run": run}
            stage, section = record.get("stage"), record.get("section")
            if stage == "env":
                found["env"] = record
            elif section is not None and "check" in record:
                found["checks"][(section, record["check"])] = record
            elif stage == "policy_suite" and "measurement" in record:
                found["policy_suite"][record["measurement"]["impl"]] = {**record["measurement"], "run": run}
            elif stage and stage.startswith("core:") and "measurement" in record:
                found["core"][record["measurement"]["case"]] = {**record["measurement"], "run": run}
            elif stage == "sweep" and "measurement" in record and "kernel" in record["measurement"]:
                sweep.append({**record["measurement"], "run": run})
            elif stage and "status" in record:
                found["stages"][stage] = record
        found["sweep"] = sweep or found["sweep"]
    return found


def _check(found: dict, section: str, prefix: str):
    hits = [r for (s, c), r in found["checks"].items() if s == section and c.startswith(prefix)]
    return hits[-1] if hits else None


def goals(found: dict) -> list:
    """(goal, target on an H100, measured, met, run) rows; measured None where the run had no number."""
    rows = []
    prim = _check(found, "breakdown", "primitives")
    if prim:
        share = prim["stats_GBps"] / prim["copy_GBps"]
        rows.append(("token_logprobs forward (stats kernel), " + TARGET, "<= 0.9 ms and >= 92% of copy bandwidth",
                     f"{prim['stats_ms']:.3f} ms, {100 * share:.0f}% of copy ({prim['copy_GBps']:.0f} GB/s)",
                     prim["stats_ms"] <= 0.9 and share >= 0.92, prim["run"]))
    step = _check(found, "breakdown", "policy_loss N=")
    if step and prim:
        floor = 3 * step["logits_gb"] / prim["copy_GBps"] * 1e3
        rows.append(("policy_loss fwd+bwd, 40% masked, " + TARGET, "<= 1.1x the 3-pass floor at copy bandwidth",
                     f"{step['fwd_bwd_ms']:.3f} ms = {step['fwd_bwd_ms'] / floor:.2f}x the floor ({floor:.2f} ms)",
                     step["fwd_bwd_ms"] <= 1.1 * floor, step["run"]))
    suite = found["policy_suite"]
    ours = suite.get("ours[triton]")
    for peer, label, need in (("naive", "naive eager", 10.0),):
        if ours and peer in suite:
            ratio = suite[peer]["time_ms"] / ours["time_ms"]
            rows.append((f"policy_loss fwd+bwd vs {label}", f">= {need:g}x faster",
                         f"{ratio:.1f}x ({suite[peer]['time_ms']:.2f} vs {ours['time_ms']:.3f} ms)", ratio >= need,
                         ours["run"]))
    core = found["core"]
    if step:  # the breakdown and gpu_suite's peer cases share one timer (CUDA events around each call)
        for case, label in (("liger_grpo", "Liger triton_grpo_loss inplace=False"),
                            ("liger_grpo_inplace", "Liger triton_grpo_loss inplace=True")):
            if case in core and core[case].get("status") == "ok":
                ratio = core[case]["time_ms"] / step["fwd_bwd_ms"]
                rows.append((f"policy_loss fwd+bwd vs {label}", ">= 1.5x faster",
                             f"{ratio:.2f}x ({core[case]['time_ms']:.3f} vs {step['fwd_bwd_ms']:.3f} ms)",
                             ratio >= 1.5, core[case]["run"]))
    inplace = _check(found, "breakdown", "policy_loss inplace_grad")
    if step:
        rows.append(("policy_loss peak extra memory", "one bf16 N x V buffer",
                     f"{step['peak_extra_gb']:.3f} GB (logits {step['logits_gb']:.3f} GB)",
                     step["peak_extra_gb"] <= step["logits_gb"] * 1.01, step["run"]))
    if inplace:
        rows.append(("policy_loss peak extra memory, inplace_grad", "zero N x V buffers",
                     f"{inplace['peak_extra_gb'] * 1e3:.1f} MB", inplace["peak_extra_gb"] < 0.01, inplace["run"]))
    head = _check(found, "lm_head", "lm_head")
    if head:
        rows.append(("linear_policy_loss fwd+bwd, " + LM_HEAD, "<= 1.25x the three bare GEMMs",
                     f"{head['linear_policy_loss_fwd_bwd_ms']:.1f} ms = {head['ratio_to_gemms']:.2f}x "
                     f"({head['three_gemms_ms']:.1f} ms)", head["ratio_to_gemms"] <= 1.25, head["run"]))
        share = head["peak_extra_gb_ours"] / head["peak_extra_gb_naive"]
        rows.append(("linear_policy_loss peak extra memory", "<= 1/4 of naive",
                     f"{head['peak_extra_gb_ours']:.2f} GB = {share:.2f} of naive "
                     f"({head['peak_extra_gb_naive']:.2f} GB)",
                     share <= 0.25, head["run"]))
    return rows


def correctness(found: dict) -> list:
    """(section, passed, failed, failures) per checked section, and the pytest stage's summary."""
    by_section: dict = {}
    for (section, check), record in found["checks"].items():
        if check == "section done" or "ok" not in record or record.get("skipped"):
            continue
        entry = by_section.setdefault(section, [0, 0, [], record["run"]])
        entry[0 if record["ok"] else 1] += 1
        if not record["ok"]:
            entry[2].append(check)
    rows = [(section, *entry) for section, entry in sorted(by_section.items())]
    pytest_stage = found["stages"].get("pytest")
    if pytest_stage:
        rows.append(("pytest -m triton", pytest_stage.get("tail", [""])[-1], pytest_stage["status"], [],
                     pytest_stage["run"]))
    return rows


def write(found: dict, name: str, folder: Path, sources: list, notes: str = "") -> None:
    env = found.get("env", {})
    card = env.get("device", "unknown device")
    goal_rows, check_rows = goals(found), correctness(found)
    summary = {"device": card, "env": env, "sources": sources,
               "goals": [dict(zip(GOAL_FIELDS, row)) for row in goal_rows],
               "correctness": [dict(zip(CHECK_FIELDS, row)) for row in check_rows],
               "policy_suite": found["policy_suite"], "core": found["core"], "sweep": found["sweep"],
               "breakdown": {c: r for (s, c), r in found["checks"].items() if s in ("breakdown", "lm_head")}}
    (folder / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [f"# GPU run: {card}, {env.get('date', '?')[:10]}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"python {env.get('python')}; nvidia-smi: `{(env.get('nvidia_smi') or ['', '?'])[-1]}`.", "",
             f"Records: {', '.join(f'run {i}: `{s}`' for i, s in enumerate(sources, 1))} "
             "(bench/gpu_run.py; times are medians of CUDA-event timings, 10 repeats unless the record says "
             "otherwise). Goals are stated for an H100; every number below was measured on the card named above.",
             "", "## Goals", "", "| goal | target (H100) | measured | met | run |", "|---|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {'yes' if ok else 'no'} | {r} |" for g, t, m, ok, r in goal_rows]
    lines += ["", "## policy_loss fwd+bwd, " + TARGET + ", 40% masked tokens", "",
              "| implementation | ms | peak extra MB | run |", "|---|---|---|---|"]
    for impl, row in sorted(found["policy_suite"].items(), key=lambda kv: kv[1]["time_ms"]):
        label, extra_mb = SUITE_LABELS.get(impl, impl), row["peak_extra_bytes"] / 2**20
        lines.append(f"| {label} (fastrl-bench) | {row['time_ms']:.3f} | {extra_mb:.0f} | {row['run']} |")
    for case, row in sorted(found["core"].items(), key=lambda kv: kv[1].get("time_ms") or 1e9):
        if row.get("status") == "ok":
            lines.append(f"| {case} (gpu_suite) | {row['time_ms']:.3f} | {row['peak_extra_mb']:.0f} | {row['run']} |")
    lines += ["", "## Correctness on the GPU", "", "| section | passed | failed | failures | run |",
              "|---|---|---|---|---|"]
    lines += [f"| {s} | {p} | {f} | {', '.join(x) or '-'} | {r} |" for s, p, f, x, r in check_rows]
    if found["sweep"]:
        lines += ["", "## Launch sweep (" + TARGET + ")", "", "| kernel | block_v | warps | ms | default | run |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['block_v']} | {r['num_warps']} | {r['ms']:.3f} | "
                  f"{'yes' if r['is_default'] else ''} | {r['run']} |" for r in found["sweep"]]
    if notes:
        lines += ["", "## Notes", "", notes.strip()]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(found, card, folder / f"{name}.png")


def _plot(found: dict, card: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # each bar names its harness: fastrl-bench's runner, gpu_suite's cases, gpu_checks' breakdown
    bars = {f"{SUITE_LABELS.get(impl, impl)} [runner]": row["time_ms"] for impl, row in found["policy_suite"].items()}
    bars.update({f"{case} [gpu_suite]": row["time_ms"] for case, row in found["core"].items()
                 if row.get("status") == "ok" and case.startswith(("liger", "torch_compile"))})
    for prefix, label in (("policy_loss N=", "ours[triton] [breakdown]"),
                          ("policy_loss inplace_grad", "ours[triton]+inplace [breakdown]")):
        record = _check(found, "breakdown", prefix)
        if record:
            bars[label] = record["fwd_bwd_ms"]
    if not bars:
        return
    names = sorted(bars, key=bars.get)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    ax.barh(names, [bars[n] for n in names], color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("ms per policy-loss forward + backward (log scale)")
    ax.set_title(f"{card}: {TARGET}, 40% masked")
    for i, n in enumerate(names):
        ax.text(bars[n], i, f" {bars[n]:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="results.jsonl of each run, oldest first")
    parser.add_argument("--name", required=True, help="file stem, e.g. gpu-h200-2026-11-28")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--notes", type=Path, help="markdown appended as the report's Notes section")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    notes = args.notes.read_text() if args.notes else ""
    write(load(args.runs), args.name, args.dir, [str(p) for p in args.runs], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
