"""bench/gpu_report.py turns a GPU run's records into the committed tables: each goal's number is the
record's, labelled with its run, and a later run's record replaces an earlier one's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_report  # noqa: E402


def _records(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ENV = {"stage": "env", "status": "ok", "device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
       "date": "2026-11-28T01:05:33Z"}
PRIMITIVES = {"section": "breakdown", "check": "primitives N=8192 V=151936 bf16", "ok": True, "stats_ms": 1.0,
              "copy_GBps": 4000.0, "stats_GBps": 2500.0}
STEP = {"section": "breakdown", "check": "policy_loss N=8192 V=151936 bf16, 40% masked", "ok": True,
        "fwd_ms": 2.0, "fwd_bwd_ms": 3.0, "peak_extra_gb": 2.49, "logits_gb": 2.49}


def test_goals_take_the_records_numbers_and_a_later_run_wins(tmp_path):
    first = _records(tmp_path / "a.jsonl", [ENV, PRIMITIVES, STEP])
    faster = {**PRIMITIVES, "stats_ms": 0.7, "stats_GBps": 3700.0}
    second = _records(tmp_path / "b.jsonl", [ENV, faster])
    rows = {goal: row for goal, *row in gpu_report.goals(gpu_report.load([first]))}
    stats = rows["token_logprobs forward (stats kernel), N = 8192, V = 151936, bf16"]
    assert stats[1].startswith("1.000 ms, 62% of copy") and stats[2] is False and stats[3] == 1
    floor = 3 * 2.49 / 4000.0 * 1e3
    assert rows["policy_loss fwd+bwd, 40% masked, N = 8192, V = 151936, bf16"][1].startswith(
        f"3.000 ms = {3.0 / floor:.2f}x the floor")
    rows = {goal: row for goal, *row in gpu_report.goals(gpu_report.load([first, second]))}
    stats = rows["token_logprobs forward (stats kernel), N = 8192, V = 151936, bf16"]
    assert stats[1].startswith("0.700 ms, 92% of copy") and stats[2] is True and stats[3] == 2


def test_failed_checks_are_listed_by_name(tmp_path):
    bad = {"section": "ops", "check": "policy_loss bf16 output 0", "ok": False, "error": "out of tolerance"}
    good = {"section": "ops", "check": "policy_loss bf16 grad z", "ok": True}
    run = _records(tmp_path / "a.jsonl", [ENV, bad, good, {"section": "ops", "check": "section done", "ok": True}])
    rows = gpu_report.correctness(gpu_report.load([run]))
    assert rows == [("ops", 1, 1, ["policy_loss bf16 output 0"], 1)]


def test_report_files_are_written(tmp_path):
    run = _records(tmp_path / "a.jsonl", [ENV, PRIMITIVES, STEP])
    gpu_report.main([str(run), "--name", "gpu-test", "--dir", str(tmp_path)])
    summary = json.loads((tmp_path / "gpu-test.json").read_text())
    assert summary["device"] == "NVIDIA H200" and len(summary["goals"]) == 3
    assert "| token_logprobs forward" in (tmp_path / "gpu-test.md").read_text()
