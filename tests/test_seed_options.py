"""The seed's numpy functions compute in float64 whatever the inputs' dtype, and sequence_logps is the
log-softmax of each row (stable at large logits, over any leading axes, mask None = every token)."""

import math

import numpy as np
import pytest

from fastrl_kernels.reference import seed

# A float64 value and a longdouble one that rounds to it: the seed functions work on the float64
# rounding of their inputs, so the two must give the same result.
TINY = np.longdouble(2.0) ** -60
HAS_LONGDOUBLE = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant
needs_longdouble = pytest.mark.skipif(not HAS_LONGDOUBLE, reason="np.longdouble is float64 here")


def _wider(values) -> np.ndarray:
    """longdouble values just off float64 ones (by 2^-60 relative), that round back to them."""
    x = np.asarray(values, dtype=np.longdouble)
    return x + TINY * np.abs(x)


@needs_longdouble
def test_wider_inputs_round_to_the_float64_values():
    x = _wider([-0.5, -2.0, 1.0])
    assert (x != x.astype(np.float64)).all()
    np.testing.assert_array_equal(x.astype(np.float64), [-0.5, -2.0, 1.0])


# ---------------------------------------------------------------------------------------------
# ppo_loss_with_gae_entropy and grpo_loss


def test_ppo_float32_inputs_are_computed_in_float64():
    old = np.array([-0.1, -0.7, -1.3, -2.9, -0.35], dtype=np.float32)
    new = np.array([-0.3, -0.6, -1.1, -3.3, -0.45], dtype=np.float32)
    adv = np.array([0.3, -1.7, 0.9, 1.1, -0.2], dtype=np.float32)
    for entropy_coef in (0.0, 0.01, 0.3):
        got = seed.ppo_loss_with_gae_entropy(old, new, adv, 0.05, 0.2, entropy_coef)
        want = seed.ppo_loss_with_gae_entropy(*(a.astype(np.float64) for a in (old, new, adv)), 0.05, 0.2,
                                              entropy_coef)
        assert type(got) is float
        assert got == pytest.approx(want, rel=1e-15, abs=0)


def test_ppo_entropy_term_is_the_float64_mean():
    # kl and clip terms are 0 (new = old, A = 0): the loss is entropy_coef * mean(new), summed in float64
    new = np.array([-0.1, -0.2, -0.3, -1e-8], dtype=np.float32)
    got = seed.ppo_loss_with_gae_entropy(new, new, np.zeros(4, dtype=np.float32), 0.5, 0.2, 1.0)
    want = math.fsum(float(v) for v in new) / 4
    assert got == pytest.approx(want, rel=1e-15, abs=0)


@needs_longdouble
@pytest.mark.parametrize("wide", ["old", "new", "advantages"])
def test_ppo_wider_inputs_give_the_result_of_their_float64_rounding(wide):
    # In float64: new = old, so ratio = 1, kl = 0, and the clip term is -mean(A) = 0 with A = (1, -1).
    values = {"old": [-0.5, -2.0], "new": [-0.5, -2.0], "advantages": [1.0, -1.0]}
    args = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    args[wide] = _wider(values[wide])
    got = seed.ppo_loss_with_gae_entropy(args["old"], args["new"], args["advantages"], 1.0, 0.2, 0.0)
    assert got == 0.0
    assert type(got) is float


@needs_longdouble
@pytest.mark.parametrize("wide", ["old", "new"])
def test_grpo_wider_inputs_give_the_result_of_their_float64_rounding(wide):
    # In float64: new = old per response, so ratio = 1 and kl = 0; the clip terms -A of A = (1, -1) cancel.
    values = [[-0.5, -1.5], [-2.0]]
    old = [np.asarray(v, dtype=np.float64) for v in values]
    new = [np.asarray(v, dtype=np.float64) for v in values]
    if wide == "old":
        old = [_wider(v) for v in values]
    else:
        new = [_wider(v) for v in values]
    got = seed.grpo_loss(old, new, np.array([1.0, -1.0]), 0.5, 0.2)
    assert got == 0.0
    assert type(got) is float


def test_grpo_float32_inputs_are_computed_in_float64():
    old = [np.array([-0.1, -0.7, -1.3], dtype=np.float32), np.array([-2.9, -0.35], dtype=np.float32)]
    new = [np.array([-0.3, -0.6, -1.1], dtype=np.float32), np.array([-3.3, -0.45], dtype=np.float32)]
    adv = np.array([0.7, -1.2])
    got = seed.grpo_loss(old, new, adv, 0.1, 0.2)
    want = seed.grpo_loss([o.astype(np.float64) for o in old], [n.astype(np.float64) for n in new], adv, 0.1, 0.2)
    assert got == pytest.approx(want, rel=1e-15, abs=0)


