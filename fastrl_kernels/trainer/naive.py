"""Plain PyTorch versions of the losses the trainer uses (``--kernel naive``).

``log_softmax`` + ``gather`` over the full ``[B, T, V]`` logits and autograd through it: the memory
every fused op avoids. The formulas are the benchmarks' naive baselines (``fastrl_kernels.benchmarks.naive``,
checked against the float64 reference), for the options the trainer sets (``loss_type="clip"``, KL
estimator "k3", exact entropy, ``loss_agg="token-mean"``, DPO "sigmoid").
"""

from __future__ import annotations

from ..benchmarks.naive import NaiveDPOOutput, NaivePolicyLossOutput, gae, group_advantages, value_loss
from ..benchmarks.naive import naive_dpo_loss as fused_dpo_loss
from ..benchmarks.naive import naive_token_logprobs as token_logprobs
from ..benchmarks.naive import policy_loss_for_config as policy_loss

__all__ = [
    "NaiveDPOOutput",
    "NaivePolicyLossOutput",
    "fused_dpo_loss",
    "gae",
    "group_advantages",
    "policy_loss",
    "token_logprobs",
    "value_loss",
]
