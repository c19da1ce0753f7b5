"""policy_loss against the float64 reference on drawn inputs and options (property tests), with a
normalizer and importance weights, with logit transforms, over several chunks of rows, and on degenerate
inputs (kept out of the property tests)."""

import dataclasses

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import ENTROPY_MODES, LOSS_AGG_MODES, POLICY_LOSS_TYPES
from fastrl_kernels.testing import make_logits, policy_configs, policy_inputs
from fastrl_kernels.torch_backend import rows_per_chunk
from tests.backends_under_test import cpu_fused_backends
from tests.conftest import examples
from tests.test_policy_loss import RICH, _case, _compare, _differs, _policy_mask, _reference

BACKENDS = cpu_fused_backends()
# Inputs of the main property tests: logits with spread (x - E far from 0 at most tokens, so the exact
# entropy's gradient is not ~0), V >= 2, at least one unmasked token, and ratios up to e^+-2 in some
# draws (past delta and dual clip). Degenerate inputs have their own deterministic tests below.
SPREAD = dict(kinds=("normal",), min_vocab=2, nonempty_mask=True, with_ignore=True, old_noise=(0.2, 1.0))


# ---------------------------------------------------------------------------------------------
# Property tests: random options and inputs.


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(500))
@given(inputs=policy_inputs(**SPREAD), config=policy_configs())
def test_fp32_matches_reference_for_every_option(backend, inputs, config):
    expected = _reference(inputs, config)
    assume(bool(expected.grad.abs().max() > 0))  # e.g. every unmasked token clipped with no KL or bonus
    _compare(backend, inputs, config, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(inputs=policy_inputs(dtypes=(torch.bfloat16,), **SPREAD),
       config=policy_configs(loss_types=("clip", "cispo", "sapo")))
def test_bf16_logits_match_reference_on_rounded_inputs(backend, inputs, config):
    expected = _reference(inputs, config)
    assume(bool(expected.grad.abs().max() > 0))
    _compare(backend, inputs, config, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(100))
@given(inputs=policy_inputs(**SPREAD), config=policy_configs(),
       normalizer=st.sampled_from((None, 7.0, 0.5, 64))
       | st.floats(0.5, 100.0).map(lambda x: torch.tensor(x, dtype=torch.float32)))
def test_normalizer_and_is_weights(backend, inputs, config, normalizer):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(inputs["old_logprobs"].shape, generator=g) * 2
    _compare(backend, inputs, config, normalizer=normalizer, is_weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ("token-mean", "seq-mean-token-mean"))
@pytest.mark.parametrize("normalizer", (None, 7.0, torch.tensor(0.5)), ids=("none", "float", "tensor"))
def test_normalizer_and_is_weights_match_reference(backend, normalizer, loss_agg):
    inputs = _case(17)
    weights = 2.0 * torch.rand(inputs["old_logprobs"].shape, generator=torch.Generator().manual_seed(17))
    config = dataclasses.replace(RICH, loss_agg=loss_agg)
    expected = _reference(inputs, config, normalizer=normalizer, is_weights=weights)
    assert _differs(expected.loss, _reference(inputs, config, normalizer=normalizer).loss)
    _compare(backend, inputs, config, expected, normalizer=normalizer, is_weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", (1.0, 0.7))
@pytest.mark.parametrize("logit_scale, softcap", [(0.5, None), (2.0, None), (1.0, 3.0), (1.7, 4.0)])
def test_logit_scale_and_softcap_match_reference(backend, logit_scale, softcap, temperature):
    # std 3 logits under softcap 3-4: tanh is well off its linear range, so its derivative matters
    transform = dict(logit_scale=logit_scale, softcap=softcap)
    inputs = _case(8, std=3.0, temperature=temperature, **transform)
    config = dataclasses.replace(RICH, temperature=temperature)
    expected = _reference(inputs, config, **transform)
    assert _differs(expected.logp, _reference(inputs, config).logp)
    _compare(backend, inputs, config, expected, **transform)


# The torch backend works through the rows in chunks of 2^18 // V rows: these span several chunks
# (the last one partial) and one chunk per row.
CHUNKED_CASES = [
    pytest.param((2, 65, 4099), dict(), id="clip-3chunks"),
    pytest.param((2, 65, 4099), dict(loss_type="gspo", temperature=0.7), id="gspo-3chunks"),
    pytest.param((2, 65, 4099), dict(loss_type="sapo", softcap=6.0, logit_scale=1.3), id="sapo-softcap-3chunks"),
    pytest.param((2, 2, 2**18 + 3), dict(loss_type="cispo"), id="cispo-row-per-chunk"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, options", CHUNKED_CASES)
def test_several_chunks_match_reference(backend, shape, options):
    batch, length, vocab = shape
    assert rows_per_chunk(batch * length, vocab) < batch * length
    transform = {k: options.pop(k) for k in ("softcap", "logit_scale") if k in options}
    config = dataclasses.replace(RICH, **options)
    # no padding: every chunk, the last one included, holds unmasked tokens
    inputs = _case(9, batch, length, vocab, temperature=config.temperature, padded=False, **transform)
    rows = rows_per_chunk(batch * length, vocab)
    assert bool(_policy_mask(inputs).reshape(-1)[(batch * length - 1) // rows * rows:].any())
    _compare(backend, inputs, config, **transform)


# ---------------------------------------------------------------------------------------------
# Degenerate inputs (kept out of the property tests).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_all_masked_gives_zero_loss_and_zero_grads(backend, loss_type):
    logits = torch.randn(2, 4, 33, requires_grad=True)
    targets = torch.randint(0, 33, (2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for agg in LOSS_AGG_MODES:
        out = fk.policy_loss(logits, targets, torch.randn(2, 4), torch.randn(2), mask, ref_logprobs=torch.randn(2, 4),
                             loss_type=loss_type, kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, backend=backend)
        out.loss.backward()
        assert out.loss == 0 and not torch.isnan(out.loss)
        assert (logits.grad == 0).all()
        assert all(float(v) == 0.0 for v in out.metrics.values()), out.metrics
        logits.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
def test_vocabulary_of_one_gives_zero_logprobs_entropy_and_grads(backend, entropy_mode):
    # p = 1 for the only token: logp = H = 0, and neither depends on the logit
    inputs = _case(13, vocab=1)
    config = dataclasses.replace(RICH, entropy_mode=entropy_mode)
    out = _compare(backend, inputs, config)
    assert (out.logprobs == 0).all() and (out.entropy == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ("flat", "all_equal", "peaked", "all_negative", "huge"))
def test_degenerate_logits_match_reference(backend, kind):
    inputs = _case(14)
    inputs["logits"] = make_logits(kind, inputs["logits"].shape, seed=14)
    if kind == "huge":
        # a random target has logp ~ -1e4, which float32 holds to ~1e-3 only: the ratio exp(logp - old)
        # would be off by that much whatever the backend. The row's top token has logp ~ 0.
        top = inputs["logits"].argmax(dim=-1)
        inputs["targets"] = torch.where(inputs["targets"] == -100, inputs["targets"], top)
    logp, _ = reference.token_logprobs(inputs["logits"], inputs["targets"])
    g = torch.Generator().manual_seed(15)
    inputs["old_logprobs"] = (logp + 0.5 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    inputs["ref_logprobs"] = (logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)).float()
    _compare(backend, inputs, RICH)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_padding_garbage_in_masked_positions_is_ignored(backend, loss_type):
    # masked tokens may hold anything in old / ref log-probs (padding): ratio and KL there must not
    # reach the loss, the metrics or the gradient as inf * 0 = NaN
    inputs = _case(16)
    masked = ~inputs["mask"]
    inputs["old_logprobs"] = inputs["old_logprobs"].masked_fill(masked, -1e4)
    inputs["ref_logprobs"] = inputs["ref_logprobs"].masked_fill(masked, 1e4)
    _compare(backend, inputs, dataclasses.replace(RICH, loss_type=loss_type))
