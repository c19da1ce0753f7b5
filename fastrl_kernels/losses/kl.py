"""Per-token KL penalty estimators against a reference policy (docs/design.md, "The loss math")."""

from __future__ import annotations

from typing import Optional

import torch


def kl_penalty(
    logp: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3", clamp: Optional[float] = None
) -> torch.Tensor:
    """KL(pi || ref) estimate per token from k = ref - logp (Schulman's k1/k2/k3; verl's names).

    "k1" = -k, "abs" = |k|, "k2" = k^2 / 2, "k3" = e^k - k - 1 (TRL's GRPO KL). ``clamp`` bounds k first
    (verl clamps at 20 / 10). "k1+" / "k3+": the value of k1 / k3 with the gradient of k2 (verl's
    straight-through "+" estimators: unbiased value, low-variance gradient).
    """
    k = ref_logprobs - logp
    if clamp is not None:
        k = k.clamp(min=-clamp, max=clamp)
    base = estimator.rstrip("+")
    if base == "k1":
        value = -k
    elif base == "abs":
        value = k.abs()
    elif base == "k2":
        value = 0.5 * k * k
    elif base == "k3":
        value = torch.expm1(k) - k
    else:
        raise ValueError(f"kl_estimator: unknown estimator {estimator!r}")
    if estimator.endswith("+"):
        k2 = 0.5 * k * k
        return k2 + (value - k2).detach()
    return value
