"""The reference trainer: tasks, model, naive formulas, GRPO/PPO/DPO improve, fused == naive, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import statistics

import pytest
import torch

from fastrl_kernels.trainer import naive
from fastrl_kernels.trainer import tasks as T
from fastrl_kernels.trainer.algos import TrainConfig, Trainer
from fastrl_kernels.trainer.cli import main
from fastrl_kernels.trainer.kernels import LossStepMemory, package_api
from fastrl_kernels.trainer.model import TinyGPT, TinyGPTConfig
from fastrl_kernels.trainer.run import load_checkpoint, read_log, run

try:
    package_api()
    HAVE_API, WHY = True, ""
except Exception as exc:  # any import failure of the ops means the fused path cannot run
    HAVE_API, WHY = False, f"fastrl_kernels ops not importable yet: {exc}"
needs_api = pytest.mark.skipif(not HAVE_API, reason=WHY)

# Small, quick settings shared by the run tests (seconds each on 2 cores).
# The copy task learns fastest; the warm-up stops at a 0.1 sampled reward, so RL starts low but non-zero.
QUICK = dict(task="copy", digits=3, d_model=64, layers=1, heads=4, batch_size=8, group_size=8, warmup_steps=150,
             warmup_lr=1e-2, lr=3e-3, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # As the CLI's default: the tiny model's ops gain nothing from threads, and lose a lot when cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{**QUICK, **kw})


# -- tasks and model ------------------------------------------------------------------------------


def test_problems_rewards_and_masks():
    rng = random.Random(0)
    assert T.make_problem("S", "3142") == T.Problem("S3142=", "1234")
    assert T.make_problem("R", "3142").answer == "2413"
    assert T.make_problem("D", "99").answer == "18"
    assert T.make_problem("C", "05").answer == "05"
    problems = T.sample_problems("mix", 4, 50, rng)
    assert {p.prompt[0] for p in problems} == set("CRSD") and all(len(p.prompt) == 6 for p in problems)
    assert T.score("1234", "1234") == 1.0 and T.score("1235", "1234") == 0.0
    assert T.score("1235", "1234", "partial") == 0.75 and T.score("", "12", "partial") == 0.0
    wrong = T.corrupt("1234", rng)
    assert wrong != "1234" and len(wrong) == 4
    tok = T.CharTokenizer()
    assert tok.decode(tok.encode("S12=")) == "S12=" and tok.decode([len(tok)]) == "?"
    seq = torch.tensor([tok.encode("S21=12._"), tok.encode("S21=1.2.")])
    targets, mask = T.split_response(tok, seq, 4)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    rewards = T.rewards_for(tok, seq, 4, [T.make_problem("S", "21")] * 2, "exact")
    assert rewards.tolist() == [1.0, 0.0]


def test_model_hidden_lm_head_and_generate():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab_size=40, context=10, d_model=32, n_heads=4, value_head=True))
    tokens = torch.randint(0, 40, (3, 7))
    hidden = model.hidden(tokens)
    assert hidden.shape == (3, 7, 32)
    torch.testing.assert_close(model(tokens), hidden @ model.lm_head.weight.T)
    assert model.values(hidden).shape == (3, 7)
    # Causal: a later token does not change earlier outputs.
    other = tokens.clone()
    other[:, -1] = (other[:, -1] + 1) % 40
    torch.testing.assert_close(model(other)[:, :-1], model(tokens)[:, :-1])
    out = model.generate(tokens[:, :4], 6, eos_id=1, pad_id=0, temperature=1.0)
    assert out.shape == (3, 10) and torch.equal(out[:, :4], tokens[:, :4])
    for row in out[:, 4:].tolist():
        if 1 in row:
            assert all(t == 0 for t in row[row.index(1) + 1 :])
    assert torch.equal(model.generate(tokens[:, :4], 3, eos_id=1, pad_id=0, temperature=0),
                       model.generate(tokens[:, :4], 3, eos_id=1, pad_id=0, temperature=0))
    with pytest.raises(ValueError, match="context"):
        model.hidden(torch.zeros(1, 11, dtype=torch.long))


# -- naive formulas -------------------------------------------------------------------------------


def test_naive_formulas_by_hand():
    adv = naive.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    # gamma = lam = 1, one masked tail step: A_t = sum of later rewards - V_t.
    r = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    a, ret = naive.gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(a, torch.tensor([[0.5, 0.75, 0.25, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    vl = naive.value_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]),
                          torch.tensor([1, 1]), clip=0.5)
    assert float(vl) == pytest.approx(0.5 * (1.0 + 9.0) / 2)
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    lp, ent = naive.token_logprobs(logits, targets)
    p = logits.softmax(-1)
    torch.testing.assert_close(lp, p.log().gather(-1, targets[..., None])[..., 0])
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))


def test_loss_step_memory_counts_logits_sized_tensors():
    x = torch.randn(256, 1000, requires_grad=True)
    t = torch.randint(0, 1000, (256,))
    with LossStepMemory(torch.device("cpu")) as mem:
        loss = naive.token_logprobs(x, t)[0].mean()
        torch.autograd.grad(loss, x)
    assert mem.peak >= 2 * x.numel() * 4  # log_softmax output and the gradient at least
    with LossStepMemory(torch.device("cpu")) as small:
        torch.autograd.grad(x[:, 0].sum(), x)
    assert small.peak < mem.peak


# -- runs improve ---------------------------------------------------------------------------------


def _rewards(trainer: Trainer, steps: int, key: str = "reward") -> list:
    return [trainer.train_step()[key] for _ in range(steps)]


def test_grpo_reward_improves():
    trainer = Trainer(quick(algo="grpo", kernel="naive"))
    trainer.warmup()
    r = _rewards(trainer, 30)
    assert statistics.fmean(r[-10:]) > 1.5 * statistics.fmean(r[:10]), r


def test_ppo_reward_improves():
    trainer = Trainer(quick(algo="ppo", kernel="naive", epochs=2))
    trainer.warmup()
    r = _rewards(trainer, 30)
    assert statistics.fmean(r[-10:]) > 1.5 * statistics.fmean(r[:10]), r


def test_dpo_accuracy_and_margin_improve():
    trainer = Trainer(quick(algo="dpo", kernel="naive", lr=1e-3, batch_size=32))
    trainer.warmup()
    rows = [trainer.train_step() for _ in range(12)]
    # The policy starts as the reference: zero implicit rewards, so no pair is ranked right yet.
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6) and rows[0]["accuracy"] == 0.0
    assert statistics.fmean(r["accuracy"] for r in rows[-5:]) > 0.6
    assert statistics.fmean(r["margin"] for r in rows[-5:]) > 0.04


# -- fused kernel == naive kernel ------------------------------------------------------------------


@needs_api
@pytest.mark.parametrize("algo", ["grpo", "ppo", "dpo"])
def test_fused_matches_naive_step_by_step_with_less_memory(algo):
    # A padded vocabulary makes the loss step's [N, V] tensors dominate (as with a real LM head): 256
    # tokens x 4096 is 4 MiB per fp32 copy, above the chunk buffers of the fused torch backend.
    # Partial rewards give non-zero advantages from the untrained model, so no warm-up is needed.
    cfg = quick(algo=algo, kernel="naive", vocab_pad=4096, backend="torch", warmup_steps=0, reward="partial",
                d_model=32, layers=1, batch_size=32 if algo == "dpo" else 8, epochs=2 if algo == "ppo" else 1)
    logs = {}
    for kernel in ("naive", "fused"):
        trainer = Trainer(dataclasses.replace(cfg, kernel=kernel))
        trainer.warmup()
        logs[kernel] = [trainer.train_step() for _ in range(3)]
    for a, b in zip(logs["naive"], logs["fused"]):
        assert a["reward"] == b["reward"]
        for key in ("loss", "kl", "entropy", "margin", "value_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4, rel=1e-4), (key, a, b)
    fused = max(r["loss_peak_bytes"] for r in logs["fused"])
    assert fused < 0.75 * min(r["loss_peak_bytes"] for r in logs["naive"])


# -- CLI ------------------------------------------------------------------------------------------

TINY_FLAGS = ["--kernel", "naive", "--digits", "3", "--d-model", "32", "--layers", "1", "--batch-size", "4",
              "--group-size", "4", "--warmup-steps", "5", "--no-progress", "--save-every", "2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grpo", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["grpo", "--group-size", "1"], "--group-size"),
        (["grpo", "--lr", "-1"], "--lr: expected a number > 0"),
        (["grpo", "--kernel", "fast"], "invalid choice: 'fast'"),
        (["ppo", "--digits", "12"], "--digits: expected 2..9"),
        (["sft"], "invalid choice: 'sft'"),
        (["dpo", "--resume", "/nonexistent/run"], "no checkpoint.pt"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cli_rejects_cuda_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--device", "cuda"])
    assert "--device cuda: no CUDA device" in capsys.readouterr().err


def test_cli_writes_outputs_and_resume_continues(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["grpo", "--steps", "6", "--out", str(full), *TINY_FLAGS]) == 0
    assert main(["grpo", "--steps", "4", "--out", str(part), *TINY_FLAGS]) == 0
    assert load_checkpoint(part)["step"] == 4
    assert main(["grpo", "--steps", "6", "--resume", str(part), "--no-progress"]) == 0
    rows_full, rows_part = read_log(full / "log.jsonl"), read_log(part / "log.jsonl")
    assert [r["step"] for r in rows_part] == [1, 2, 3, 4, 5, 6]
    # Model, optimizer and random state all come back: the resumed run retraces the uninterrupted one.
    for a, b in zip(rows_full, rows_part):
        assert (a["reward"], a["loss"]) == (b["reward"], b["loss"])
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 6
    assert (part / "curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["grpo", "--steps", "6", "--resume", str(part)])
    assert "checkpoint is at step 6" in capsys.readouterr().err


def test_interrupts_leave_a_valid_log(tmp_path, monkeypatch):
    step = Trainer.train_step
    cfg = quick(algo="grpo", kernel="naive", steps=10, warmup_steps=2, d_model=32)

    def stop_at_3(self):
        out = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: finish the step, save, stop
        return out

    monkeypatch.setattr(Trainer, "train_step", stop_at_3)
    summary = run(cfg, tmp_path / "a", progress=False)
    assert summary["status"] == "stopped" and load_checkpoint(tmp_path / "a")["step"] == 3
    assert [r["step"] for r in read_log(tmp_path / "a" / "log.jsonl")] == [1, 2, 3]

    def hard_stop_at_3(self):
        if self.step == 2:
            raise KeyboardInterrupt  # second Ctrl-C arrives inside a step
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", hard_stop_at_3)
    summary = run(cfg, tmp_path / "b", progress=False, save_every=1)
    assert summary["status"] == "interrupted" and summary["steps_done"] == 2
    assert [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl")] == [1, 2]
    assert load_checkpoint(tmp_path / "b")["step"] == 2
    assert (tmp_path / "b" / "summary.json").exists()
