"""How the float64 policy reference reads a mask: of the values' shape (refused by name otherwise),
counted exactly whatever its dtype, moved to the values' device; and masked or ignored tokens whose
logits hold NaN leave the loss and the gradient finite."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.reference import policy as ref


def test_a_mask_of_another_shape_is_refused_by_name():
    values = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^mask: expected shape \(2, 3\), got \(3, 2\)$"):
        ref.aggregate(values, torch.ones(3, 2), "token-mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_a_bfloat16_mask_counts_every_token(mode):
    # 301 is not a bfloat16 number: the token count must not be taken in the mask's own dtype.
    values = torch.arange(301, dtype=torch.float64).reshape(1, 301)
    mask = torch.ones(1, 301, dtype=torch.bfloat16)
    assert ref.aggregate(values, mask, mode).item() == 150.0  # the mean of 0 .. 300


def test_a_mask_on_another_device_is_moved_to_the_values():
    values = torch.empty(2, 3, dtype=torch.float64, device="meta")
    loss = ref.aggregate(values, torch.ones(2, 3, dtype=torch.bool), "token-mean")
    assert loss.device.type == "meta" and loss.dtype == torch.float64 and loss.shape == ()


def test_nan_logits_of_masked_and_ignored_tokens_give_a_finite_loss_and_zero_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    targets = torch.randint(0, 6, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False  # a masked token ...
    targets[1, 2] = -100  # ... and an ignored one, both with garbage logits
    logits[0, 1] = logits[1, 2] = float("nan")
    logits.requires_grad_(True)
    old, ref_lp = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    loss, logp, entropy, _ = ref.policy_loss(logits, targets, old, torch.randn(2, generator=g), mask,
                                             ref_logprobs=ref_lp, kl_coef=0.1, entropy_coef=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 1] == 0).all() and (logits.grad[1, 2] == 0).all()
    assert (logits.grad[0, 0] != 0).any()  # the other tokens do get a gradient
