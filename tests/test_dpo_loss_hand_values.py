"""The DPO family's float64 reference against values computed by hand (plain math, one pair at a time):
every loss type, the f-divergence scores, label smoothing, mixtures and pair weights, LD-DPO and WPO
weights."""

from __future__ import annotations

import math

import pytest
import torch

from fastrl_kernels.config import DPO_LOSS_TYPES
from fastrl_kernels.losses import dpo as fast
from fastrl_kernels.ops.dpo_loss import dpo_loss
from fastrl_kernels.reference import dpo as ref

PC, PR, RC, RR = [-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.5], [-2.5, -2.5]
BETA, LS, TAU = 0.5, 0.1, 0.05


def lsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def smoothed(h: float) -> float:
    return -(1 - LS) * lsig(h) - LS * lsig(-h)


def _pairs():
    """Per pair: u_c, u_r, h for reverse KL."""
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        u_c, u_r = pc - rc, pr - rr
        yield u_c, u_r, BETA * (u_c - u_r)


def _aot(first: list, second: list) -> list:
    return [smoothed(BETA * (a - b)) for a, b in zip(sorted(first), sorted(second))]


HAND = {
    "sigmoid": lambda u_c, u_r, h: smoothed(h),
    "hinge": lambda u_c, u_r, h: max(0.0, 1.0 - h),
    "ipo": lambda u_c, u_r, h: (u_c - u_r - 1.0 / (2 * BETA)) ** 2,
    "robust": lambda u_c, u_r, h: (-(1 - LS) * lsig(h) + LS * lsig(-h)) / (1 - 2 * LS),
    "exo_pair": lambda u_c, u_r, h: sig(h) * (lsig(h) - math.log(1 - LS)) + sig(-h) * (lsig(-h) - math.log(LS)),
    "nca_pair": lambda u_c, u_r, h: -lsig(BETA * u_c) - 0.5 * lsig(-BETA * u_c) - 0.5 * lsig(-BETA * u_r),
    "bco_pair": lambda u_c, u_r, h: -lsig(BETA * u_c) - lsig(-BETA * u_r),
    "sppo_hard": lambda u_c, u_r, h: (u_c - 0.5 / BETA) ** 2 + (u_r + 0.5 / BETA) ** 2,
    "apo_zero": lambda u_c, u_r, h: 1 - sig(BETA * u_c) + sig(BETA * u_r),
    "apo_down": lambda u_c, u_r, h: sig(BETA * u_c) + 1 - sig(h),
    "discopop": lambda u_c, u_r, h: (1 - sig(h / TAU)) * -lsig(h) + sig(h / TAU) * math.exp(-h),
}


def _hand_losses(loss_type: str) -> list:
    if loss_type == "aot":
        return _aot([c - r for c, r in zip(PC, PR)], [c - r for c, r in zip(RC, RR)])
    if loss_type == "aot_unpaired":
        return _aot([c - r for c, r in zip(PC, RC)], [c - r for c, r in zip(PR, RR)])
    return [HAND[loss_type](*pair) for pair in _pairs()]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_reference_matches_hand_values(loss_type):
    losses, chosen, rejected = ref.dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, loss_type=loss_type,
                                            label_smoothing=LS, discopop_tau=TAU)
    torch.testing.assert_close(losses, _t(_hand_losses(loss_type)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen, BETA * (_t(PC) - _t(RC)))
    torch.testing.assert_close(rejected, BETA * (_t(PR) - _t(RR)))


@pytest.mark.parametrize(
    "f_divergence, f_alpha, score",
    [
        ("forward_kl", 0.5, lambda u: -math.exp(-u)),
        ("js_divergence", 0.5, lsig),
        ("js_divergence", 0.5, lambda u: math.log(2 * math.exp(u) / (1 + math.exp(u))) - math.log(2)),
        # TRL's earlier alpha-divergence (u[l]^-a - u[w]^-a)/a with a = 0.5 equals ours at f_alpha = 0.5.
        ("alpha_divergence", 0.5, lambda u: -math.exp(-0.5 * u) / 0.5),
        ("alpha_divergence", 0.3, lambda u: math.exp(-0.7 * u) / -0.7),
        ("alpha_divergence", 1.0, lambda u: u),
        ("reverse_kl", 0.5, lambda u: u),
    ],
)
def test_f_divergence_scores_by_hand(f_divergence, f_alpha, score):
    losses, _, _ = ref.dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=BETA, f_divergence=f_divergence,
                                f_alpha=f_alpha)
    expected = [-lsig(BETA * (score(u_c) - score(u_r))) for u_c, u_r, _ in _pairs()]
    torch.testing.assert_close(losses, _t(expected), rtol=1e-12, atol=1e-12)


