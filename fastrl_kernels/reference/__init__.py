"""Float64 reference formulas: unfused, obvious, differentiable; the independent check of every backend.

Nothing here imports ``fastrl_kernels.losses`` or ``fastrl_kernels.ops``. ``seed`` holds the design
seed's numpy functions.
"""

from . import seed
from .advantages import gae, group_advantages, masked_whiten, value_loss
from .logprobs import token_logprobs, token_stats, transformed_logits
from .policy import aggregate, kl_penalty, policy_loss, policy_loss_from_logprobs

__all__ = [
    "aggregate",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "policy_loss_from_logprobs",
    "seed",
    "token_logprobs",
    "token_stats",
    "transformed_logits",
    "value_loss",
]

try:
    from . import dpo
    from .dpo import *  # noqa: F403  (dpo_loss, sequence_logprobs, ...)

    __all__ += list(getattr(dpo, "__all__", []))
except ModuleNotFoundError as error:  # the DPO reference is optional for the rest of the package
    if error.name != f"{__name__}.dpo":
        raise
