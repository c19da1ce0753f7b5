"""``fastrl-train --resume`` on files that are not a usable checkpoint of this trainer: one line on stderr
naming the file and the problem, exit status 2, nothing written; a good checkpoint still resumes."""

from __future__ import annotations

import random

import pytest
import torch

from fastrl_kernels.trainer.algos import TrainConfig, Trainer
from fastrl_kernels.trainer.cli import main
from fastrl_kernels.trainer.model import TinyGPT, TinyGPTConfig
from fastrl_kernels.trainer.run import load_checkpoint, save_checkpoint

# The smallest model the CLI accepts: building, saving and checking it takes milliseconds.
TINY = dict(algo="grpo", kernel="naive", task="copy", digits=2, d_model=8, layers=1, heads=2, batch_size=2,
            group_size=2, warmup_steps=0, steps=3)
CODE_RAN = []  # set by _Payload if unpickling ever ran code from a file


def _mark_code_ran(*args):
    CODE_RAN.append(args)


class _Payload:
    """Unpickling this calls ``_mark_code_ran``: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_mark_code_ran, ("ran",))


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    # main() sets torch's intra-op threads (--threads, default 1); later test files keep their own.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def good_state(tmp_path_factory) -> dict:
    """A real checkpoint after one RL step (so the optimizer holds AdamW moments), as written by the trainer."""
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**TINY))
    trainer.freeze_reference()
    trainer.train_step()
    folder = tmp_path_factory.mktemp("good")
    save_checkpoint(trainer, folder)
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def _tiny_model_state(**kw) -> dict:
    cfg = dict(vocab_size=17, context=7, d_model=8, n_layers=1, n_heads=2)
    return TinyGPT(TinyGPTConfig(**{**cfg, **kw})).state_dict()


def _with(state: dict, **changes) -> dict:
    return {**state, **changes}


def _config(state: dict, **changes) -> dict:
    return _with(state, config={**state["config"], **changes})


def _resized_optimizer(state: dict) -> dict:
    opt = state["optimizer"]
    moments = {i: {**m, "exp_avg": torch.zeros(3, 3)} for i, m in opt["state"].items()}
    return _with(state, optimizer={**opt, "state": moments})


def _fewer_params(state: dict) -> dict:
    opt = state["optimizer"]
    groups = [{**g, "params": g["params"][:-1]} for g in opt["param_groups"]]
    return _with(state, optimizer={**opt, "param_groups": groups})


def _bytes(make_bytes):
    """Writer of bytes made from the good checkpoint's bytes."""
    return lambda file, state, data: file.write_bytes(make_bytes(data))


def _saved(make_state):
    """Writer of a torch file of an object made from the good checkpoint's state."""
    return lambda file, state, data: torch.save(make_state(state), file)