# ---------------------------------------------------------------------------------------------
# grae_advantages


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64, np.bool_])
def test_grae_returns_float64_for_any_reward_dtype(dtype):
    rewards = np.array([1, 0, 0, 1, 1], dtype=dtype)
    got = seed.grae_advantages(rewards)
    assert got.dtype == np.float64
    # mean 0.6, population std sqrt(0.24)
    std = math.sqrt(0.24)
    want = [(r - 0.6) / (std + 1e-8) for r in (1, 0, 0, 1, 1)]
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_grae_float32_rewards_equal_their_float64_values():
    rewards = np.array([0.1, 0.7, -0.3, 0.25, 1.9, -1.1], dtype=np.float32)
    got = seed.grae_advantages(rewards)
    want = seed.grae_advantages(rewards.astype(np.float64))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# sequence_logps


def _hand_log_softmax(row, i: int) -> float:
    """log softmax(row)[i] in plain math, shifted by the row's own max."""
    top = max(row)
    return row[i] - top - math.log(math.fsum(math.exp(v - top) for v in row))


LOGITS = [
    [[2.0, -1.0, 0.5, 4.0], [-3.0, 1.5, 0.0, 2.5], [5.0, -2.0, 1.0, -4.0]],
    [[0.0, 3.5, -1.5, 1.0], [4.5, -0.5, 2.0, -2.5], [-1.0, -3.5, 6.0, 0.5]],
]
IDS = [[3, 1, 0], [1, 0, 2]]


def _hand(logits, ids, mask):
    return [math.fsum(_hand_log_softmax(r, i) * k for r, i, k in zip(rows, row_ids, m))
            for rows, row_ids, m in zip(logits, ids, mask)]


def test_sequence_logps_without_mask_sums_every_token():
    got = seed.sequence_logps(np.array(LOGITS), np.array(IDS))
    assert got.dtype == np.float64 and got.shape == (2,)
    np.testing.assert_allclose(got, _hand(LOGITS, IDS, [[1, 1, 1]] * 2), rtol=1e-14, atol=0)
    np.testing.assert_array_equal(got, seed.sequence_logps(np.array(LOGITS), np.array(IDS), np.ones((2, 3))))


@pytest.mark.parametrize("logits_dtype", [np.float16, np.float32, np.float64, np.longdouble])
@pytest.mark.parametrize("mask_dtype", [None, np.bool_, np.int64, np.float32, np.float64, np.longdouble])
def test_sequence_logps_is_float64_whatever_the_dtypes(logits_dtype, mask_dtype):
    logits = np.array(LOGITS, dtype=logits_dtype)
    mask = None if mask_dtype is None else np.array([[1, 0, 1], [1, 1, 0]], dtype=mask_dtype)
    got = seed.sequence_logps(logits, np.array(IDS), mask)
    assert got.dtype == np.float64 and got.shape == (2,)
    upcast = [[[float(v) for v in row] for row in rows] for rows in logits.astype(np.float64)]
    ones = [[1, 1, 1]] * 2 if mask is None else mask.astype(np.float64).tolist()
    np.testing.assert_allclose(got, _hand(upcast, IDS, ones), rtol=1e-14, atol=0)


def test_sequence_logps_is_stable_at_large_logits_of_different_scales():
    # log softmax is shift-invariant per row: row 0 near 1000, row 1 near 0 and row 2 near -1000 give
    # the same log-probs, finite
    base = [[0.0, -1.0, 2.0], [1.5, 0.5, -3.0]]
    logits = np.array([[[v + shift for v in row] for row in base] for shift in (1000.0, 0.0, -1000.0)])
    ids = np.array([[2, 0], [2, 0], [2, 0]])
    got = seed.sequence_logps(logits, ids)
    want = _hand_log_softmax(base[0], 2) + _hand_log_softmax(base[1], 0)
    np.testing.assert_allclose(got, [want] * 3, rtol=1e-12, atol=0)


def test_sequence_logps_sums_over_the_last_axis_for_any_leading_axes():
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.standard_normal((2, 3, 4, 5))
    ids = rng.integers(0, 5, (2, 3, 4))
    got = seed.sequence_logps(logits, ids)
    assert got.shape == (2, 3)
    for g in range(2):
        np.testing.assert_allclose(got[g], _hand(logits[g].tolist(), ids[g].tolist(), [[1] * 4] * 3),
                                   rtol=1e-13, atol=0)
    # one response [T, V] with ids [T] gives its log-likelihood
    single = seed.sequence_logps(logits[0, 0], ids[0, 0])
    assert np.shape(single) == ()
    assert float(single) == pytest.approx(_hand([logits[0, 0].tolist()], [ids[0, 0].tolist()], [[1] * 4])[0],
                                          rel=1e-13)
