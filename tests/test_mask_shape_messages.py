"""A mask of the wrong shape is refused by every op that takes one, and the message describes the
expected shape against the tensor the caller passed: logits on the logits path, hidden on the lm_head
path."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk

B, T, V, H = 2, 5, 11, 7


def _policy_inputs(g):
    old = torch.randn(B, T, generator=g) - 2.0
    return dict(old_logprobs=old, advantages=torch.randn(B, generator=g))


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_policy_ops_describe_the_mask_shape_against_their_input(path):
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (B, T), generator=g)
    bad_mask = torch.ones(B, T + 1)
    expected = rf"^mask: expected shape \({B}, {T}\) \(the leading shape of {path}\)"
    with pytest.raises(ValueError, match=expected):
        if path == "logits":
            fk.policy_loss(torch.randn(B, T, V, generator=g), targets, mask=bad_mask, backend="torch",
                           **_policy_inputs(g))
        else:
            fk.linear_policy_loss(torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g), targets,
                                  mask=bad_mask, backend="torch", **_policy_inputs(g))


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_dpo_ops_describe_the_mask_shape_against_their_input(path):
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    refs = dict(ref_chosen_logps=torch.randn(B, generator=g), ref_rejected_logps=torch.randn(B, generator=g))
    bad_mask = torch.ones(2 * B, T + 1)
    expected = rf"^mask: expected shape \({2 * B}, {T}\) \(the leading shape of {path}\)"
    with pytest.raises(ValueError, match=expected):
        if path == "logits":
            fk.fused_dpo_loss(torch.randn(2 * B, T, V, generator=g), targets, mask=bad_mask, backend="torch",
                              **refs)
        else:
            fk.linear_dpo_loss(torch.randn(2 * B, T, H, generator=g), torch.randn(V, H, generator=g), targets,
                               mask=bad_mask, backend="torch", **refs)