# name -> (writes the file from the good checkpoint's bytes / state, text the message must hold)
BAD_FILES = {
    "truncated half": (_bytes(lambda b: b[: len(b) // 2]), "not a readable torch checkpoint"),
    "truncated to 10 bytes": (_bytes(lambda b: b[:10]), "not a readable torch checkpoint"),
    "empty": (_bytes(lambda b: b""), "not a readable torch checkpoint"),
    "random bytes": (_bytes(lambda b: random.Random(0).randbytes(4096)), "or is corrupt"),
    "zero bytes": (_bytes(lambda b: bytes(4096)), "not a readable torch checkpoint"),
    "pickled code": (_saved(lambda s: {**s, "extra": _Payload()}), "runs no code"),
    "plain tensor": (_saved(lambda s: torch.zeros(3)), "not a fastrl-train checkpoint: expected a dict"),
    "list of tensors": (_saved(lambda s: [torch.zeros(3)]), "got list"),
    "another model's state dict": (_saved(lambda s: torch.nn.Linear(4, 2).state_dict()), "missing keys"),
    "a bare TinyGPT state dict": (_saved(lambda s: _tiny_model_state()), "missing keys ['config'"),
    "no optimizer": (_saved(lambda s: {k: v for k, v in s.items() if k != "optimizer"}), "missing keys ['optimizer']"),
    "no reference model": (_saved(lambda s: _with(s, ref=None)), "ref: expected dict, got NoneType"),
    "config not a dict": (_saved(lambda s: _with(s, config=[1, 2])), "config: expected dict, got list"),
    "unknown config field": (_saved(lambda s: _config(s, hidden_size=8)), "config: unknown fields ['hidden_size']"),
    "config field of the wrong type": (_saved(lambda s: _config(s, digits="2")), "config.digits: expected int"),
    "unknown task": (_saved(lambda s: _config(s, task="chess")), "config.task: expected one of"),
    "invalid config value": (_saved(lambda s: _config(s, d_model=-8)), "invalid saved option --d-model"),
    "step as float": (_saved(lambda s: _with(s, step=1.5)), "step: expected int, got float"),
    "negative step": (_saved(lambda s: _with(s, step=-1)), "step: expected an integer >= 0"),
    "weights not tensors": (_saved(lambda s: _with(s, model={"tok_emb.weight": [0.0]})), "model: expected a state"),
    "torch_rng of another shape": (_saved(lambda s: _with(s, torch_rng=torch.zeros(4, dtype=torch.uint8))),
                                   "torch_rng: expected"),
    "task_rng not a random state": (_saved(lambda s: _with(s, task_rng=(1, 2))), "task_rng: not a random.Random"),
    "weights of a wider model": (_saved(lambda s: _with(s, model=_tiny_model_state(d_model=16))),
                                 "model.tok_emb.weight: expected shape [17, 8], got [17, 16]"),
    "weights of a deeper model": (_saved(lambda s: _with(s, ref=_tiny_model_state(n_layers=2))),
                                  "unexpected weights ['blocks.1."),
    "weights with a value head": (_saved(lambda s: _with(s, model=_tiny_model_state(value_head=True))),
                                  "unexpected weights ['value.weight'"),
    "weights of a larger vocabulary": (_saved(lambda s: _config(s, vocab_pad=64)), "expected shape [64, 8]"),
    "optimizer moments of another size": (_saved(_resized_optimizer), "exp_avg: expected shape"),
    "optimizer over fewer parameters": (_saved(_fewer_params), "optimizer: expected one parameter group"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_resume_refuses_a_bad_checkpoint_in_one_line(name, good_state, tmp_path, capsys):
    write, expected = BAD_FILES[name]
    good = tmp_path / "good.pt"
    torch.save(good_state, good)
    data = good.read_bytes()
    good.unlink()
    file = tmp_path / "checkpoint.pt"
    write(file, good_state, data)
    with pytest.raises(SystemExit) as exc:
        main(["grpo", "--steps", "5", "--resume", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"fastrl-train: error: --resume: {file}") and expected in err, err
    assert not CODE_RAN  # weights_only=True: the file's pickle never ran code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # refused before writing anything


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_refuses_missing_paths(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    err = _refused(["grpo", "--resume", str(missing), "--no-progress"], capsys)
    assert f"--resume: {missing}: no such file or directory" in err
    assert not missing.exists()
    err = _refused(["grpo", "--resume", str(tmp_path), "--no-progress"], capsys)
    assert f"--resume: no checkpoint.pt in {tmp_path}" in err


def test_resume_refuses_another_algorithms_run(good_state, tmp_path, capsys):
    torch.save(good_state, tmp_path / "checkpoint.pt")
    err = _refused(["dpo", "--steps", "5", "--resume", str(tmp_path), "--no-progress"], capsys)
    assert f"--resume: {tmp_path / 'checkpoint.pt'} holds a grpo run, not dpo" in err


def test_good_checkpoint_resumes_from_its_file_or_its_folder(good_state, tmp_path, capsys):
    file = tmp_path / "checkpoint.pt"
    torch.save(good_state, file)
    # A checkpoint file resumes into its own folder; flags other than --steps/--device/--backend are ignored.
    assert main(["grpo", "--steps", "2", "--resume", str(file), "--lr", "1", "--no-progress"]) == 0
    assert "resuming, so ['lr'] come from the checkpoint" in capsys.readouterr().err
    assert load_checkpoint(file)["step"] == 2
    assert main(["grpo", "--steps", "3", "--resume", str(tmp_path), "--no-progress"]) == 0
    state = load_checkpoint(tmp_path)
    assert state["step"] == 3 and state["config"] == good_state["config"]
    assert {"log.jsonl", "summary.json", "checkpoint.pt"} <= {p.name for p in tmp_path.iterdir()}
