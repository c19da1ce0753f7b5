"""softcap: None or a finite number > 0, refused otherwise by name with what it expects; any value > 0,
below 1 included, is a cap."""

import math
import re

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference


@pytest.mark.parametrize("softcap, expected", [
    (0.0, "None or a number > 0"), (-1.0, "None or a number > 0"),
    (math.inf, "None or a finite number > 0"), (math.nan, "None or a finite number > 0"),
])
def test_a_bad_softcap_is_refused_by_name(softcap, expected):
    message = f"softcap: expected {expected}, got {softcap!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fk.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), softcap=softcap, backend="torch")


@pytest.mark.parametrize("softcap", [0.25, 1.0])
def test_a_softcap_up_to_one_caps_the_logits(softcap):
    g = torch.Generator().manual_seed(0)
    logits, targets = 3 * torch.randn(4, 9, generator=g), torch.randint(0, 9, (4,), generator=g)
    logp, entropy = fk.token_logprobs(logits, targets, softcap=softcap, backend="torch")
    ref_logp, ref_entropy = reference.token_logprobs(logits, targets, softcap=softcap)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-6)
    assert (logp >= -2 * softcap - math.log(9) - 1e-5).all()  # capped logits lie in (-c, c)
