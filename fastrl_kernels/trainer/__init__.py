"""Thin reference trainer: a tiny causal transformer, built-in verifiable tasks, GRPO / PPO / DPO loops.

Run ``fastrl-train {grpo,ppo,dpo}`` (``fastrl_kernels.trainer.cli``); ``--kernel fused`` computes the losses
with the package's ops, ``--kernel naive`` with plain PyTorch (``trainer.naive``), giving the same losses
step by step and a different loss-step peak memory. Importing this package builds no kernel.
"""

from .algos import TrainConfig, Trainer
from .model import TinyGPT, TinyGPTConfig

__all__ = ["TinyGPT", "TinyGPTConfig", "TrainConfig", "Trainer"]
