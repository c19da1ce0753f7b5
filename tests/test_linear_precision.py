"""The lm_head path keeps lse and E[x] in float64 between its passes, like the logits path: at
|logits| = 1e4 a float32 lse is off by ~5e-4 (its ulp), which would show in p and in the gradient."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends


def _large_logit_inputs(n=12, v=300, seed=0):
    """logits = hidden @ weight^T = 1e4 + a spread of a few units per row (hidden's second feature
    times weight's constant column), exactly representable in float32."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.stack([torch.randint(-8, 9, (v,), generator=g).float() / 4, torch.ones(v)], dim=1)
    hidden = torch.stack([torch.randint(1, 5, (n,), generator=g).float() / 2, torch.full((n,), 1e4)], dim=1)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("backend", cpu_fused_backends())
def test_linear_gradient_at_large_logits_matches_reference(backend):
    hidden, weight, targets = _large_logit_inputs()
    g = torch.Generator().manual_seed(1)
    c_lp, c_h = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)

    def grads(backend, dtype):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        logp, entropy = fk.linear_token_logprobs(h, w, targets, backend=backend, chunk_size=5)
        return torch.autograd.grad((c_lp * logp).sum() + (c_h * entropy).sum(), (h, w))

    got = grads(backend, torch.float32)
    want = grads("reference", torch.float64)
    # Columns of hidden's gradient: the spread feature (the constant one carries sum_j dL/dz_j ~ 0).
    assert_close_to_reference(got[0][:, 0], want[0][:, 0], dtype=torch.float32, kind="grad", name="hidden grad")
    assert_close_to_reference(got[1][:, 0], want[1][:, 0], dtype=torch.float32, kind="grad", name="weight grad")
