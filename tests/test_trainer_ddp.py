"""The reference trainer data-parallel on CPU (DDP over gloo): a torchrun CLI run, the global-batch
gradient, and resume retracing an uninterrupted 2-rank run."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastrl_kernels.trainer.algos import TrainConfig, Trainer
from fastrl_kernels.trainer.dist import DistContext
from fastrl_kernels.trainer.kernels import package_api
from fastrl_kernels.trainer.run import load_checkpoint, read_log, run

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

try:
    package_api()
    KERNELS = ["naive", "fused"]
except Exception:  # the fused ops not importable: the naive loss still checks the distributed path
    KERNELS = ["naive"]

FLAGS = ["--kernel", "naive", "--task", "copy", "--digits", "3", "--d-model", "32", "--layers", "1",
         "--batch-size", "4", "--group-size", "4", "--warmup-steps", "5", "--threads", "1", "--no-progress",
         "--save-every", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fastrl_kernels.trainer.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_torchrun_grpo_writes_rank0_outputs_and_keeps_ranks_in_sync(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun("grpo", "--steps", "4", "--out", str(out), *FLAGS)
    assert proc.stdout.count('"status": "finished"') == 1  # only rank 0 prints the summary line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "log.jsonl", "summary.json"]
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3, 4]
    state = load_checkpoint(out)
    assert state["step"] == 4 and len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0][0], state["rank_rng"][1][0])  # ranks sample differently
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 4
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    digests = summary["param_sha1_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical weights after training


# -- one GRPO update: 2 ranks x half the batch == 1 process x the whole batch --------------------

CFG = dict(algo="grpo", task="copy", digits=3, d_model=32, layers=1, heads=4, batch_size=4, group_size=4,
           warmup_steps=0, reward="partial", seed=0)


class _CaptureGrads:
    """Stands in for the optimizer: keeps the (clipped, DDP-averaged) gradients instead of stepping."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _update(trainer: Trainer, batch) -> tuple:
    trainer.opt = _CaptureGrads(trainer.model.parameters())
    metrics = trainer._grpo_update(*batch)
    return trainer.opt.grads, metrics["loss"]


def _rank_worker(rank: int, world: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = torch.load(Path(folder) / "batch.pt")
        rows = batch[0].shape[0] // world
        half = [x[rank * rows : (rank + 1) * rows] for x in batch]
        results = {}
        for kernel in KERNELS:
            trainer = Trainer(TrainConfig(**CFG, kernel=kernel))
            trainer.warmup()
            trainer.model.load_state_dict(torch.load(Path(folder) / "model.pt"))
            trainer.distribute(DistContext(rank=rank, world=world))
            results[kernel] = _update(trainer, half)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        # Resume: rank 0 saves every rank's random state, every rank loads the checkpoint.
        ctx = DistContext(rank=rank, world=world)
        cfg = TrainConfig(**{**CFG, "kernel": "naive", "warmup_steps": 2, "steps": 5})
        run(cfg, Path(folder) / "full", progress=False, ctx=ctx)
        run(dataclasses.replace(cfg, steps=3), Path(folder) / "part", progress=False, ctx=ctx)
        state = load_checkpoint(Path(folder) / "part")
        run(cfg, Path(folder) / "part", resume_state=state, progress=False, ctx=ctx)
        dist.barrier()  # neither rank tears gloo down while the other may still talk to it
    finally:
        dist.destroy_process_group()


def test_two_rank_gradient_equals_single_process_gradient(tmp_path):
    trainer = Trainer(TrainConfig(**CFG, kernel="naive"))
    trainer.warmup()
    trainer.model.lm_head.weight.data.normal_(std=0.3)  # move the policy off the reference: KL > 0
    batch = trainer._rollout()
    # Unequal token counts per rank (shorter responses on rank 0) make a local token mean differ
    # from the global one: only the global normaliser gives the single-process gradient.
    batch[2][:3, 2:] = False
    counts = batch[2].view(2, -1).sum(1)
    assert counts[0] != counts[1], counts
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(trainer.model.state_dict(), tmp_path / "model.pt")
    init_file = tmp_path / "init"
    mp.spawn(_rank_worker, args=(2, str(init_file), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kernel in KERNELS:
        single = Trainer(TrainConfig(**CFG, kernel=kernel))
        single.warmup()
        single.model.load_state_dict(trainer.model.state_dict())
        single.freeze_reference()
        grads, loss = _update(single, batch)
        for g0, g1, g in zip(ranks[0][kernel][0], ranks[1][kernel][0], grads):
            assert torch.equal(g0, g1)  # DDP's all-reduce leaves one gradient on every rank
            torch.testing.assert_close(g0, g, rtol=1e-5, atol=1e-7)
        # The ranks' losses (local sum / (global count / 2)) average to the global token mean.
        assert (ranks[0][kernel][1] + ranks[1][kernel][1]) / 2 == pytest.approx(loss, rel=1e-5, abs=1e-7)
    # Every rank's random state comes back: the resumed 2-rank run retraces the uninterrupted one.
    rows_full, rows_part = read_log(tmp_path / "full" / "log.jsonl"), read_log(tmp_path / "part" / "log.jsonl")
    assert [r["step"] for r in rows_full] == [1, 2, 3, 4, 5] == [r["step"] for r in rows_part]
    for a, b in zip(rows_full, rows_part):
        assert (a["reward"], a["loss"], a["kl"]) == (b["reward"], b["loss"], b["kl"])
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary["steps_done"] == 5 and len(set(summary["param_sha1_per_rank"])) == 1
