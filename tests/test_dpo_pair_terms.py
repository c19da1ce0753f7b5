"""The DPO pair algebra (``fastrl_kernels.losses.dpo``): result dtypes, ties, mixture weights, pair
weights and the errors of the functions a config cannot reach."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.config import DPOConfig
from fastrl_kernels.losses import dpo as fast
from fastrl_kernels.reference import dpo as ref


def _pairs(dtype=torch.float32, seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, generator=g) * 2 - 20).to(dtype) for _ in range(4))


def test_accuracy_counts_only_strictly_positive_margins():
    # chosen and rejected with equal log-ratios: margin exactly 0, which is not a win (TRL: chosen > rejected).
    pc = torch.tensor([-10.0, -12.0, -9.0])
    out = fk.dpo_loss(pc, pc.clone(), pc.clone(), pc.clone())
    assert torch.equal(out.margins, torch.zeros(3))
    assert out.accuracy.item() == 0.0
    better = fk.dpo_loss(pc + torch.tensor([1.0, 0.0, -1.0]), pc, pc, pc)
    assert better.accuracy.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_results_are_float32_or_float64_whatever_the_input_precision(dtype, expected):
    out = fk.dpo_loss(*_pairs(dtype), loss_type="sigmoid", beta=0.3)
    for name, value in out._asdict().items():
        assert value.dtype == expected, name
    # computed in that precision: the same as the inputs widened first
    wide = fk.dpo_loss(*(x.to(expected) for x in _pairs(dtype)), loss_type="sigmoid", beta=0.3)
    assert torch.equal(out.loss, wide.loss)


def test_mixture_weights_scale_each_term_including_a_weight_of_two():
    inputs = _pairs(torch.float64, seed=1)
    cfg = DPOConfig(loss_type=("sigmoid", "hinge"), loss_weights=(2.0, 0.5), beta=0.2)
    losses, _, _ = fast.dpo_pair_losses(*inputs, cfg)
    sigmoid, _, _ = fast.dpo_pair_losses(*inputs, DPOConfig(loss_type="sigmoid", beta=0.2))
    hinge, _, _ = fast.dpo_pair_losses(*inputs, DPOConfig(loss_type="hinge", beta=0.2))
    torch.testing.assert_close(losses, 2.0 * sigmoid + 0.5 * hinge, rtol=1e-12, atol=0)
    expected, _, _ = ref.dpo_loss(*inputs, beta=0.2, loss_type=["sigmoid", "hinge"], loss_weights=[2.0, 0.5])
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.bfloat16])
def test_pair_weights_in_another_dtype_keep_the_loss_dtype(weight_dtype):
    inputs = _pairs(torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    w_c, w_r = (torch.rand(4, generator=g) + 0.5 for _ in range(2))
    losses, _, _ = fast.dpo_pair_losses(*inputs, DPOConfig(), w_c.to(weight_dtype), w_r.to(weight_dtype))
    plain, _, _ = fast.dpo_pair_losses(*inputs, DPOConfig())
    assert losses.dtype == torch.float32
    weights = w_c.to(weight_dtype).float() * w_r.to(weight_dtype).float()
    torch.testing.assert_close(losses, plain * weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("given", ["chosen", "rejected"])
def test_pair_losses_need_both_weights_or_neither(given):
    weights = dict(chosen_weights=None, rejected_weights=None)
    weights[f"{given}_weights"] = torch.ones(4)
    with pytest.raises(ValueError, match=r"^chosen_weights / rejected_weights: expected both \[B\] tensors or neither"):
        fast.dpo_pair_losses(*_pairs(), DPOConfig(), **weights)


def test_an_unknown_f_divergence_is_refused_naming_it():
    # DPOConfig refuses it first; the algebra refuses it too for a config that skipped validation.
    with pytest.raises(ValueError, match=r"^f_divergence: unknown 'tv'$"):
        fast.f_divergence_scores(torch.zeros(3), "tv", 0.5)