def test_label_smoothing_mixes_the_flipped_pair():
    inputs = [_t(v) for v in (PC, PR, RC, RR)]
    clean, _, _ = ref.dpo_loss(*inputs, beta=BETA)
    flipped, _, _ = ref.dpo_loss(inputs[1], inputs[0], inputs[3], inputs[2], beta=BETA)
    smooth, _, _ = ref.dpo_loss(*inputs, beta=BETA, label_smoothing=0.2)
    torch.testing.assert_close(smooth, 0.8 * clean + 0.2 * flipped)
    robust0, _, _ = ref.dpo_loss(*inputs, beta=BETA, loss_type="robust")
    torch.testing.assert_close(robust0, clean)
    exo0, _, _ = ref.dpo_loss(*inputs, beta=BETA, loss_type="exo_pair")
    exo_eps, _, _ = ref.dpo_loss(*inputs, beta=BETA, loss_type="exo_pair", label_smoothing=ref.EXO_DEFAULT_EPS)
    torch.testing.assert_close(exo0, exo_eps)


def test_mixture_is_weighted_sum_and_pair_weights_multiply():
    inputs = [_t(v) for v in (PC, PR, RC, RR)]
    a, _, _ = ref.dpo_loss(*inputs, loss_type="sigmoid")
    b, _, _ = ref.dpo_loss(*inputs, loss_type="bco_pair")
    mix, _, _ = ref.dpo_loss(*inputs, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])
    torch.testing.assert_close(mix, 0.8 * a + 0.2 * b)
    both, _, _ = ref.dpo_loss(*inputs, loss_type=["sigmoid", "bco_pair"])
    torch.testing.assert_close(both, a + b)
    cw, rw = _t([0.5, 2.0]), _t([3.0, 0.25])
    weighted, _, _ = ref.dpo_loss(*inputs, chosen_weights=cw, rejected_weights=rw)
    torch.testing.assert_close(weighted, a * cw * rw)
    out = dpo_loss(*inputs, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])
    torch.testing.assert_close(out.loss, mix.mean())


def test_ld_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    weights = ref.ld_token_weights(mask, 0.25)
    torch.testing.assert_close(weights, _t([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 0.25, 0.25]]))
    logp = -torch.arange(1.0, 13.0, dtype=torch.float64).view(2, 6)
    torch.testing.assert_close(fast.sequence_logps(logp, mask.double(), ld_alpha=0.25), (logp * weights).sum(1))
    torch.testing.assert_close(fast.sequence_logps(logp, mask.double(), ld_alpha=1.0),
                               fast.sequence_logps(logp, mask.double()))
    avg = fast.sequence_logps(logp, mask.double(), ld_alpha=0.25, average=True)
    torch.testing.assert_close(avg, (logp * weights).sum(1) / _t([3.0, 5.0]))


def test_wpo_weights_by_hand():
    # p = (1, 2, 3) / 6: sum p^2 = 14/36; targets 2 and 0 -> w = exp(mean(log(p_y / sum p^2))) = sqrt(108)/14.
    row = torch.log(_t([1.0, 2.0, 3.0]))
    logits = torch.stack([row, row, row]).unsqueeze(0)
    targets = torch.tensor([[2, 0, -100]])
    w = ref.wpo_weights(logits, targets, torch.tensor([[1, 1, 1]]))
    torch.testing.assert_close(w, _t([math.sqrt(108) / 14]))
    uniform = torch.zeros(2, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(ref.wpo_weights(uniform, torch.randint(0, 7, (2, 4))), _t([1.0, 1.0]))
    empty = ref.wpo_weights(logits, targets, torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(empty, _t([1.0]))
