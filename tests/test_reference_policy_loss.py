"""The float64 reference's policy losses against hand-derived numbers and gradcheck: each loss type and cap
by hand, the GSPO sequence ratio, the KL and entropy terms, the metrics; gradients (gradcheck, CISPO's
clipped weight, GSPO vs its token variant), empty masks and masked tokens."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import reference as ref
from fastrl_kernels.config import LOSS_AGG_MODES, POLICY_LOSS_TYPES
from fastrl_kernels.testing.strategies import policy_configs, policy_inputs
from tests.test_reference import LN2, t64

# ---------------------------------------------------------------------------------------------
# Policy losses, by hand


def loss_of(logp, old, adv, mask=None, **cfg):
    cfg.setdefault("entropy_mode", "sampled")
    loss, metrics = ref.policy_loss_from_logprobs(t64(logp), None, t64(old), t64(adv), mask, **cfg)
    return loss.item(), metrics


L15, L05 = math.log(1.5), math.log(0.5)


@pytest.mark.parametrize(
    "logp,adv,cfg,want",
    [
        # r = 1.5, A = 1: -min(1.5, 1.2) = -1.2; r = 0.5, A = -2: -min(-1, -1.6) = 1.6; mean 0.2
        ([L15, L05], [1.0, -2.0], {}, 0.2),
        # DAPO clip-higher: r = 1.25 < 1.28 stays unclipped: -1.25; with eps_high 0.2: -1.2
        ([math.log(1.25)], [1.0], {"clip_eps_high": 0.28}, -1.25),
        ([math.log(1.25)], [1.0], {}, -1.2),
        # r = 4, A = -1: -min(-4, -1.2) = 4; dual clip c = 3 caps at -c A = 3
        ([math.log(4.0)], [-1.0], {}, 4.0),
        ([math.log(4.0)], [-1.0], {"dual_clip": 3.0}, 3.0),
        # delta = 3 caps the unclipped ratio: max(-A min(4, 3), -A 1.2) = 3
        ([math.log(4.0)], [-1.0], {"delta": 3.0}, 3.0),
        # gspo: log-ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2; eps_high 0.5 leaves it: -sqrt 2
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo", "clip_eps_high": 0.5}, -math.sqrt(2.0)),
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo"}, -1.2),  # sqrt 2 clipped to 1.2
        ([LN2, 0.0], [1.0, 1.0], {"loss_type": "gspo_token", "clip_eps_high": 0.5}, -math.sqrt(2.0)),
        # cispo: -sg(clip(1.5, 0.8, 1.2)) A logp = -1.2 ln 1.5
        ([L15], [1.0], {"loss_type": "cispo"}, -1.2 * 0.4054651081081644),
        # sapo, A > 0, tau = 1: -sigmoid(0.5) * 4 = -4 / (1 + e^-0.5)
        ([L15], [1.0], {"loss_type": "sapo"}, -4.0 / (1.0 + math.exp(-0.5))),
        # sapo, A = -1, tau = 1.05: -sigmoid(1.05 * -0.5) (4 / 1.05) (-1)
        ([L05], [-1.0], {"loss_type": "sapo"}, (4.0 / 1.05) / (1.0 + math.exp(0.525))),
        # is_weights multiply the policy term: 0.5 * -1.2
        ([L15], [1.0], {"is_weights": t64([0.5])}, -0.6),
    ],
)
def test_policy_loss_hand_values(logp, adv, cfg, want):
    is_weights = cfg.pop("is_weights", None)
    got, _ = loss_of(logp, [0.0] * len(logp), adv, is_weights=is_weights, **cfg)
    assert got == pytest.approx(want, abs=1e-12)


def test_gspo_sequence_ratio_uses_only_unmasked_tokens():
    # mask [1, 0]: s = exp(ln 2 / 1) = 2, clipped to 1.5 on the one kept token
    got, metrics = loss_of(
        [LN2, 5.0], [0.0, 0.0], [1.0, 1.0], torch.tensor([1, 0]), loss_type="gspo", clip_eps_high=0.5
    )
    assert got == pytest.approx(-1.5, abs=1e-12)
    assert metrics["ratio_mean"].item() == pytest.approx(2.0)


def test_kl_and_entropy_terms_by_hand():
    # r = 1 and A = 0: the policy term is 0; k3 of k = ln 2 is 1 - ln 2; times kl_coef 0.1
    got, metrics = loss_of([0.0], [0.0], [0.0], ref_logprobs=t64([LN2]), kl_coef=0.1)
    assert got == pytest.approx(0.1 * 0.3068528194400547, abs=1e-14)
    assert metrics["kl_mean"].item() == pytest.approx(0.3068528194400547, abs=1e-14)
    # exact entropy [1, 3] (mean 2) with coef 0.1 subtracts 0.2; sampled uses -logp = [1, 3] too
    for mode, entropy in (("exact", t64([1.0, 3.0])), ("sampled", None)):
        loss, metrics = ref.policy_loss_from_logprobs(
            t64([-1.0, -3.0]), entropy, t64([-1.0, -3.0]), t64([0.0, 0.0]), entropy_coef=0.1, entropy_mode=mode
        )
        assert loss.item() == pytest.approx(-0.2, abs=1e-14)
        assert metrics["entropy_mean"].item() == pytest.approx(2.0, abs=1e-14)
    # entropy_agg differs from loss_agg: loss "sum" of zeros, entropy token-mean of [1, 3] -> -0.1 * 2
    loss, _ = ref.policy_loss_from_logprobs(
        t64([-1.0, -3.0]), None, t64([-1.0, -3.0]), t64([0.0, 0.0]),
        entropy_coef=0.1, entropy_mode="sampled", loss_agg="sum", entropy_agg="token-mean",
    )  # fmt: skip
    assert loss.item() == pytest.approx(-0.2, abs=1e-14)


def test_metrics_by_hand():
    # r = [1.5, 0.5], A = [1, -2], eps 0.2: both tokens clip (one high, one low)
    # approx_kl = mean((r - 1) - ln r) = ((0.5 - ln 1.5) + (-0.5 - ln 0.5)) / 2 = ln(4/3) / 2
    _, metrics = loss_of([L15, L05], [0.0, 0.0], [1.0, -2.0])
    want = {"clip_frac_low": 0.5, "clip_frac_high": 0.5, "ratio_mean": 1.0, "ratio_max": 1.5}
    want.update(kl_mean=0.0, approx_kl=0.5 * math.log(4.0 / 3.0), entropy_mean=-0.5 * math.log(0.75))
    for name, value in want.items():
        assert metrics[name].item() == pytest.approx(value, abs=1e-14), name
    _, metrics = loss_of([L15, L05], [0.0, 0.0], [1.0, -2.0], torch.tensor([True, False]))
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.5) and metrics["ratio_max"].item() == pytest.approx(1.5)


def test_kl_coef_without_ref_names_ref_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        loss_of([0.0], [0.0], [1.0], kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        ref.policy_loss_from_logprobs(t64([0.0]), None, t64([0.0]), t64([1.0]), entropy_mode="exact")


# ---------------------------------------------------------------------------------------------
# Gradients and masking


def random_policy_case(seed, batch=2, length=4):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(batch, length, generator=g, dtype=torch.float64) * 3).requires_grad_()
    entropy = (torch.rand(batch, length, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref_lp = logp.detach() + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length)
    mask[1, -1] = 0
    return logp, entropy, old, ref_lp, adv, mask


SMOOTH_CONFIG = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.05, entropy_mode="exact")


@pytest.mark.parametrize(
    "loss_type,extra",
    [("clip", {"dual_clip": 3.0, "delta": 2.0}), ("clip", {}), ("gspo", {}), ("sapo", {})],
)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_gradcheck(loss_type, extra, loss_agg):
    # losses without stop-gradients: the analytic gradient is the numerical one
    logp, entropy, old, ref_lp, adv, mask = random_policy_case(1)

    def fn(lp, h):
        loss, _ = ref.policy_loss_from_logprobs(
            lp, h, old, adv, mask, ref_logprobs=ref_lp, loss_type=loss_type, loss_agg=loss_agg,
            **SMOOTH_CONFIG, **extra,
        )  # fmt: skip
        return loss

    assert torch.autograd.gradcheck(fn, (logp, entropy))


def test_cispo_gradient_is_the_clipped_weight():
    # d/dlogp_t of token-mean(-sg(clip(r)) A logp) = -clip(r_t) A_t m_t / sum(m)
    logp, _, old, _, adv, mask = random_policy_case(2)
    loss, _ = ref.policy_loss_from_logprobs(logp, None, old, adv, mask, loss_type="cispo", entropy_mode="sampled")
    (grad,) = torch.autograd.grad(loss, logp)
    weight = torch.exp(logp.detach() - old).clamp(0.8, 1.2)
    torch.testing.assert_close(grad, -weight * adv * mask / mask.sum(), rtol=1e-12, atol=1e-14)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), cfg=policy_configs(loss_types=("gspo",), with_entropy=False))
def test_gspo_token_equals_gspo_for_sequence_advantages(seed, cfg):
    # GSPO paper: with one advantage per sequence the token variant has the same value and gradient
    logp, _, old, ref_lp, _, mask = random_policy_case(seed, batch=3, length=5)
    adv = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = []
    for loss_type in ("gspo", "gspo_token"):
        loss, _ = ref.policy_loss_from_logprobs(
            logp, None, old, adv, mask, ref_logprobs=ref_lp, config=cfg, loss_type=loss_type, entropy_mode="sampled"
        )
        results.append((loss, *torch.autograd.grad(loss, logp)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_empty_mask_gives_zero_loss_and_zero_grads(loss_type, loss_agg):
    logp, entropy, old, ref_lp, adv, mask = random_policy_case(3)
    old = torch.full_like(old, -1e4)  # padding garbage: exp(logp - old) would overflow if it were used
    loss, metrics = ref.policy_loss_from_logprobs(
        logp, entropy, old, adv, torch.zeros_like(mask), ref_logprobs=ref_lp - 1e4, loss_type=loss_type,
        loss_agg=loss_agg, **SMOOTH_CONFIG,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, (logp, entropy))
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)
    assert all(value.item() == 0.0 for value in metrics.values())


@settings(max_examples=25)
@given(inputs=policy_inputs(max_batch=3, max_len=6, max_vocab=40), cfg=policy_configs())
def test_policy_loss_is_finite_and_ignores_masked_tokens(inputs, cfg):
    logits = inputs.pop("logits").double().requires_grad_()
    loss, logp, entropy, metrics = ref.policy_loss(logits, config=cfg, **inputs)
    (grad,) = torch.autograd.grad(loss, logits)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    assert all(bool(torch.isfinite(v)) and v.dim() == 0 for v in metrics.values())
    assert bool((grad[~inputs["mask"]] == 0).all())


def test_policy_loss_shapes_and_ignore_index():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64) - 2.0
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    cfg = dict(loss_agg="seq-mean-token-mean", loss_type="gspo")
    base, *_ = ref.policy_loss(logits, targets, old, adv, **cfg)
    # per-sequence advantages [B] broadcast over T
    expanded, *_ = ref.policy_loss(logits, targets, old, adv[:, None].expand(2, 5), **cfg)
    assert expanded.item() == pytest.approx(base.item(), abs=1e-14)
    # a 1-D leading shape is one sequence
    one, *_ = ref.policy_loss(logits[0], targets[0], old[0], adv[0].expand(5), **cfg)
    batch_of_one, *_ = ref.policy_loss(logits[:1], targets[:1], old[:1], adv[:1], **cfg)
    assert one.item() == pytest.approx(batch_of_one.item(), abs=1e-14)
    # ignore_index targets count as masked
    ignored = targets.clone()
    ignored[0, 3:] = -100
    mask = ignored != -100
    with_ignore, logp, _, _ = ref.policy_loss(logits, ignored, old, adv, **cfg)
    with_mask, *_ = ref.policy_loss(logits, targets, old, adv, mask, **cfg)
    assert with_ignore.item() == pytest.approx(with_mask.item(), abs=1e-14)
    assert bool((logp[0, 3:] == 0).all())
