"""The one-command GPU run (bench/gpu_run.py) cannot rot: its dry run executes every correctness stage
on CPU (Triton interpreter, tiny shapes) and must leave a complete, passing record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")
pytestmark = pytest.mark.triton

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_records_every_correctness_stage_and_every_check_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-u", "bench/gpu_run.py", "--dry-run", "--out", str(tmp_path),
                             "--budget", "600"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    stages = {r["stage"]: r for r in records if "stage" in r}
    assert stages["env"]["torch"] and stages["env"]["commit"]
    for stage in ("rows_past_2_31", "ops", "no_sync_step"):
        assert stages[stage]["status"] == "ok", stages[stage]
    checks = [r for r in records if "check" in r]
    failed = [r for r in checks if not r["ok"]]
    assert not failed, failed
    sections = {r["section"] for r in checks if r["check"] == "section done"}
    assert sections == {"rows_past_2_31", "ops", "no_sync_step"}
    # Every public op that takes a backend is compared, forward and gradients.
    names = {r["check"].split(" ")[0] for r in checks if r["section"] == "ops"}
    assert {"token_logprobs", "policy_loss", "fused_dpo_loss", "linear_token_logprobs", "linear_policy_loss",
            "linear_dpo_loss"} <= names
    assert any(r["check"].endswith("grad z") for r in checks)
    assert (tmp_path / "run.log").read_text().count("=====") == 3


def test_every_peer_case_the_run_names_is_registered():
    """A renamed or dropped case would cost a GPU session a stage: the names must match on the CPU."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_run
    import gpu_suite

    registered = {case.name for case in gpu_suite.CASES}
    assert set(gpu_run.CORE_CASES) <= registered, set(gpu_run.CORE_CASES) - registered
    assert "fk_stats" in registered  # the sweep stage's case


def test_skip_leaves_a_stage_out_with_a_record(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_run

    run = gpu_run.Run(tmp_path, budget=60, dry_run=True, skip={"core"})
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert run.stage("core:liger_grpo", failing, 30, dict(os.environ)) == (None, "")
    rc, _ = run.stage("ops", [sys.executable, "-c", "print('ran')"], 30, dict(os.environ))
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert records[0]["stage"] == "core:liger_grpo" and records[0]["status"] == "skipped"
    assert rc == 0 and records[1]["status"] == "ok"
