"""Pass 1 of policy_loss computes what the loss reads (log-probs, entropies and the row statistics of
pass 2) and not log sum p^2, a WPO statistic that would cost an extra product over every chunk of the
logits."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import native, torch_backend
from tests.backends_under_test import cpu_fused_backends

MODULES = {"torch": torch_backend, "native": native}


@pytest.mark.parametrize("backend", cpu_fused_backends())
def test_policy_loss_does_not_ask_pass_one_for_log_sum_p2(monkeypatch, backend):
    asked = []
    original = MODULES[backend].stats

    def stats(logits, targets, params, with_log_sum_p2=False):
        asked.append(with_log_sum_p2)
        return original(logits, targets, params, with_log_sum_p2)

    monkeypatch.setattr(MODULES[backend], "stats", stats)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    out = fk.policy_loss(logits, targets, -torch.rand(2, 3, generator=g), torch.randn(2, generator=g),
                         backend=backend, entropy_coef=0.01)
    out.loss.backward()
    assert len(asked) == 1 and not asked[0]
