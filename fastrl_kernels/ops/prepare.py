"""The preparation every op on logits or hidden states shares, one step per concern.

An op checks its arguments (``config.py``), then composes these steps:

    core_params      the logit transform (temperature, logit_scale, softcap) and ignore_index, checked,
                     as the CoreParams every backend and the reference read
    policy_config    PolicyLossConfig from config, keyword overrides and the ``temperature`` keyword
    logits_rows,     ``[..., V]`` logits or ``[..., H]`` hidden states as ``[N, *]`` rows, with the tokens
    hidden_rows      outside a keep mask folded into ignore_index (the kernels never read those rows)
    policy_inputs    mask, advantages and per-token tensors of the policy family as the [B, T] the
                     loss algebra sees
    pair_inputs      the DPO family's [2B, T, *] shape, reference sequence log-probs and response mask
    route            backend="reference" (float64, unfused, on full logits) or one concrete fused backend

The logits ops and the lm_head ops differ only in the rows they hand on and in the engine that reads
them (``fused.fused_logits_loss`` or ``linear_chunks``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, Optional, TypeVar

import torch

from ..backends import resolve_backend
from ..config import (
    FLOAT_DTYPES,
    PolicyLossConfig,
    as_float_mask,
    check_float_tensor,
    check_real,
    check_same_device,
    check_shape,
    check_temperature,
    resolve_config,
)
from ..core import CoreParams
from ..losses import policy as policy_algebra

Result = TypeVar("Result")


def core_params(temperature: float, logit_scale: float, softcap: Optional[float], ignore_index: int) -> CoreParams:
    """The options every op on logits or hidden states accepts, checked for every backend."""
    check_temperature(temperature)
    check_real("logit_scale", logit_scale, "a number > 0", lambda x: x > 0)
    if softcap is not None:
        # inf would be "no softcap" spelt another way, and gives inf * tanh(0) = NaN: None says it.
        check_real("softcap", softcap, "None or a number > 0", lambda x: x > 0)
    return CoreParams(float(temperature), float(logit_scale), None if softcap is None else float(softcap),
                      int(ignore_index))


def transform_options(params: CoreParams) -> dict:
    """``params`` as the keywords of the reference functions."""
    return dict(temperature=params.temperature, logit_scale=params.logit_scale, softcap=params.softcap,
                ignore_index=params.ignore_index)


def policy_config(config: Optional[PolicyLossConfig], overrides: dict, temperature: Optional[float]):
    """The config of a policy op. ``temperature`` is a config field and a keyword of every op on logits;
    the keyword overrides a config left at the default 1.0 and must agree with any other value."""
    if temperature is not None:
        check_temperature(temperature)
        if isinstance(config, PolicyLossConfig) and config.temperature not in (1.0, temperature):
            raise ValueError(f"temperature: given twice with different values, {config.temperature!r} in config "
                             f"and {temperature!r} as a keyword; give it once")
        overrides = {**overrides, "temperature": temperature}
    return resolve_config(PolicyLossConfig, config, overrides)


class Rows(NamedTuple):
    """rows ``[N, V]`` logits or ``[N, H]`` hidden states; targets ``[N]``; leading: the token shape."""

    rows: torch.Tensor
    targets: torch.Tensor
    leading: torch.Size

    def unflatten(self, *per_row: torch.Tensor) -> tuple:
        return tuple(t.view(self.leading) for t in per_row)


def _folded(targets: torch.Tensor, keep: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    # Tokens outside ``keep`` become ignored rows: no statistics, a zero gradient row written unread.
    flat = targets.reshape(-1)
    return flat if keep is None else torch.where(keep.reshape(-1), flat, ignore_index)


def logits_rows(logits: torch.Tensor, targets: torch.Tensor, keep: Optional[torch.Tensor] = None,
                ignore_index: int = -100) -> Rows:
    """``[..., V]`` logits as rows with unit stride in V (a view when the layout allows)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return Rows(rows, _folded(targets, keep, ignore_index), logits.shape[:-1])


