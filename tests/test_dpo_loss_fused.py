"""fused_dpo_loss (logits in; the loss, rewards and d/dlogits out) against reference.sequence_logprobs +
reference.dpo_loss on each backend: every loss type, drawn options, ignore_index and temperature, a vocabulary
over one native block, the gradient written over the logits, and the Triton kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels.config import DPO_LOSS_TYPES, DPOConfig
from tests.conftest import examples
from tests.test_dpo_loss import BACKENDS, _check_fused, _fused_case, _need_backend, configs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_fused_matches_reference_every_loss_type(loss_type, backend, dtype):
    _need_backend(backend)
    cfg = DPOConfig(beta=0.2, loss_type=loss_type, label_smoothing=0.1,
                    average_logps=loss_type == "ipo")
    _check_fused(backend, dtype, cfg, _fused_case(11, 3, 5, 37, dtype, average=cfg.average_logps))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(cfg=configs, seed=st.integers(0, 2**16), batch=st.integers(1, 3), steps=st.integers(1, 6),
       vocab=st.integers(2, 60), average=st.booleans(), ld_alpha=st.sampled_from([None, 0.0, 0.5]),
       weighting=st.booleans(), temperature=st.sampled_from([1.0, 0.7, 1.6]), ignore_index=st.sampled_from([-100, -1]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fused_options_match_reference(backend, cfg, seed, batch, steps, vocab, average, ld_alpha, weighting,
                                       temperature, ignore_index, dtype):
    _need_backend(backend)
    cfg = cfg.with_overrides(average_logps=average, ld_alpha=ld_alpha, use_weighting=weighting)
    case = _fused_case(seed, batch, steps, vocab, dtype, ignore_index, temperature, average, ld_alpha)
    _check_fused(backend, dtype, cfg, case, temperature, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_fused_ignore_index_and_temperature_match_reference(backend, ignore_index):
    # 0 is a class id: tokens whose target is 0 are not response tokens, whatever the mask says.
    _need_backend(backend)
    cfg = DPOConfig(loss_type=("sigmoid", "bco_pair"), beta=0.3, use_weighting=True)
    case = _fused_case(4, 2, 6, 41, torch.float32, ignore_index, temperature=0.8)
    _check_fused(backend, torch.float32, cfg, case, temperature=0.8, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_vocabulary_over_one_native_block_matches_reference(backend, temperature):
    # V = 2500 > 2048: the native kernel walks each row in two blocks.
    _need_backend(backend)
    cfg = DPOConfig(loss_type="sigmoid", beta=0.5, ld_alpha=0.5)
    case = _fused_case(6, 1, 3, 2500, torch.float32, temperature=temperature, ld_alpha=0.5)
    _check_fused(backend, torch.float32, cfg, case, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    dict(cfg=DPOConfig(loss_type=("sigmoid", "apo_zero"), use_weighting=True, ld_alpha=0.5)),
    dict(cfg=DPOConfig(loss_type="ipo", average_logps=True), temperature=0.7, ignore_index=-1),
], ids=["mixture_wpo_ld", "ipo_temperature_ignore"])
def test_fused_inplace_grad_overwrites_logits_with_the_reference_gradient(options, backend, dtype):
    _need_backend(backend)
    options = dict(options)
    cfg = options.pop("cfg")
    case = _fused_case(5, 2, 4, 29, dtype, options.get("ignore_index", -100), options.get("temperature", 1.0),
                       cfg.average_logps, cfg.ld_alpha)
    _check_fused(backend, dtype, cfg, case, inplace=True, **options)


@pytest.mark.triton
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_fused_triton_matches_reference(loss_type):
    _need_backend("triton")
    cfg = DPOConfig(loss_type=loss_type, use_weighting=loss_type == "discopop", average_logps=loss_type == "ipo")
    _check_fused("triton", torch.float32, cfg, _fused_case(2, 2, 4, 70, torch.float32, average=cfg.average_logps))


@pytest.mark.triton
def test_fused_triton_inplace_with_temperature_and_ignore_index():
    _need_backend("triton")
    cfg = DPOConfig(loss_type=("sigmoid", "hinge"), ld_alpha=0.5)
    case = _fused_case(3, 2, 4, 70, torch.float32, -1, 0.7, ld_alpha=0.5)
    _check_fused("triton", torch.float32, cfg, case, temperature=0.7, inplace=True, ignore_index=-1)
