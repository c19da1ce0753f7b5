"""The float64 reference statistics at the edges the fused backends are checked on: a -inf logit (a
masked vocabulary entry) has p = 0 and adds nothing, a row holding +inf has no distribution (NaN), and
[B, T, V] logits give statistics of shape [B, T]."""

from __future__ import annotations

import math

import torch

from fastrl_kernels.reference import logprobs as ref

INF = float("inf")


def test_a_minus_inf_logit_adds_nothing_to_the_entropy_or_mean_x():
    # p log p -> 0 and p x -> 0 as p -> 0: the row is the distribution over its finite entries.
    z = torch.tensor([[0.5, -INF, 2.0, -1.0]], dtype=torch.float64, requires_grad=True)
    stats = ref.token_stats(z, torch.tensor([2]))
    finite = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    p = torch.softmax(finite, -1)
    torch.testing.assert_close(stats.entropy, -(p * p.log()).sum().reshape(1), rtol=0, atol=1e-15)
    torch.testing.assert_close(stats.mean_x, (p * finite).sum().reshape(1), rtol=0, atol=1e-15)
    (stats.entropy + stats.mean_x).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[0, 1] == 0.0  # an entry of probability 0 moves nothing


def test_a_row_holding_plus_inf_gives_nan_logp_and_entropy():
    # logsumexp alone would give logp = -inf at the finite entries of such a row.
    z = torch.tensor([[0.0, INF, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    stats = ref.token_stats(z, torch.tensor([0, 0]))
    assert math.isnan(stats.logp[0]) and math.isnan(stats.entropy[0])
    assert torch.isfinite(stats.logp[1]) and torch.isfinite(stats.entropy[1])


def test_batched_logits_give_statistics_of_the_leading_shape():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    stats = ref.token_stats(z, torch.randint(0, 5, (2, 3), generator=g))
    for field in stats:
        assert field.shape == (2, 3)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(stats.mean_x, (p * z).sum(-1), rtol=0, atol=1e-14)
    torch.testing.assert_close(stats.entropy, stats.lse - stats.mean_x, rtol=0, atol=1e-14)
