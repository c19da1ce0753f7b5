"""reference.dpo: default option values, the logit transforms of sequence_logprobs / wpo_weights, and
the errors naming the bad argument, against values computed by hand (plain math, one element at a time)."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from fastrl_kernels.reference import dpo as ref

# Sequence log-probs of two pairs; with beta 0.1 the DPO logits h are 0.1 * (1.0 - 0.5) = 0.05 and
# 0.1 * (-0.25 - 2.0) = -0.225, close enough to discopop's tau = 0.05 that tau changes the loss.
PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.75], [-2.5, -4.0]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pairs():
    """Per pair: the log-ratios u_c = pc - rc and u_r = pr - rr."""
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        yield pc - rc, pr - rr


# ---------------------------------------------------------------------------------------------
# Defaults: a call without the option equals the call with the documented default, and both equal
# the formula at that default.

U = [-1.5, -0.25, 0.0, 0.7, 2.0]


def test_f_divergence_scores_default_is_reverse_kl():
    u = torch.tensor(U, dtype=torch.float32)
    got = ref.f_divergence_scores(u)
    assert got.dtype == torch.float64
    # the scores are the float64 log-ratios themselves
    torch.testing.assert_close(got, u.double(), rtol=0, atol=0)
    torch.testing.assert_close(got, ref.f_divergence_scores(u, "reverse_kl"), rtol=0, atol=0)


def test_f_divergence_scores_default_alpha_is_one_half():
    u = _t(U)
    got = ref.f_divergence_scores(u, "alpha_divergence")
    # e^{(alpha - 1) u} / (alpha - 1) at alpha = 0.5: -2 e^{-u/2}
    torch.testing.assert_close(got, _t([-2.0 * math.exp(-0.5 * x) for x in U]), rtol=1e-14, atol=0)
    torch.testing.assert_close(got, ref.f_divergence_scores(u, "alpha_divergence", 0.5), rtol=0, atol=0)


def test_dpo_loss_default_f_alpha_is_one_half():
    inputs = [_t(v) for v in (PC, PR, RC, RR)]
    losses, _, _ = ref.dpo_loss(*inputs, f_divergence="alpha_divergence")
    explicit, _, _ = ref.dpo_loss(*inputs, f_divergence="alpha_divergence", f_alpha=0.5, beta=0.1)
    torch.testing.assert_close(losses, explicit, rtol=0, atol=0)

    def score(u: float) -> float:
        return -2.0 * math.exp(-0.5 * u)

    hand = [-lsig(0.1 * (score(u_c) - score(u_r))) for u_c, u_r in _pairs()]
    torch.testing.assert_close(losses, _t(hand), rtol=1e-13, atol=0)


def test_dpo_loss_default_discopop_tau_is_0_05():
    inputs = [_t(v) for v in (PC, PR, RC, RR)]
    losses, _, _ = ref.dpo_loss(*inputs, loss_type="discopop")
    explicit, _, _ = ref.dpo_loss(*inputs, loss_type="discopop", discopop_tau=0.05, beta=0.1)
    torch.testing.assert_close(losses, explicit, rtol=0, atol=0)
    hand = []
    for u_c, u_r in _pairs():
        h = 0.1 * (u_c - u_r)
        m = sig(h / 0.05)
        hand.append((1.0 - m) * -lsig(h) + m * math.exp(-h))
    torch.testing.assert_close(losses, _t(hand), rtol=1e-13, atol=0)
    # tau matters at these h: a tau of 1 gives another loss
    other, _, _ = ref.dpo_loss(*inputs, loss_type="discopop", discopop_tau=1.0)
    assert (other - losses).abs().min() > 1e-3


# ---------------------------------------------------------------------------------------------
# sequence_logprobs and wpo_weights against log-softmax of the transformed logits, by hand.

LOGITS = [
    [[2.0, -1.0, 0.5, 4.0], [-3.0, 1.5, 0.0, 2.5], [5.0, -2.0, 1.0, -4.0]],
    [[0.0, 3.5, -1.5, 1.0], [4.5, -0.5, 2.0, -2.5], [-1.0, -3.5, 6.0, 0.5]],
]
TARGETS = [[3, 1, -100], [1, 0, 2]]
MASK = [[1, 1, 1], [1, 0, 1]]


def _transformed(z: float, temperature: float, logit_scale: float, softcap: Optional[float]) -> float:
    x = logit_scale * z
    if softcap is not None:
        x = softcap * math.tanh(x / softcap)
    return x / temperature


def _row_stats(row, target, temperature=1.0, logit_scale=1.0, softcap=None):
    """log p(target) and log sum_v p_v^2 of one row of logits."""
    x = [_transformed(z, temperature, logit_scale, softcap) for z in row]
    lse = math.log(sum(math.exp(v) for v in x))
    p = [math.exp(v - lse) for v in x]
    return x[target] - lse, math.log(sum(q * q for q in p))


def _hand_sequence_logprobs(mask, average=False, **transform):
    out = []
    for rows, targets, m in zip(LOGITS, TARGETS, mask):
        picked = [_row_stats(r, y, **transform)[0] for r, y, k in zip(rows, targets, m) if k and y != -100]
        out.append(sum(picked) / max(len(picked), 1) if average else sum(picked))
    return out


def _hand_wpo(mask, **transform):
    out = []
    for rows, targets, m in zip(LOGITS, TARGETS, mask):
        terms = [a - b for a, b in (_row_stats(r, y, **transform) for r, y, k in zip(rows, targets, m)
                                    if k and y != -100)]
        out.append(math.exp(sum(terms) / max(len(terms), 1)))
    return out


def _inputs():
    return torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGETS), torch.tensor(MASK)


def test_sequence_logprobs_defaults_sum_plain_log_softmax():
    logits, targets, mask = _inputs()
    got = ref.sequence_logprobs(logits, targets, mask)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, _t(_hand_sequence_logprobs(MASK)), rtol=1e-13, atol=0)
    explicit = ref.sequence_logprobs(logits, targets, mask, average=False, ld_alpha=None, temperature=1.0,
                                     logit_scale=1.0, softcap=None, ignore_index=-100)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)
    # mask None: every token whose target is not ignore_index
    torch.testing.assert_close(ref.sequence_logprobs(logits, targets), _t(_hand_sequence_logprobs([[1] * 3] * 2)),
                               rtol=1e-13, atol=0)
    averaged = ref.sequence_logprobs(logits, targets, mask, average=True)
    torch.testing.assert_close(averaged, _t(_hand_sequence_logprobs(MASK, average=True)), rtol=1e-13, atol=0)


TRANSFORMS = {
    "temperature": dict(temperature=0.7),
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=3.0),
    "all": dict(temperature=1.3, logit_scale=0.8, softcap=2.5),
}


def _with_transform(fn, hand, kw):
    """``fn`` with the transform options ``kw`` against ``hand`` on MASK; returns it and ``fn`` without them."""
    logits, targets, mask = _inputs()
    got = fn(logits, targets, mask, **kw)
    torch.testing.assert_close(got, _t(hand(MASK, **kw)), rtol=1e-13, atol=0)
    return got, fn(logits, targets, mask)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_sequence_logprobs_applies_logit_transforms(name):
    got, plain = _with_transform(ref.sequence_logprobs, _hand_sequence_logprobs, TRANSFORMS[name])
    # the transform changes the result at these logits
    assert (got - plain).abs().max() > 1e-2


def test_wpo_weights_defaults_by_hand():
    logits, targets, mask = _inputs()
    got = ref.wpo_weights(logits, targets, mask)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, _t(_hand_wpo(MASK)), rtol=1e-13, atol=0)
    explicit = ref.wpo_weights(logits, targets, mask, temperature=1.0, logit_scale=1.0, softcap=None,
                               ignore_index=-100)
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_wpo_weights_apply_logit_transforms(name):
    got, plain = _with_transform(ref.wpo_weights, _hand_wpo, TRANSFORMS[name])
    assert ((got - plain).abs() / got).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Bad options: ValueError whose message starts with the argument's name.

def _pair_inputs():
    return [_t(v) for v in (PC, PR, RC, RR)]


def test_unknown_f_divergence_is_named():
    with pytest.raises(ValueError, match=r"^f_divergence: expected one of reverse_kl, forward_kl, js_divergence, "
                                         r"alpha_divergence, got 'kl'$"):
        ref.f_divergence_scores(_t(U), "kl")
    with pytest.raises(ValueError, match=r"^f_divergence: .*got 'chi2'$"):
        ref.dpo_loss(*_pair_inputs(), f_divergence="chi2")


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match=r"^loss_type: expected one of \('sigmoid', .*'discopop'\), got 'kto'$"):
        ref.dpo_loss(*_pair_inputs(), loss_type="kto")
    with pytest.raises(ValueError, match=r"^loss_type: .*got 'kto'$"):
        ref.dpo_loss(*_pair_inputs(), loss_type=["sigmoid", "kto"])


def test_loss_weights_length_is_checked():
    with pytest.raises(ValueError, match=r"^loss_weights: expected 2 weight\(s\), got 1$"):
        ref.dpo_loss(*_pair_inputs(), loss_type=["ipo", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"^loss_weights: expected 1 weight\(s\), got 2$"):
        ref.dpo_loss(*_pair_inputs(), loss_weights=[1.0, 0.5])


@pytest.mark.parametrize("given", ["chosen_weights", "rejected_weights"])
def test_pair_weights_need_both(given):
    with pytest.raises(ValueError, match=r"^chosen_weights / rejected_weights: expected both or neither$"):
        ref.dpo_loss(*_pair_inputs(), **{given: _t([0.5, 2.0])})


def test_pair_weights_given_together_multiply_the_loss():
    plain, _, _ = ref.dpo_loss(*_pair_inputs())
    weighted, _, _ = ref.dpo_loss(*_pair_inputs(), chosen_weights=_t([0.5, 2.0]), rejected_weights=_t([3.0, 0.25]))
    torch.testing.assert_close(weighted, plain * _t([1.5, 0.5]), rtol=1e-15, atol=0)


def test_ld_token_weights_need_paired_rows():
    with pytest.raises(ValueError, match=r"^mask: expected an even number of rows \[2B, T\] for ld_alpha, "
                                         r"got \(3, 4\)$"):
        ref.ld_token_weights(torch.ones(3, 4), 0.5)
    with pytest.raises(ValueError, match=r"^mask: .*got \(1, 2\)$"):
        ref.sequence_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), ld_alpha=0.5)