def hidden_rows(hidden: torch.Tensor, targets: torch.Tensor, keep: Optional[torch.Tensor] = None,
                ignore_index: int = -100) -> Rows:
    """``[..., H]`` hidden states as contiguous rows (the GEMM operand of every chunk)."""
    return Rows(hidden.reshape(-1, hidden.shape[-1]).contiguous(), _folded(targets, keep, ignore_index),
                hidden.shape[:-1])


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Full float64 logits of the lm_head for backend="reference" (testing only: holds N x V)."""
    logits = hidden.double() @ weight.double().t()
    return logits if bias is None else logits + bias.double()


def route(backend: str, device: torch.device, reference: Callable[[], Result],
          fused: Callable[[str], Result]) -> Result:
    """``reference()`` for backend="reference", else ``fused(name)`` with the backend resolved once."""
    if backend == "reference":
        return reference()
    return fused(resolve_backend(backend, device))


class PolicyInputs(NamedTuple):
    """The policy family's token inputs. mask: float32 of the leading shape (the caller's mask times
    targets != ignore_index); keep: mask > 0, the tokens the kernels read; shape: the [B, T] of the
    algebra ([1, N] for one sequence); loss_inputs: (old, advantages, mask, keep, ref, is_weights,
    normalizer) as [B, T] float32, advantages [B, 1] when given per sequence."""

    mask: torch.Tensor
    keep: torch.Tensor
    shape: tuple
    loss_inputs: tuple

    def loss_fn(self, cfg: PolicyLossConfig) -> Callable:
        """``(logp [N], entropy [N], log_sum_p2, *loss_inputs) -> (loss, metrics)``."""
        return partial(_policy_loss_on_rows, cfg=cfg, shape=self.shape)


def policy_inputs(like: torch.Tensor, targets: torch.Tensor, mask, old_logprobs, advantages, ref_logprobs,
                  is_weights, normalizer, ignore_index: int, like_name: str = "logits") -> PolicyInputs:
    """``like``: the logits or hidden states (their leading shape is the token shape)."""
    leading = like.shape[:-1]
    kept = targets != ignore_index
    float_mask = kept.to(torch.float32) if mask is None else as_float_mask(mask, leading, like,
                                                                           like_name=like_name) * kept
    shape = (leading[0], leading[1]) if len(leading) == 2 else (1, leading[0])
    keep = float_mask > 0
    adv = advantages.float()
    adv = adv.reshape(shape[0], 1) if adv.dim() == 1 and len(leading) == 2 else adv.reshape(shape)

    def as_bt(tensor):
        return None if tensor is None else tensor.float().reshape(shape)

    loss_inputs = (as_bt(old_logprobs), adv, float_mask.reshape(shape), keep.reshape(shape), as_bt(ref_logprobs),
                   as_bt(is_weights), normalizer)
    return PolicyInputs(float_mask, keep, shape, loss_inputs)


def _policy_loss_on_rows(logp, entropy, _log_sum_p2, old, adv, mask, keep, ref, is_weights, normalizer, *, cfg,
                         shape):
    # The kernels return logp = entropy = 0 at ignored rows, which the masked tokens are.
    return policy_algebra.masked_policy_loss(
        logp.view(shape), entropy.view(shape), old, adv, mask, keep, ref, is_weights, normalizer, cfg,
        zero_where_masked=True,
    )


def pair_inputs(like: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor],
                ref_chosen_logps: Any, ref_rejected_logps: Any, ignore_index: int, like_name: str) -> torch.Tensor:
    """The DPO family's checks on ``like`` ``[2B, T, *]`` (logits or hidden states) and the reference
    sequence log-probs ``[B]``; returns the response mask, float32 ``[2B, T]``: the caller's mask times
    targets != ignore_index."""
    if like.dim() != 3 or like.shape[0] < 2 or like.shape[0] % 2:
        last = "V" if like_name == "logits" else "H"
        raise ValueError(f"{like_name}: expected shape [2B, T, {last}] with an even number 2B >= 2 of rows "
                         f"(chosen then rejected), got {tuple(like.shape)}")
    rows, steps = like.shape[:2]
    response = as_float_mask(mask, (rows, steps), like, like_name=like_name) * (targets != ignore_index).to(
        torch.float32)
    for name, tensor in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_float_tensor(name, tensor, FLOAT_DTYPES)
        check_shape(name, tensor, (rows // 2,), f"[B], half the rows of {like_name}")
    check_same_device(like_name, like, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    return response
