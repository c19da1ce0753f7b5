"""value_loss(..., return_clipfrac=True): (loss, clipfrac) equal to the reference and to verl 0.9.1's
``compute_value_loss`` (``vf_loss``, ``vf_clipfrac``); the default call form still returns the loss alone."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference as ref
from fastrl_kernels.testing import assert_close_to_reference
from tests.verl_import import import_core_algos

FNS = [pytest.param(ref.value_loss, id="reference"), pytest.param(fk.value_loss, id="ops")]


def _inputs(seed: int, shape=(4, 7)):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    old = values + 0.5 * torch.randn(shape, generator=g)
    returns = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    return values, old, returns, mask


@pytest.mark.parametrize("fn", FNS)
def test_default_call_returns_the_loss_alone(fn):
    values, old, returns, mask = _inputs(0)
    plain = fn(values, old, returns, mask, clip=0.2)
    loss, clipfrac = fn(values, old, returns, mask, clip=0.2, return_clipfrac=True)
    assert isinstance(plain, torch.Tensor) and plain.dim() == 0
    assert torch.equal(plain, loss)
    assert clipfrac.dim() == 0 and not clipfrac.requires_grad


@pytest.mark.parametrize("fn", FNS)
def test_clipfrac_hand_case(fn):
    # v - old = [0.5, -0.5, 0.1, 0.5]; clip 0.2: tokens 0, 1 clip; token 0 clipped error (0.2 - 1)^2 = 0.64
    # > (0.5 - 1)^2 = 0.25 (counts), token 1 (-0.2 - 1)^2 = 1.44 < (-0.5 - 1)^2 = 2.25 (does not),
    # token 3 clipped and larger but masked: clipfrac 1 / 3.
    values = torch.tensor([[0.5, -0.5, 0.1, 0.5]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _, clipfrac = fn(values, old, returns, mask, clip=0.2, return_clipfrac=True)
    assert clipfrac.item() == pytest.approx(1.0 / 3.0)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("case", ["no_clip", "all_masked", "empty", "one_sequence"])
def test_clipfrac_edges(fn, case):
    values, old, returns, mask = _inputs(1)
    clip = 0.1
    if case == "no_clip":
        clip = None
    elif case == "all_masked":
        mask = torch.zeros_like(mask)
    elif case == "empty":
        values, old, returns, mask = (x[:, :0] for x in (values, old, returns, mask))
    else:
        values, old, returns, mask = values[0], old[0], returns[0], mask[0]
    loss, clipfrac = fn(values, old, returns, mask, clip=clip, return_clipfrac=True)
    assert torch.isfinite(loss) and torch.isfinite(clipfrac)
    if case != "one_sequence":
        assert clipfrac.item() == 0.0
    else:
        want = ref.value_loss(values[None].double(), old[None].double(), returns[None].double(), mask[None],
                              clip=clip, return_clipfrac=True)[1]
        assert clipfrac.item() == pytest.approx(want.item())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_ops_matches_reference(seed, loss_agg):
    values, old, returns, mask = _inputs(seed)
    got = fk.value_loss(values, old, returns, mask, clip=0.3, loss_agg=loss_agg, return_clipfrac=True)
    want = ref.value_loss(values.double(), old.double(), returns.double(), mask, clip=0.3, loss_agg=loss_agg,
                          return_clipfrac=True)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_close_to_reference(got[0], want[0], dtype=torch.float32, name="value_loss")
    torch.testing.assert_close(got[1].double(), want[1], rtol=0, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_equals_verl_compute_value_loss(seed, loss_agg):
    core_algos = import_core_algos()
    values, old, returns, mask = _inputs(seed)
    mask = mask.clone()
    mask[:, 0] = True  # verl's masked_mean divides by sum(mask) + eps: keep a token per sequence
    want_loss, want_clipfrac = core_algos.compute_value_loss(values, returns, old, mask.float(), 0.3,
                                                             loss_agg_mode=loss_agg)
    for fn in (fk.value_loss, ref.value_loss):
        loss, clipfrac = fn(values, old, returns, mask, clip=0.3, loss_agg=loss_agg, return_clipfrac=True)
        torch.testing.assert_close(loss.float(), want_loss.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(clipfrac.float(), torch.as_tensor(want_clipfrac).float(), rtol=1e-5, atol=1e-7)


def test_return_clipfrac_must_be_a_bool():
    values, old, returns, mask = _inputs(0)
    with pytest.raises(ValueError, match="return_clipfrac"):
        fk.value_loss(values, old, returns, mask, clip=0.2, return_clipfrac=1)
