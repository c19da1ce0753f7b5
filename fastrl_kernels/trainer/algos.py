"""GRPO, PPO and DPO steps on the tiny model and the built-in tasks, after a short supervised warm-up.

One ``Trainer`` holds the policy, the frozen reference (a copy taken after the warm-up), the optimizer
and the random state; ``train_step()`` runs one step of ``cfg.algo`` and returns its metrics.
The loss step runs on detached logits: loss forward + gradient w.r.t. the logits are measured by
``LossStepMemory``, then that gradient is pushed through the model.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import PolicyLossConfig
from ..integrations.distributed import global_normalizer
from . import tasks as T
from .dist import DistContext, ResponseModel, gather_objects, mean_metrics, rank_seed, wrap_ddp
from .kernels import LossKernels, LossStepMemory
from .model import TinyGPT, TinyGPTConfig

ALGOS = ("grpo", "ppo", "dpo")


@dataclass
class TrainConfig:
    algo: str = "grpo"
    task: str = "sort"
    digits: int = 4
    reward: str = "exact"
    steps: int = 200
    warmup_steps: int = 150
    warmup_target: float = 0.1
    warmup_lr: float = 3e-3
    batch_size: int = 8
    group_size: int = 8
    lr: float = 1e-3
    epochs: int = 1
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    entropy_coef: float = 0.0
    beta: float = 0.1
    vf_coef: float = 0.5
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    kernel: str = "fused"
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    vocab_pad: int = 0
    d_model: int = 128
    layers: int = 2
    heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(cfg: TrainConfig) -> TinyGPTConfig:
    """The policy's shape for ``cfg`` (a resumed checkpoint's weights are checked against it)."""
    return TinyGPTConfig(
        vocab_size=max(cfg.vocab_pad, len(T.CharTokenizer())),
        context=cfg.digits + 2 + T.answer_length(cfg.digits),
        d_model=cfg.d_model,
        n_layers=cfg.layers,
        n_heads=cfg.heads,
        value_head=cfg.algo == "ppo",
    )


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.float()
    return float((x.detach() * m).sum() / m.sum().clamp(min=1.0))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if cfg.algo not in ALGOS:
            raise ValueError(f"algo: expected one of {ALGOS}, got {cfg.algo!r}")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.tok = T.CharTokenizer()
        self.prompt_len = cfg.digits + 2
        self.answer_len = T.answer_length(cfg.digits)
        self.model_cfg = model_config(cfg)
        self.model = TinyGPT(self.model_cfg).to(self.device)
        self.ref: Optional[TinyGPT] = None
        self.kernels = LossKernels(cfg.kernel, cfg.backend)
        self.loss_cfg = PolicyLossConfig(
            loss_type="clip",
            clip_eps_low=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps,
            kl_coef=cfg.kl_coef,
            kl_estimator="k3",
            entropy_coef=cfg.entropy_coef,
            loss_agg="token-mean",
            temperature=cfg.temperature,
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.step = 0
        # The gradient passes go through ``policy`` (the module DDP wraps in a data-parallel run).
        self.policy = ResponseModel(self.model, self.prompt_len - 1)
        self.dist = DistContext()
        self._rank_rng: Optional[list] = None

    def distribute(self, ctx: DistContext) -> None:
        """Join a data-parallel job (after the warm-up or a checkpoint load): wrap the policy in DDP and
        give every rank but 0 its own sampling stream (restored from the checkpoint when it has one)."""
        if not ctx.active:
            return
        self.dist = ctx
        self.policy = wrap_ddp(ResponseModel(self.model, self.prompt_len - 1), ctx, self.device)
        if ctx.rank == 0:
            return
        if self._rank_rng is not None and len(self._rank_rng) == ctx.world:
            torch_state, task_state = self._rank_rng[ctx.rank]
            torch.set_rng_state(torch_state)
            self.rng.setstate(task_state)
        else:
            seed = rank_seed(self.cfg.seed, ctx.rank, self.step)
            torch.manual_seed(seed)
            self.rng = random.Random(seed)

    def _normalizer(self, mask: torch.Tensor) -> Optional[torch.Tensor]:
        """Data-parallel: the global token count / world size, so DDP's averaged gradient is the
        global token mean's; single process: None (the loss's own token count)."""
        return global_normalizer(mask, "token-mean", average_grads=True) if self.dist.active else None

    # -- pieces shared by the algorithms ---------------------------------------------------------

    def _response(self, model: TinyGPT, seq: torch.Tensor):
        """Hidden ``[B, A, d]`` and logits ``[B, A, V]`` at the positions that predict the response."""
        h = model.hidden(seq[:, :-1])[:, self.prompt_len - 1 :]
        return h, model.lm_head(h)

    def _sample(self, problems):
        prompts = T.prompt_tensor(self.tok, problems, self.device)
        seq = self.model.generate(
            prompts, self.answer_len, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id, temperature=self.cfg.temperature
        )
        targets, mask = T.split_response(self.tok, seq, self.prompt_len)
        rewards = T.rewards_for(self.tok, seq, self.prompt_len, problems, self.cfg.reward)
        return seq, targets, mask, rewards

    @torch.no_grad()
    def _logprobs(self, model: TinyGPT, seq, targets, temperature: Optional[float] = None) -> torch.Tensor:
        _, logits = self._response(model, seq)
        tau = self.cfg.temperature if temperature is None else temperature
        logp, _ = self.kernels.token_logprobs(logits, targets, temperature=tau)
        return logp

    def _loss_backward(self, logits: torch.Tensor, loss_fn: Callable, extra: Optional[torch.Tensor] = None):
        """Run ``loss_fn(logits)`` under ``LossStepMemory``, backprop it (and ``extra``, a scalar loss on
        other outputs) through the model and take an optimizer step. Returns (output, peak bytes)."""
        leaf = logits.detach().requires_grad_()
        with LossStepMemory(self.device) as mem:
            out = loss_fn(leaf)
            (grad,) = torch.autograd.grad(out.loss, leaf)
        if extra is None:
            logits.backward(grad)
        else:
            torch.autograd.backward([logits, extra], [grad, torch.ones_like(extra)])
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out, mem.peak

    def _problems(self, count: int):
        return T.sample_problems(self.cfg.task, self.cfg.digits, count, self.rng)

    # -- warm-up ---------------------------------------------------------------------------------

    def warmup(self) -> dict:
        """Supervised steps on right answers (cross-entropy on the response), then freeze the reference.

        Stops early once the sampled reward of a probe batch (every 5 steps) reaches
        ``cfg.warmup_target``, so RL starts from a similar, non-zero reward whatever the seed.
        """
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.warmup_lr, weight_decay=0.0)
        losses, probe = [], None
        count = self.cfg.batch_size * self.cfg.group_size
        for i in range(1, self.cfg.warmup_steps + 1):
            problems = self._problems(count)
            seq = T.response_batch(self.tok, problems, [p.answer for p in problems], self.cfg.digits, self.device)
            targets, mask = T.split_response(self.tok, seq, self.prompt_len)
            _, logits = self._response(self.model, seq)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            loss = (ce * mask).sum() / mask.sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if self.cfg.warmup_target > 0 and i % 5 == 0:
                probe = float(self._sample(self._problems(count))[3].mean())
                if probe >= self.cfg.warmup_target:
                    break
        self.freeze_reference()
        return {"steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "probe_reward": probe}

    def freeze_reference(self) -> None:
        self.ref = copy.deepcopy(self.model).eval()
        self.ref.requires_grad_(False)

    # -- algorithms ------------------------------------------------------------------------------

    def train_step(self) -> dict:
        if self.ref is None:
            raise RuntimeError("call warmup() (or load a checkpoint) before train_step()")
        metrics = {"grpo": self._grpo_step, "ppo": self._ppo_step, "dpo": self._dpo_step}[self.cfg.algo]()
        self.step += 1
        return {"step": self.step, **mean_metrics(metrics, self.dist)}

    def _policy_metrics(self, out, old_logp, ref_logp, mask) -> dict:
        logp = out.logprobs.detach()
        k = ref_logp - logp
        ratio = torch.exp(logp - old_logp)
        clipped = (ratio < 1 - self.cfg.clip_eps) | (ratio > 1 + self.cfg.clip_eps)
        return {
            "loss": float(out.loss.detach()),
            "kl": _masked_mean(torch.exp(k) - k - 1, mask),
            "entropy": _masked_mean(out.entropy, mask),
            "clip_frac": _masked_mean(clipped.float(), mask),
        }

    def _rollout(self):
        problems = [p for p in self._problems(self.cfg.batch_size) for _ in range(self.cfg.group_size)]
        seq, targets, mask, rewards = self._sample(problems)
        old_logp = self._logprobs(self.model, seq, targets)
        ref_logp = self._logprobs(self.ref, seq, targets)
        return seq, targets, mask, rewards, old_logp, ref_logp

    def _grpo_step(self) -> dict:
        return self._grpo_update(*self._rollout())

    def _grpo_update(self, seq, targets, mask, rewards, old_logp, ref_logp) -> dict:
        """GRPO's optimizer step(s) on one rollout (``cfg.epochs`` passes); this rank's metrics."""
        adv = self.kernels.group_advantages(rewards, self.cfg.group_size)
        norm = self._normalizer(mask)
        losses, peaks = [], []
        for _ in range(self.cfg.epochs):
            _, logits = self.policy(seq)
            out, peak = self._loss_backward(
                logits,
                lambda lg: self.kernels.policy_loss(
                    lg, targets, old_logp, adv, mask, ref_logprobs=ref_logp, config=self.loss_cfg, normalizer=norm
                ),
            )
            losses.append(self._policy_metrics(out, old_logp, ref_logp, mask))
            peaks.append(peak)
        return self._merge(losses, peaks, reward=float(rewards.mean()), response_len=float(mask.sum(1).float().mean()))

    def _ppo_step(self) -> dict:
        seq, targets, mask, rewards, old_logp, ref_logp = self._rollout()
        with torch.no_grad():
            old_values = self.model.values(self._response(self.model, seq)[0])
        token_rewards = torch.zeros_like(old_values)
        last = mask.sum(1) - 1
        token_rewards[torch.arange(seq.shape[0], device=seq.device), last] = rewards
        adv, returns = self.kernels.gae(token_rewards, old_values, mask, gamma=self.cfg.gamma, lam=self.cfg.lam)
        norm = self._normalizer(mask)
        losses, peaks = [], []
        for _ in range(self.cfg.epochs):
            h, logits = self.policy(seq)
            vloss = self.kernels.value_loss(
                self.model.values(h), old_values, returns, mask, clip=self.cfg.value_clip, normalizer=norm
            )
            out, peak = self._loss_backward(
                logits,
                lambda lg: self.kernels.policy_loss(
                    lg, targets, old_logp, adv, mask, ref_logprobs=ref_logp, config=self.loss_cfg, normalizer=norm
                ),
                extra=self.cfg.vf_coef * vloss,
            )
            losses.append({**self._policy_metrics(out, old_logp, ref_logp, mask), "value_loss": float(vloss.detach())})
            peaks.append(peak)
        return self._merge(losses, peaks, reward=float(rewards.mean()), response_len=float(mask.sum(1).float().mean()))

    def _dpo_step(self) -> dict:
        problems = self._problems(self.cfg.batch_size)
        rejected = [T.corrupt(p.answer, self.rng) for p in problems]
        seq = torch.cat([
            T.response_batch(self.tok, problems, [p.answer for p in problems], self.cfg.digits, self.device),
            T.response_batch(self.tok, problems, rejected, self.cfg.digits, self.device),
        ])
        targets, mask = T.split_response(self.tok, seq, self.prompt_len)
        # DPO compares log-likelihoods at temperature 1; cfg.temperature only shapes the samples below.
        ref_seq = (self._logprobs(self.ref, seq, targets, temperature=1.0) * mask).sum(-1)
        b = len(problems)
        # Equal pair counts per rank: DDP's gradient average is the global pair mean's gradient.
        _, logits = self.policy(seq)
        out, peak = self._loss_backward(
            logits,
            lambda lg: self.kernels.dpo_loss(lg, targets, mask, ref_seq[:b], ref_seq[b:], beta=self.cfg.beta),
        )
        # Fresh samples of the updated policy: their task reward is what DPO should raise, and being
        # on-policy they make k3 a KL estimate (on the fixed pairs it is not, and it explodes).
        sampled, s_targets, s_mask, rewards = self._sample(self._problems(self.cfg.batch_size))
        with torch.no_grad():
            _, s_logits = self._response(self.model, sampled)
            logp, entropy = self.kernels.token_logprobs(s_logits, s_targets, temperature=self.cfg.temperature)
        k = self._logprobs(self.ref, sampled, s_targets) - logp
        return {
            "reward": float(rewards.mean()),
            "loss": float(out.loss.detach()),
            "kl": _masked_mean(torch.exp(k) - k - 1, s_mask),
            "entropy": _masked_mean(entropy, s_mask),
            "accuracy": float(out.accuracy.float().mean()),
            "margin": float(out.margins.float().mean()),
            "chosen_reward": float(out.chosen_rewards.float().mean()),
            "rejected_reward": float(out.rejected_rewards.float().mean()),
            "loss_peak_bytes": peak,
        }

    @staticmethod
    def _merge(per_epoch: list, peaks: list, **extra) -> dict:
        """First epoch's loss metrics (the step's on-policy values), all epochs' losses, the max peak."""
        merged = {**extra, **per_epoch[0], "loss_peak_bytes": max(peaks)}
        if len(per_epoch) > 1:
            merged["epoch_losses"] = [m["loss"] for m in per_epoch]
        return merged

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Model, reference, optimizer, step and random state; data-parallel: every rank's random
        state too (a collective: call it on every rank)."""
        state = {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ref": self.ref.state_dict() if self.ref is not None else None,
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "task_rng": self.rng.getstate(),
        }
        ranks = gather_objects((torch.get_rng_state(), self.rng.getstate()), self.dist)
        if ranks is not None:
            state["rank_rng"] = ranks
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        if state["ref"] is not None:
            self.freeze_reference()
            self.ref.load_state_dict(state["ref"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.rng.setstate(state["task_rng"])
        self._rank_rng = state.get("rank_rng")
