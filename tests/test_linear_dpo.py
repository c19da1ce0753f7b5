"""linear_dpo_loss (the lm_head DPO loss) against the float64 reference and fused_dpo_loss on the logits, and
its input checks: pairs of sequences, the bias and the reference log-probs (shape, dtype, device), and
torch.no_grad."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels.ops.linear import count_gemms
from fastrl_kernels.reference import dpo as dpo_ref
from fastrl_kernels.testing.strategies import seeds, vocab_sizes
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples
from tests.test_dpo_loss import LOG_RATIO_SPREAD
from tests.test_dpo_loss import _check_outputs as check_dpo_outputs
from tests.test_dpo_loss import _expected as dpo_expected
from tests.test_dpo_loss import configs as dpo_configs
from tests.test_linear import _assert_grads, _chain, _chain_scales, _chunks, _leaves, _problem, _reference_logits

BACKENDS = cpu_fused_backends()


def _dpo_problem(seed, vocab=97, ignore_index=-100, temperature=1.0, average=False, ld_alpha=None):
    """Two pairs of 7 steps, masked prompts, one short response; reference sequence log-probs within
    LOG_RATIO_SPREAD of the policy's (formed the same way)."""
    hidden, weight, bias, targets = _problem((4, 7), 12, vocab, seed=seed, ignore_index=ignore_index)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[:, :2] = False
    mask[1, 5:] = False
    policy = dpo_ref.sequence_logprobs(_reference_logits(hidden, weight, bias).detach(), targets, mask,
                                       average=average, ld_alpha=ld_alpha, temperature=temperature,
                                       ignore_index=ignore_index)
    g = torch.Generator().manual_seed(seed)
    ref_logps = (policy + LOG_RATIO_SPREAD * (2 * torch.rand(4, generator=g, dtype=torch.float64) - 1)).float()
    return hidden, weight, bias, targets, mask, ref_logps[:2], ref_logps[2:]


