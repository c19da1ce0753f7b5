"""Edges of the two primitives on every CPU backend: rows far apart in scale in one call, a loss on one
of the two outputs alone, a sampled token on a -inf logit.

Rows far apart in scale: each row is shifted by its own maximum, so a row of small logits
next to a row of large ones keeps its own softmax. Under softcap the transformed logits span +-c /
temperature, and a shift shared by the rows would push a low row's every exp below float32's range."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.backends import primitives
from fastrl_kernels.core import CoreParams
from fastrl_kernels.reference.logprobs import token_stats as reference_stats
from tests.backends_under_test import cpu_fused_backends
from tests.test_backend_contract import check


@pytest.mark.parametrize("backend", cpu_fused_backends())
@pytest.mark.parametrize("params", [CoreParams(), CoreParams(temperature=0.25, softcap=30.0)],
                         ids=["plain", "softcap-low-temperature"])
def test_rows_of_very_different_scales_keep_their_own_softmax(backend, params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 257, generator=g)
    logits[0] += 1000.0  # softcap 30 at temperature 0.25: x near +120 here, near -120 in row 2
    logits[2] -= 1000.0
    logits[3] *= 50.0
    targets = torch.tensor([3, 100, 256, 7])
    stats, grad = check(backend, logits, targets, params)  # every statistic and the gradient vs float64
    assert torch.isfinite(stats.lse).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", cpu_fused_backends())
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_one_output_alone_under_a_float64_default_dtype(backend, used, float64_default):
    """A loss on the log-probs alone (or the entropies alone) leaves the other coefficient to the op: it
    is made as float32 zeros whatever torch's default dtype, and the gradient is the reference's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 300, generator=g, dtype=torch.float32)
    targets = torch.randint(0, 300, (3, 5), generator=g)
    z = logits.double().requires_grad_(True)
    ref = reference_stats(z, targets)
    (getattr(ref, used).sum()).backward()
    ours = logits.clone().requires_grad_(True)
    logp, entropy = fk.token_logprobs(ours, targets, backend=backend)
    (grad,) = torch.autograd.grad((logp if used == "logp" else entropy).sum(), ours)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), z.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_fused_backends())
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_a_target_on_a_minus_inf_logit(backend, softcap):
    """A sampled token whose logit is -inf (a banned token): probability 0, logp = -inf, without softcap;
    under softcap the logit is the finite -c, and logp is finite and the reference's."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 200, generator=g)
    logits[:, 10] = float("-inf")
    targets = torch.tensor([10, 11, 10])
    params = CoreParams(softcap=softcap)
    if softcap is not None:
        stats, _ = check(backend, logits, targets, params, with_p2=False)  # every statistic vs float64
        assert torch.isfinite(stats.logp).all()
        return
    stats = primitives(backend).stats(logits, targets, params)
    assert stats.logp[0] == float("-inf") and stats.logp[2] == float("-inf")
    assert torch.isfinite(stats.logp[1]) and torch.isfinite(stats.entropy).all()
