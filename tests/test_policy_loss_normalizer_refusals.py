"""policy_loss refuses a normalizer that would give a wrong loss (0, negative, NaN, several values) by
name on every backend, the float64 reference included, which would otherwise divide by it."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from tests.backends_under_test import cpu_fused_backends

BAD = {
    "zero": (0.0, r"^normalizer: expected None, a number > 0 or a tensor of them, got 0\.0$"),
    "negative": (-2.0, r"^normalizer: expected None, a number > 0 or a tensor of them, got -2\.0$"),
    "nan tensor": (torch.tensor(float("nan")), r"^normalizer: expected finite values > 0, got nan$"),
    "several values": (torch.tensor([2.0, 3.0]),
                       r"^normalizer: expected one value \(a 0-d or one-element tensor\), got shape \(2,\)$"),
}


@pytest.mark.parametrize("backend", cpu_fused_backends() + ["reference"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_normalizer_is_refused_on_every_backend(backend, case):
    normalizer, message = BAD[case]
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 3, 7, generator=g), torch.randint(0, 7, (2, 3), generator=g)
    with pytest.raises(ValueError, match=message):
        fk.policy_loss(logits, targets, -torch.rand(2, 3, generator=g), torch.randn(2, generator=g),
                       normalizer=normalizer, backend=backend)
