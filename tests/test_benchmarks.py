"""The benchmark suite: its baselines compute what ours computes, its memory probe measures what is
allocated, and ``run_suite`` / ``fastrl-bench`` run end to end on a tiny shape and write valid files.
No assertion on time: benchmarks record numbers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.benchmarks import cases, cli, naive, report, runner
from fastrl_kernels.benchmarks.cases_logits import POLICY_PARAMS, batch_layout, make_logits_inputs


def _case(op: str, name: str, n: int = 48, v: int = 301) -> cases.BenchCase:
    family = cases.families()[op]
    return next(c for c in family.make_cases({"N": n, "V": v}, "float32", "cpu") if c.name == name)


def test_naive_policy_loss_matches_fused_loss_and_gradient():
    case = _case("policy_loss", "policy_loss/fwd+bwd")
    inputs = make_logits_inputs(case, POLICY_PARAMS["temperature"])
    p = POLICY_PARAMS
    logits = inputs["logits"]
    args = (inputs["targets"], inputs["old"], inputs["adv"], inputs["mask"])
    loss, logp, entropy = naive.naive_policy_loss(
        logits, *args, inputs["ref"], temperature=p["temperature"], clip_eps_low=p["clip_eps_low"],
        clip_eps_high=p["clip_eps_high"], kl_coef=p["kl_coef"],
    )
    loss.backward()
    naive_grad, logits.grad = logits.grad.clone(), None
    ours = fk.policy_loss(
        logits, *args, ref_logprobs=inputs["ref"], backend="torch", temperature=p["temperature"],
        clip_eps_low=p["clip_eps_low"], clip_eps_high=p["clip_eps_high"], kl_coef=p["kl_coef"],
        kl_estimator="k3", loss_agg="token-mean",
    )
    ours.loss.backward()
    torch.testing.assert_close(ours.loss, loss, rtol=1e-5, atol=1e-6)
    # Masked tokens are never read by the fused op: 0 there, the naive values elsewhere.
    kept = inputs["mask"].bool()
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(ours.logprobs, torch.where(kept, logp.detach(), 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, torch.where(kept, entropy.detach(), 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, naive_grad, rtol=1e-4, atol=1e-7)
    # The inputs must make the clip matter, or the comparison would not cover it.
    assert 0.0 < float(ours.metrics["clip_frac_low"] + ours.metrics["clip_frac_high"]) < 1.0


def test_naive_token_logprobs_matches_package():
    case = _case("token_logprobs", "token_logprobs/fwd+bwd")
    inputs = make_logits_inputs(case, 1.0)
    logp, entropy = naive.naive_token_logprobs(inputs["logits"].detach(), inputs["targets"], 0.7)
    ours_lp, ours_h = fk.token_logprobs(inputs["logits"].detach(), inputs["targets"], temperature=0.7,
                                        backend="torch")
    torch.testing.assert_close(ours_lp, logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_h, entropy, rtol=1e-5, atol=1e-5)


def test_every_available_step_runs_and_releases_its_gradient():
    for op, name in (("token_logprobs", "token_logprobs/fwd+bwd"), ("policy_loss", "policy_loss/fwd+bwd")):
        case = _case(op, name, n=32, v=257)
        for impl in case.impls:
            if runner.unavailable_reason(impl, "cpu", compile_mode="off"):
                continue
            step = case.setup(case, impl)
            step()
            step()  # twice: a step must be repeatable (inplace variants overwrite their logits)


def test_batch_layout_covers_every_token():
    for n in (1, 48, 256, 4096, 3000, 7):
        batch, seq = batch_layout(n)
        assert batch * seq == n and seq <= 512 and seq & (seq - 1) == 0


def test_cpu_memory_probe_measures_the_peak_of_one_call():
    # In a fresh interpreter: the probe fixes the allocator's mmap threshold for its whole process.
    code = textwrap.dedent("""
        import torch
        from fastrl_kernels.benchmarks import measure
        held = torch.ones(10_000_000)  # inputs: 40 MB, allocated before the baseline, not counted
        def step():
            a = torch.ones(25_000_000)  # 100 MB
            del a
            b = torch.ones(12_500_000)  # 50 MB after the 100 MB was freed: the peak stays 100 MB
            del b
        step()
        print(measure.cpu_peak_extra(step), measure.cpu_peak_extra(lambda: torch.ones(100)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    big, small = (int(x) for x in done.stdout.split())
    assert abs(big - 100e6) < 2e6, big
    assert small < 1e6, small


def test_shape_and_dtype_parsing():
    assert cases.parse_shape("4096x32000") == {"N": 4096, "V": 32000}
    assert cases.parse_shape("4kx896x32000", ("N", "H", "V")) == {"N": 4096, "H": 896, "V": 32000}
    assert cases.canonical_dtype("bf16") == "bfloat16"
    assert cases.parse_ours("ours[native]+inplace") == ("native", True)
    assert cases.parse_ours("naive") is None
    with pytest.raises(ValueError, match="NxV"):
        cases.parse_shape("4096")
    with pytest.raises(ValueError, match="positive integer"):
        cases.parse_shape("0x10")
    with pytest.raises(ValueError, match="dtype"):
        cases.canonical_dtype("int8")


def test_unavailable_implementations_say_why():
    assert "--compile on" in runner.unavailable_reason(cases.NAIVE_COMPILE, "cpu", "auto")
    assert "off" in runner.unavailable_reason(cases.NAIVE_COMPILE, "cpu", "off")
    assert "not available" in runner.unavailable_reason("ours[nonexistent]", "cpu")
    assert runner.unavailable_reason("ours[torch]", "cpu") is None
    assert runner.unavailable_reason(cases.NAIVE, "cpu") is None
    if not torch.cuda.is_available():
        assert "CUDA" in runner.unavailable_reason("liger", "cpu")


def test_run_suite_writes_valid_json_markdown_and_plots(tmp_path):
    rows = runner.run_suite(
        "cpu", ops=["token_logprobs", "policy_loss"], shapes=["16x300"],
        impls=["ours[torch]", "ours[torch]+inplace", "naive-compile"], repeats=1, max_seconds=5.0,
        log=lambda line: None,
    )
    measured = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in measured} == {"naive", "ours[torch]", "ours[torch]+inplace"}
    assert {r["case"] for r in measured} == {"token_logprobs/fwd", "token_logprobs/fwd+bwd", "policy_loss/fwd+bwd"}
    assert not [r for r in rows if r["status"] == "error"]
    assert {r["impl"] for r in rows if r["status"] == "skipped"} == {"naive-compile"}
    for row in measured:
        assert row["time_ms"] > 0 and row["peak_extra_bytes"] is not None and row["gbps"] > 0
        assert row["speedup_vs_naive"] > 0
        if row["impl"] == "naive":
            assert row["speedup_vs_naive"] == 1.0
    meta = runner.environment("cpu", command="pytest")
    json_path = report.write_json(rows, meta, tmp_path / "r.json")
    loaded = json.loads(json_path.read_text())
    assert loaded["meta"]["versions"]["torch"] == torch.__version__
    assert len(loaded["results"]) == len(rows)
    text = report.write_markdown(rows, meta, tmp_path / "r.md").read_text()
    assert "| case | shape |" in text and "policy_loss/fwd+bwd" in text and "Skipped:" in text
    pngs = report.write_plots(rows, meta, tmp_path / "r.png")
    assert sorted(p.name for p in pngs) == ["r_policy_loss.png", "r_token_logprobs.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cli_runs_in_process_and_lists(tmp_path, capsys):
    assert cli.main(["--list"]) == 0
    assert "policy_loss" in capsys.readouterr().out
    out = tmp_path / "cli.json"
    code = cli.main(["--ops", "policy_loss", "--shapes", "16x300,32x300,16x600", "--impls", "ours[torch],liger",
                     "--repeats", "1", "--in-process", "--json", str(out), "--plot", str(tmp_path / "sweep.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "speedup vs naive" in printed
    if not torch.cuda.is_available():
        assert "skip: Liger-Kernel" in printed
    loaded = json.loads(out.read_text())
    assert loaded["meta"]["command"].startswith("fastrl-bench --ops policy_loss")
    assert {r["impl"] for r in loaded["results"] if r["status"] == "ok"} == {"naive", "ours[torch]"}
    assert (tmp_path / "sweep_policy_loss.png").read_bytes()[:4] == b"\x89PNG"
    # Re-rendering from the JSON measures nothing and writes the same kinds of files.
    assert cli.main(["--from-json", str(out), "--markdown", str(tmp_path / "again.md")]) == 0
    assert "ours[torch]" in (tmp_path / "again.md").read_text()


def test_linear_family_runs_through_the_suite():
    family = cases.families()["linear_policy_loss"]
    assert family.shape_keys == ("N", "V", "H")
    rows = runner.run_suite("cpu", ops=["linear_policy_loss"], shapes=["16x300x8", "16x300"], repeats=1,
                            max_seconds=5.0, isolate=False, log=lambda line: None)
    measured = {r["impl"]: r for r in rows if r["status"] == "ok"}
    assert {"naive", "ours[torch]"} <= set(measured), rows
    assert all(r["shape"] == {"N": 16, "V": 300, "H": 8} for r in rows)
    assert measured["naive"]["grad_bytes"] == (16 + 300) * 8 * 4


def test_primitives_family_gradients_equal_the_naive_baseline():
    from fastrl_kernels.benchmarks import cases_primitives
    from fastrl_kernels.core import CoreParams

    case = _case("primitives", "primitives/stats+grad", n=24, v=301)
    case = dataclasses.replace(case, params={"temperature": 0.7, "masked_frac": 0.4})
    x = cases_primitives.make_inputs(case)
    assert 0 < int((x["targets"] == -100).sum()) < 24
    z = x["logits"].clone().requires_grad_(True)
    cases_primitives.naive_loss(z, x["targets"], x["g_lp"], x["g_h"], 0.7).backward()
    params = CoreParams(temperature=0.7)
    for backend in ("torch", "native"):
        ft = cases_primitives._backend(backend)
        got = ft.grad(x["logits"], x["targets"], ft.stats(x["logits"], x["targets"], params), x["g_lp"], x["g_h"],
                      params)
        torch.testing.assert_close(got, z.grad, rtol=1e-4, atol=1e-6)
    for impl in case.impls:
        if not runner.unavailable_reason(impl, "cpu", compile_mode="off"):
            case.setup(case, impl)()
