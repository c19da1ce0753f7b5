"""Per-token KL penalty estimators against a reference policy (docs/design.md, "The loss math")."""

from __future__ import annotations

from typing import Optional

import torch

# The estimators' values from k = ref - logp (Schulman's k1 / k2 / k3, verl's names). An estimator named
# with a "+" takes its base's value with k2's gradient. ``config.KL_ESTIMATORS`` is this table's names.
KL_VALUES = {
    "k1": lambda k: -k,
    "abs": torch.abs,
    "k2": lambda k: 0.5 * k * k,
    "k3": lambda k: torch.expm1(k) - k,
}
STRAIGHT_THROUGH = ("k1+", "k3+")
KL_ESTIMATORS = tuple(KL_VALUES) + STRAIGHT_THROUGH


def kl_penalty(
    logp: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", clamp: Optional[float] = None,
    value_cap: Optional[float] = None,
) -> torch.Tensor:
    """KL(pi || ref) estimate per token from k = ref - logp (Schulman's k1/k2/k3; verl's names).

    "k1" = -k, "abs" = |k|, "k2" = k^2 / 2, "k3" = e^k - k - 1 (TRL's GRPO KL). ``clamp`` bounds k first
    (verl clamps at 20 / 10). "k1+" / "k3+": the value of k1 / k3 with the gradient of k2 (verl's
    straight-through "+" estimators: unbiased value, low-variance gradient). ``value_cap`` clamps the value
    to [-value_cap, value_cap] (verl's k3 and OpenRLHF's every estimator at 10): zero gradient where it
    binds, as torch.clamp; a "+" estimator keeps k2's gradient (its value is detached, as in verl).
    """
    k = ref_logprobs - logp
    if clamp is not None:
        k = k.clamp(min=-clamp, max=clamp)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: unknown estimator {estimator!r}")
    value = KL_VALUES[estimator.rstrip("+")](k)
    if value_cap is not None:
        value = value.clamp(min=-value_cap, max=value_cap)
    if estimator in STRAIGHT_THROUGH:
        k2 = 0.5 * k * k
        return k2 + (value - k2).detach()
    return value