def _check_dpo(backend, config, chunk=5, temperature=1.0, ignore_index=-100, vocab=97, seed=9):
    """linear_dpo_loss vs the float64 reference on the logits (two sweeps: 4 GEMMs a chunk), outputs and the
    hidden / weight / bias gradients; returns the op's output and the problem."""
    problem = _dpo_problem(seed, vocab, ignore_index, temperature, config.average_logps, config.ld_alpha)
    hidden, weight, bias, targets, mask, ref_c, ref_r = problem
    leaves = _leaves(hidden, weight, bias)
    with count_gemms() as counter:
        out = fk.linear_dpo_loss(*leaves[:2], targets, mask, ref_c, ref_r, bias=leaves[2], chunk_size=chunk,
                                 backend=backend, config=config, temperature=temperature, ignore_index=ignore_index)
        out.loss.backward()
    assert counter.routes == ["stats", "two_pass"] and counter.total == 4 * _chunks(28, chunk)
    logits = _reference_logits(hidden, weight, bias)
    seq, weights, chosen, rejected, grad, coefficient = dpo_expected(logits, targets, mask, ref_c, ref_r, config,
                                                                     temperature, ignore_index)
    name = f"{backend} dpo {config.loss_type}"
    check_dpo_outputs(out, seq, weights, chosen, rejected, ref_c, ref_r, config, torch.float32, name)
    scales = _chain_scales(logits, targets, coefficient, hidden, weight, ignore_index, temperature)
    _assert_grads(leaves, _chain(logits, hidden, weight, bias, grad), torch.float32, name, scales)
    return out, problem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(loss_type="sigmoid"),
    dict(loss_type="ipo", average_logps=True),
    dict(loss_type=("sigmoid", "hinge"), loss_weights=(1.0, 0.5), ld_alpha=0.5),
    dict(loss_type="sigmoid", use_weighting=True, beta=0.5),
], ids=["sigmoid", "ipo", "mixture_ld", "wpo"])
def test_dpo_matches_reference_and_fused_logits_path(backend, case):
    out, (hidden, weight, bias, targets, mask, ref_c, ref_r) = _check_dpo(backend, fk.DPOConfig(**case))
    logits32 = torch.addmm(bias, hidden.view(28, 12), weight.t()).view(4, 7, -1)
    fused = fk.fused_dpo_loss(logits32, targets, mask, ref_c, ref_r, backend=backend, **case)
    torch.testing.assert_close(out.loss, fused.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_dpo_temperature_and_ignore_index_match_reference(backend, ignore_index):
    # V = 2100: two blocks of the native kernel.
    config = fk.DPOConfig(loss_type=("sigmoid", "apo_zero"), beta=0.3, use_weighting=True)
    _check_dpo(backend, config, chunk=6, temperature=0.7, ignore_index=ignore_index, vocab=2100, seed=35)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(config=dpo_configs, seed=seeds(), vocab=vocab_sizes(300, min_vocab=2), chunk=st.integers(1, 30),
       average=st.booleans(), ld_alpha=st.sampled_from([None, 0.0, 0.5]), weighting=st.booleans(),
       temperature=st.sampled_from([1.0, 0.7, 1.6]), ignore_index=st.sampled_from([-100, -1]))
def test_dpo_matches_reference_every_option(backend, config, seed, vocab, chunk, average, ld_alpha, weighting,
                                            temperature, ignore_index):
    config = config.with_overrides(average_logps=average, ld_alpha=ld_alpha, use_weighting=weighting)
    _check_dpo(backend, config, chunk, temperature, ignore_index, vocab, seed)


# ----------------------------------------------------------------------------------------------------
# linear_dpo_loss input checks


def _dpo_inputs():
    hidden, weight, bias, targets = _problem((4, 3), 6, 25, seed=47)
    return hidden, weight, targets, torch.tensor([-9.0, -8.0]), torch.tensor([-9.5, -7.5])


@pytest.mark.parametrize("shape", [(4, 6), (1, 3, 6), (3, 3, 6), (2, 2, 3, 6)])
def test_dpo_hidden_must_be_pairs_of_sequences(shape):
    # [2B, T, H] with an even 2B >= 2: a 2-D batch of tokens, a single sequence and an odd count are refused.
    hidden = torch.randn(shape)
    weight = torch.randn(25, 6)
    targets = torch.randint(0, 25, shape[:-1])
    message = ("hidden: expected shape [2B, T, H] with an even number 2B >= 2 of rows (chosen then rejected), "
               f"got {shape}")
    with pytest.raises(ValueError, match=re.escape(message) if len(shape) < 4 else "hidden"):
        fk.linear_dpo_loss(hidden, weight, targets, None, torch.zeros(1), torch.zeros(1), backend="torch")


def test_dpo_bias_of_the_wrong_shape_is_refused_by_name():
    hidden, weight, targets, ref_c, ref_r = _dpo_inputs()
    with pytest.raises(ValueError, match="^bias: "):
        fk.linear_dpo_loss(hidden, weight, targets, None, ref_c, ref_r, bias=torch.zeros(3), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_weighting", [False, True])
def test_dpo_under_no_grad_equals_the_grad_mode_values(backend, use_weighting):
    # Under torch.no_grad the DPO loss takes the stats-only route (one GEMM per chunk); WPO weights
    # need log sum p^2 there too.
    hidden, weight, targets, ref_c, ref_r = _dpo_inputs()
    kwargs = dict(backend=backend, chunk_size=5, use_weighting=use_weighting, beta=0.3)
    with_grad = fk.linear_dpo_loss(hidden.clone().requires_grad_(True), weight, targets, None, ref_c, ref_r, **kwargs)
    with torch.no_grad():
        without = fk.linear_dpo_loss(hidden, weight, targets, None, ref_c, ref_r, **kwargs)
    for got, want in zip(without, with_grad):
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
    plain = fk.linear_dpo_loss(hidden, weight, targets, None, ref_c, ref_r, **{**kwargs, "use_weighting": False})
    if use_weighting:  # the weights are not all 1 on these inputs, so the check above saw them
        assert not torch.allclose(without.loss, plain.loss)


# A reference tensor of the wrong shape, of a wrong dtype, or not on hidden's device (meta stands in for
# a GPU) is refused with its name.
BAD_REFERENCE_LOGPS = {
    "shape": (lambda t: torch.zeros(3), ValueError,
              lambda name: f"^{re.escape(f'{name}: expected shape (2,) ([B], half the rows of hidden), got (3,)')}$"),
    "dtype": (lambda t: torch.zeros(2, dtype=torch.int64), TypeError,
              lambda name: rf"^{name}: expected dtype in .*got torch\.int64$"),
    "device": (lambda t: t.to("meta"), ValueError,
               lambda name: f"^{re.escape(f'{name}: expected a tensor on cpu like hidden, got meta')}$"),
}


@pytest.mark.parametrize("bad", list(BAD_REFERENCE_LOGPS))
@pytest.mark.parametrize("name", ["ref_chosen_logps", "ref_rejected_logps"])
def test_dpo_reference_logps_that_do_not_fit_are_refused_by_name(name, bad):
    make, error, pattern = BAD_REFERENCE_LOGPS[bad]
    hidden, weight, targets, ref_c, ref_r = _dpo_inputs()
    refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    refs[name] = make(refs[name])
    with pytest.raises(error, match=pattern(name)):
        fk.linear_dpo_loss(hidden, weight, targets, None, refs["ref_chosen_logps"], refs["ref_rejected_logps"],
                           backend="torch")
