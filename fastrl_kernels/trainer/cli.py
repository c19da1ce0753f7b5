"""``fastrl-train {grpo,ppo,dpo}``: train the tiny model on a built-in task; see ``--help``.

Writes ``DIR/log.jsonl``, ``DIR/summary.json``, ``DIR/curves.png`` and ``DIR/checkpoint.pt``
(``DIR`` = ``--out``, default ``runs/<algo>``); ``--resume DIR`` continues a run to ``--steps``.
Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) it trains data-parallel with DDP: each rank
samples ``--batch-size`` prompts of its own (global batch N x ``--batch-size``), rank 0 writes ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch

from ..backends import PRIMITIVE_BACKENDS
from ..config import BACKENDS
from .algos import ALGOS, TrainConfig
from .kernels import KERNELS
from .tasks import REWARDS, TASKS

# Per-algorithm defaults over TrainConfig's; chosen so each default run finishes in a couple of minutes
# on 2 CPU cores with a clear reward gain.
ALGO_DEFAULTS = {
    "grpo": {},
    "ppo": {"epochs": 2},
    "dpo": {"steps": 60, "batch_size": 32},
}
# Flags that may change when a run is resumed; the others come from the checkpoint.
RESUME_FLAGS = ("steps", "device", "backend")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="fastrl-train",
        description="Train a tiny transformer with GRPO / PPO / DPO on a built-in verifiable task.",
    )
    p.add_argument("algo", choices=ALGOS)
    p.add_argument("--steps", type=int, help=f"total RL steps (default {d.steps}; dpo 60)")
    p.add_argument("--warmup-steps", type=int, help=f"supervised warm-up steps before RL (default {d.warmup_steps})")
    p.add_argument("--group-size", type=int, help=f"samples per prompt (default {d.group_size})")
    p.add_argument("--batch-size", type=int, help=f"prompts per step (default {d.batch_size}; dpo: pairs, 32)")
    p.add_argument("--lr", type=float, help=f"RL learning rate (default {d.lr})")
    p.add_argument("--epochs", type=int, help="optimizer passes over each rollout (default 1; ppo 2)")
    p.add_argument("--kernel", choices=KERNELS, help="fused: the package's losses; naive: plain PyTorch")
    p.add_argument("--backend", choices=BACKENDS, help="backend of the fused ops (default auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--task", choices=TASKS, help=f"default {d.task}")
    p.add_argument("--digits", type=int, help=f"digits per problem, 2..9 (default {d.digits})")
    p.add_argument("--reward", choices=REWARDS, help="exact match, or partial credit per position")
    p.add_argument("--kl-coef", type=float, help=f"KL-to-reference coefficient, k3 (default {d.kl_coef})")
    p.add_argument("--clip-eps", type=float, help=f"PPO ratio clip (default {d.clip_eps})")
    p.add_argument("--beta", type=float, help=f"DPO beta (default {d.beta})")
    p.add_argument("--temperature", type=float, help="sampling (and log-prob) temperature (default 1.0)")
    p.add_argument("--vocab-pad", type=int, help="pad the vocabulary to this size (shows the loss memory)")
    p.add_argument("--d-model", type=int, help=f"default {d.d_model}")
    p.add_argument("--layers", type=int, help=f"default {d.layers}")
    p.add_argument("--heads", type=int, help=f"default {d.heads}")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: the tiny model's ops are too small to gain from more)",
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/<algo>, or the --resume directory)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_problem(cfg: TrainConfig, *, environment: bool = True) -> Optional[str]:
    """The first invalid option of ``cfg`` as one message naming its flag, or None.
    ``environment``: also check what this machine offers (CUDA for --device cuda, the device types of --backend)."""
    positive = ("steps", "batch_size", "group_size", "epochs", "d_model", "layers", "heads")
    for name in positive:
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(cfg, name)}"
    if cfg.warmup_steps < 0:
        return f"--warmup-steps: expected an integer >= 0, got {cfg.warmup_steps}"
    for name in ("lr", "temperature", "beta"):
        if not getattr(cfg, name) > 0:
            return f"--{name}: expected a number > 0, got {getattr(cfg, name)}"
    if cfg.kl_coef < 0 or cfg.clip_eps < 0:
        return f"--kl-coef / --clip-eps: expected numbers >= 0, got {cfg.kl_coef} / {cfg.clip_eps}"
    if cfg.algo == "grpo" and cfg.group_size < 2:
        return f"--group-size: GRPO compares samples within a group, expected >= 2, got {cfg.group_size}"
    if not 2 <= cfg.digits <= 9:
        return f"--digits: expected 2..9, got {cfg.digits}"
    if cfg.d_model % cfg.heads:
        return f"--d-model: expected a multiple of --heads={cfg.heads}, got {cfg.d_model}"
    if cfg.vocab_pad < 0:
        return f"--vocab-pad: expected an integer >= 0, got {cfg.vocab_pad}"
    if not environment:
        return None
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available to this torch build; use --device cpu"
    spec = PRIMITIVE_BACKENDS.get(cfg.backend)
    if spec is not None and spec.devices is not None and cfg.device not in spec.devices:
        return f"--backend {cfg.backend}: expected --device {' or '.join(spec.devices)} ({spec.note})"
    return None


def _check(p: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    problem = config_problem(cfg)
    if problem:
        p.error(problem)


def _refuse_checkpoint(p: argparse.ArgumentParser, message: str) -> None:
    # One line, no usage text: the flags were fine, the file is not.
    p.exit(2, f"{p.prog}: error: {message}\n")


def resolve(p: argparse.ArgumentParser, args: argparse.Namespace):
    """(TrainConfig, resume state or None, output directory) from the parsed flags."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    state = None
    if args.resume is not None:
        from .checkpoint import CheckpointError, check_compatible, checkpoint_file, load_checkpoint

        file = checkpoint_file(args.resume)
        try:
            state = load_checkpoint(args.resume)
            saved = TrainConfig(**state["config"])
            problem = config_problem(saved, environment=False)
            if problem:
                raise CheckpointError(f"--resume: {file}: invalid saved option {problem}")
            if saved.algo != args.algo:
                raise CheckpointError(f"--resume: {file} holds a {saved.algo} run, not {args.algo}")
            check_compatible(state, saved, file)
        except CheckpointError as exc:
            _refuse_checkpoint(p, str(exc))
        ignored = sorted(set(given) - set(RESUME_FLAGS) - {"algo"})
        if ignored:
            print(f"fastrl-train: resuming, so {ignored} come from the checkpoint", file=sys.stderr)
        cfg = TrainConfig(**{**saved.to_dict(), **{k: v for k, v in given.items() if k in RESUME_FLAGS}})
        if cfg.steps <= state["step"]:
            p.error(f"--steps: the checkpoint is at step {state['step']}; expected a larger total, got {cfg.steps}")
    else:
        cfg = TrainConfig(**{**ALGO_DEFAULTS[args.algo], **given})
    _check(p, cfg)
    # A checkpoint file (not a run directory) resumes into the folder that holds it.
    resumed_into = None if args.resume is None else (args.resume if args.resume.is_dir() else args.resume.parent)
    out = args.out or resumed_into or Path("runs") / cfg.algo
    return cfg, state, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected an integer >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.save_every < 0:
        p.error(f"--save-every: expected an integer >= 0, got {args.save_every}")
    cfg, state, out = resolve(p, args)
    from .dist import init_from_env, shutdown
    from .run import run

    ctx = init_from_env(cfg.device)
    try:
        summary = run(
            cfg, out, resume_state=state, progress=not args.no_progress, save_every=args.save_every, ctx=ctx
        )
    except RuntimeError as exc:  # e.g. --kernel fused without the package's ops, a backend not built
        print(f"fastrl-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return 130 if summary["status"] == "interrupted" else 0
    keys = ("status", "steps_done", "wall_s", "reward_first10", "reward_last10", "reward_gain", "loss_peak_bytes_max")
    print(json.dumps({k: summary.get(k) for k in keys}))
    print(f"fastrl-train: wrote {out}/log.jsonl, summary.json, curves.png, checkpoint.pt", file=sys.stderr)
    return 130 if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
