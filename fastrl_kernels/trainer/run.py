"""A training run on disk: ``log.jsonl`` (one flushed JSON line per step), ``summary.json``,
``curves.png`` and ``checkpoint.pt`` in one directory; resumable; Ctrl-C leaves all of them valid.

The first Ctrl-C finishes the current step, saves and stops; a second one stops at once (the log
keeps every finished step; the checkpoint stays at its last save and ``resume`` drops later lines).
Data-parallel (``ctx`` of ``trainer.dist``): every rank trains, rank 0 alone writes the directory and
shows the progress bar; the log holds the metrics averaged over the ranks.
"""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from .algos import TrainConfig, Trainer
from .checkpoint import CHECKPOINT, load_checkpoint  # noqa: F401  (load_checkpoint: part of this module's API)
from .dist import DistContext, any_rank, gather_objects, parameter_digest

LOG, SUMMARY, CURVES = "log.jsonl", "summary.json", "curves.png"
MEMORY_NOTE = (
    "loss_peak_bytes: peak extra memory of the loss step (loss forward + gradient w.r.t. the logits). "
    "CUDA: torch.cuda.max_memory_allocated above the bytes allocated at its start. CPU: peak total "
    "size of tensor storages created during the step and alive together, counted at the dispatcher."
)


def read_log(path: Path) -> list:
    """Step records of a log; a line cut short by a hard stop is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _mean(values: list) -> Optional[float]:
    return statistics.fmean(values) if values else None


class _StopRequest:
    """SIGINT handler: the first signal asks the loop to stop after the step, the second interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def save_checkpoint(trainer: Trainer, out: Path) -> None:
    """Called on every rank (the state gathers each rank's random state); rank 0 writes."""
    state = trainer.state_dict()
    if not trainer.dist.is_main:
        return
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / CHECKPOINT)  # atomic: a stop during the save keeps the previous checkpoint


def run(
    cfg: TrainConfig,
    out: Path,
    *,
    resume_state: Optional[dict] = None,
    progress: bool = True,
    save_every: int = 50,
    ctx: Optional[DistContext] = None,
) -> dict:
    """Train ``cfg.steps`` steps in total (continuing from ``resume_state`` when given); return the summary.

    ``ctx``: this process's rank in a data-parallel job (``dist.init_from_env``); None: a single process.
    The warm-up runs identically on every rank (same seed and batches), then the policy is wrapped in DDP.
    """
    ctx = ctx or DistContext()
    main = ctx.is_main
    out = Path(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    start = time.perf_counter()
    trainer = Trainer(cfg)
    warmup_info = None
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        if main:
            kept = [r for r in read_log(log_path) if r.get("step", 0) <= trainer.step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            previous = out / SUMMARY
            if previous.exists():
                warmup_info = json.loads(previous.read_text()).get("warmup")
    else:
        if main:
            log_path.write_text("")
        warmup_info = {**trainer.warmup(), "seconds": time.perf_counter() - start}
    trainer.distribute(ctx)
    first_step = trainer.step
    status = "finished"
    last_saved = None if resume_state is None else trainer.step
    bar = _progress_bar(cfg, trainer.step, progress and main)
    try:
        with _StopRequest() as stop, (log_path.open("a") if main else nullcontext()) as log:
            recent: list = []
            while trainer.step < cfg.steps:
                t0 = time.perf_counter()
                record = trainer.train_step()
                record["step_s"] = time.perf_counter() - t0
                record["elapsed_s"] = time.perf_counter() - start
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                recent = (recent + [record["reward"]])[-10:]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{_mean(recent):.3f}", loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}",
                        ent=f"{record['entropy']:.3f}", mem=_bytes(record["loss_peak_bytes"]),
                    )
                if save_every and trainer.step % save_every == 0:
                    save_checkpoint(trainer, out)
                    last_saved = trainer.step
                if any_rank(stop.requested, ctx):
                    status = "stopped"
                    break
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if bar is not None:
            bar.close()
    # After a hard interrupt the model may be half-updated: keep the last consistent checkpoint.
    if status != "interrupted" and trainer.step != last_saved:
        save_checkpoint(trainer, out)
    digests = gather_objects(parameter_digest(trainer.model), ctx)
    if not main:
        return {"status": status, "steps_done": trainer.step}
    extra = None
    if ctx.active:
        # Bit-identical weights on all ranks is DDP's invariant; the digests let a run show it.
        extra = {"world_size": ctx.world, "global_batch_size": cfg.batch_size * ctx.world,
                 "param_sha1_per_rank": digests}
    summary = write_summary(
        out, cfg, trainer, status, warmup_info, time.perf_counter() - start, first_step, extra=extra
    )
    try:
        from .plot import plot_curves

        plot_curves(read_log(log_path), out / CURVES, title=_title(cfg, summary["backend_used"]))
    except ImportError as exc:  # matplotlib is an optional dependency ("train" extra)
        summary["plot_error"] = str(exc)
    return summary


def _progress_bar(cfg: TrainConfig, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=initial, desc=cfg.algo, dynamic_ncols=True)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f}MiB" if n >= 2**20 else f"{n / 2**10:.0f}KiB"


def _title(cfg: TrainConfig, backend: str) -> str:
    return f"{cfg.algo} on '{cfg.task}' ({cfg.digits} digits), kernel={cfg.kernel} ({backend}), {cfg.device}"


def write_summary(out, cfg, trainer, status, warmup_info, wall_s, first_step, extra=None) -> dict:
    rows = read_log(Path(out) / LOG)
    rewards = [r["reward"] for r in rows]
    peaks = [r["loss_peak_bytes"] for r in rows]
    summary = {
        "algo": cfg.algo,
        "status": status,
        "steps_done": trainer.step,
        "steps_this_run": trainer.step - first_step,
        "wall_s": wall_s,
        "config": cfg.to_dict(),
        "backend_used": trainer.kernels.backend_name(trainer.device),
        "model": {**trainer.model_cfg.to_dict(), "parameters": trainer.model.num_parameters()},
        "warmup": warmup_info,
        "reward_first10": _mean(rewards[:10]),
        "reward_last10": _mean(rewards[-10:]),
        "loss_last": rows[-1]["loss"] if rows else None,
        "loss_peak_bytes_max": max(peaks) if peaks else None,
        "loss_peak_bytes_mean": _mean(peaks),
        "memory_note": MEMORY_NOTE,
        "torch": torch.__version__,
        **(extra or {}),
    }
    if cfg.algo == "dpo" and rows:
        summary["accuracy_last10"] = _mean([r["accuracy"] for r in rows[-10:]])
        summary["margin_last10"] = _mean([r["margin"] for r in rows[-10:]])
    first, last = summary["reward_first10"], summary["reward_last10"]
    summary["reward_gain"] = last / first if first and last is not None else None
    text = json.dumps(summary, indent=2, default=str)
    (Path(out) / SUMMARY).write_text(text + "\n")
    return summary
