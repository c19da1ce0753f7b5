"""DPO family: reference formulas by hand, O(N) algebra vs reference, fused op vs reference, validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels.backends import available_backends
from fastrl_kernels.config import DPO_LOSS_TYPES, F_DIVERGENCES, DPOConfig
from fastrl_kernels.losses import dpo as fast
from fastrl_kernels.ops.dpo_loss import DPOOutput, dpo_loss, fused_dpo_loss
from fastrl_kernels.reference import dpo as ref
from fastrl_kernels.testing import assert_close_to_reference
from tests.conftest import examples

# ---------------------------------------------------------------------------------------------
# Reference vs values computed by hand (plain math, one pair at a time).

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


# ---------------------------------------------------------------------------------------------
# O(N) algebra (losses/dpo.py) and dpo_loss op vs the reference.

configs = st.builds(
    DPOConfig,
    beta=st.sampled_from([0.01, 0.1, 0.5, 2.0]),
    loss_type=st.one_of(st.sampled_from(DPO_LOSS_TYPES),
                        st.lists(st.sampled_from(DPO_LOSS_TYPES), min_size=2, max_size=3).map(tuple)),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.3]),
    f_divergence=st.sampled_from(F_DIVERGENCES),
    f_alpha=st.sampled_from([0.3, 0.5, 1.0, 1.5]),
    discopop_tau=st.sampled_from([0.05, 0.5]),
)


def _kwargs(cfg: DPOConfig) -> dict:
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                f_divergence=cfg.f_divergence, f_alpha=cfg.f_alpha, discopop_tau=cfg.discopop_tau,
                loss_weights=None if isinstance(cfg.loss_type, str) else [0.7] * len(cfg.loss_types))


def _pair_grad_scales(inputs, kw: dict, chosen_weights=None, rejected_weights=None, reduce=torch.sum) -> list:
    """Per pair, the size of the terms that make up d(reduce(losses))/d(pc, pr, rc, rr).

    A pair loss reaches pc through several intermediates (pc itself, u_c = pc - rc, the score s_c = f(u_c),
    h = beta (s_c - s_r)); their contributions can cancel (apo_down at small beta: beta sigma'(beta u_c) -
    beta sigma'(h)). The scale is the sum over the loss types and the intermediates v of
    |d loss_k/dv| |dv/dpc|: what float32 algebra adds up, the row scale of the gradient (asserts.py).
    """
    pc, pr, rc, rr = (t.detach().double() for t in inputs)
    beta = kw["beta"]

    def score_slope(u):
        u = u.clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(ref.f_divergence_scores(u, kw["f_divergence"], kw["f_alpha"]).sum(), u)
        return slope.abs()

    u_c, u_r = pc - rc, pr - rr
    s_c = ref.f_divergence_scores(u_c, kw["f_divergence"], kw["f_alpha"])
    s_r = ref.f_divergence_scores(u_r, kw["f_divergence"], kw["f_alpha"])
    values = dict(pc=pc, pr=pr, rc=rc, rr=rr, u_c=u_c, u_r=u_r, s_c=s_c, s_r=s_r, h=beta * (s_c - s_r))
    slope_c, slope_r = score_slope(u_c), score_slope(u_r)
    types = [kw["loss_type"]] if isinstance(kw["loss_type"], str) else list(kw["loss_type"])
    weights = kw["loss_weights"] or [1.0] * len(types)
    pair_weights = 1.0 if chosen_weights is None else (chosen_weights * rejected_weights).double()
    scales = [torch.zeros_like(pc) for _ in range(4)]
    for name, weight in zip(types, weights):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in values.items()}
        terms = dict(leaves, beta=float(beta), ls=float(kw["label_smoothing"]), tau=float(kw["discopop_tau"]))
        loss = reduce(weight * ref.PAIR_LOSSES[name](terms) * pair_weights)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        d = {k: torch.zeros_like(pc) if g is None else g.abs() for k, g in zip(leaves, grads)}
        chosen_paths = d["u_c"] + d["s_c"] * slope_c + d["h"] * beta * slope_c
        rejected_paths = d["u_r"] + d["s_r"] * slope_r + d["h"] * beta * slope_r
        for i, (own, paths) in enumerate(((d["pc"], chosen_paths), (d["pr"], rejected_paths),
                                          (d["rc"], chosen_paths), (d["rr"], rejected_paths))):
            scales[i] += own + paths
    return scales


# Policy minus reference log-ratios u within +-1.5: every f-divergence score then stays within e^1.5, so the
# DPO logit |h| stays below ~20 for beta <= 2, where the float64 reference's sigmoid' keeps full precision and
# a pair's gradient is far inside float32's range (at |h| = 100 it is 1e-44 and rounds to 0 in float32).
LOG_RATIO_SPREAD = 1.5


def _pair_inputs(seed: int, batch: int, dtype: torch.dtype) -> list:
    g = torch.Generator().manual_seed(seed)
    ref_c, ref_r = -30 * torch.rand(batch, generator=g), -30 * torch.rand(batch, generator=g)
    delta = LOG_RATIO_SPREAD * (2 * torch.rand(2, batch, generator=g) - 1)
    return [t.to(dtype) for t in (ref_c + delta[0], ref_r + delta[1], ref_c, ref_r)]


@settings(max_examples=examples(200))
@given(cfg=configs, seed=st.integers(0, 2**16), batch=st.integers(1, 6),
       dtype=st.sampled_from([torch.float64, torch.float32]), weighted=st.booleans())
def test_fast_losses_match_reference(cfg, seed, batch, dtype, weighted):
    kw = _kwargs(cfg)
    cfg = cfg.with_overrides(loss_weights=kw["loss_weights"])
    inputs = [t.requires_grad_(True) for t in _pair_inputs(seed, batch, dtype)]
    weights = [0.5 + torch.rand(batch, dtype=dtype) for _ in range(2)] if weighted else [None, None]
    losses, chosen, rejected = fast.dpo_pair_losses(*inputs, cfg, *weights)
    grads = torch.autograd.grad(losses.sum(), inputs)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    w64 = [None if w is None else w.double() for w in weights]
    expected, exp_chosen, exp_rejected = ref.dpo_loss(*inputs64, chosen_weights=w64[0],
                                                      rejected_weights=w64[1], **kw)
    exp_grads = torch.autograd.grad(expected.sum(), inputs64)
    assert losses.dtype == torch.promote_types(dtype, torch.float32)
    assert_close_to_reference(losses, expected, dtype=dtype, name=f"{cfg.loss_type} losses")
    assert_close_to_reference(chosen, exp_chosen, dtype=dtype, name="chosen_rewards")
    assert_close_to_reference(rejected, exp_rejected, dtype=dtype, name="rejected_rewards")
    scales = _pair_grad_scales(inputs, kw, *w64)
    for name, g, e, scale in zip(("pc", "pr", "rc", "rr"), grads, exp_grads, scales):
        # Pairs are independent (but for aot's sort): each pair's derivative is a row of its own.
        assert_close_to_reference(g[:, None], e[:, None], dtype=dtype, kind="grad", name=f"{cfg.loss_type} d/d{name}",
                                  row_scale=scale)
    out = dpo_loss(*inputs, config=cfg, chosen_weights=weights[0], rejected_weights=weights[1])
    assert isinstance(out, DPOOutput)
    assert_close_to_reference(out.loss, expected.mean(), dtype=dtype, name="dpo_loss op")
    assert_close_to_reference(out.margins, exp_chosen - exp_rejected, dtype=dtype, name="margins")
    assert out.accuracy == ((exp_chosen > exp_rejected).double().mean()).to(out.accuracy.dtype)


# Every loss type once, the f-divergences cycled over them (each type's f-divergence algebra is shared).
@pytest.mark.parametrize(
    "loss_type, f_divergence",
    [(name, F_DIVERGENCES[i % len(F_DIVERGENCES)]) for i, name in enumerate(DPO_LOSS_TYPES)]
    + [("sigmoid", name) for name in F_DIVERGENCES[1:]],
)
def test_reference_gradcheck(loss_type, f_divergence):
    inputs = [t.requires_grad_(True) for t in _pair_inputs(7, 3, torch.float64)]
    fn = lambda *x: ref.dpo_loss(*x, beta=0.3, loss_type=loss_type, label_smoothing=0.1,
                                 f_divergence=f_divergence, f_alpha=0.4)[0]
    assert torch.autograd.gradcheck(fn, inputs)


def test_dpo_loss_empty_batch_and_compile():
    empty = [torch.zeros(0) for _ in range(4)]
    out = dpo_loss(*empty)
    assert out.loss.item() == 0.0 and out.accuracy.item() == 0.0
    cfg = DPOConfig(loss_type=("sigmoid", "aot", "discopop"), f_divergence="js_divergence")
    inputs = _pair_inputs(3, 4, torch.float32)
    compiled = torch.compile(lambda *x: fast.dpo_pair_losses(*x, cfg)[0], backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), fast.dpo_pair_losses(*inputs, cfg)[0])


# ---------------------------------------------------------------------------------------------
# fused_dpo_loss vs reference.sequence_logprobs + reference.dpo_loss.

BACKENDS = ["torch", "native"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _need_backend(backend: str) -> None:
    # asking available_backends may build the native extension.
    if backend != "torch" and backend not in available_backends(DEVICE if backend == "triton" else "cpu"):
        pytest.skip(f"backend {backend!r} is not available in this process (available_backends lists it not)")


def _fused_case(seed: int, batch: int, steps: int, vocab: int, dtype: torch.dtype, ignore_index: int = -100,
                temperature: float = 1.0, average: bool = False, ld_alpha=None):
    """Logits ``[2B, T, V]`` of scale 4, some ignored targets, a random mask (the first rejected response
    empty), and reference sequence log-probs within ``LOG_RATIO_SPREAD`` of the policy's (formed the same
    way: ``temperature``, ``average``, ``ld_alpha``), so that the implicit rewards are O(1) as in training."""
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(2 * batch, steps, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (2 * batch, steps), generator=g)
    targets[0, -1] = ignore_index
    if steps > 2:
        targets[-1, 1] = ignore_index
    mask = torch.rand(2 * batch, steps, generator=g) > 0.3
    mask[batch] = False  # the first rejected response is empty
    policy = ref.sequence_logprobs(logits, targets, mask, average=average, ld_alpha=ld_alpha,
                                   temperature=temperature, ignore_index=ignore_index)
    noise = LOG_RATIO_SPREAD * (2 * torch.rand(2 * batch, generator=g, dtype=torch.float64) - 1)
    ref_logps = (policy + noise).float()
    return logits, targets, mask, ref_logps[:batch], ref_logps[batch:]


def _token_weights(targets, mask, cfg: DPOConfig, ignore_index: int) -> torch.Tensor:
    """d(sequence log-prob)/d(token log-prob) ``[2B, T]``: response tokens, LD-DPO weights, 1/length."""
    response = (targets != ignore_index) & mask.bool()
    weights = response.double() if cfg.ld_alpha is None else ref.ld_token_weights(response, cfg.ld_alpha)
    if cfg.average_logps:
        weights = weights / response.sum(dim=1, keepdim=True).clamp(min=1).double()
    return weights


# The fused ops form a pair's coefficient d loss/d seq from float32 sequence log-probs, sums of token log-probs
# held to about eps32 |seq|. Where the loss is flat in seq (IPO next to its target margin) that rounding is a
# large part of the coefficient, on every backend alike. Its size, in units of the row scale (the gradient
# tolerance is row_atol = 1e-5 of it): eps32 / 1e-5 times |d2 loss / d seq d seq'| |seq'| over the pair.
SEQ_ROUNDING = torch.finfo(torch.float32).eps / 1e-5


def _sequence_rounding_scale(seq, ref_c, ref_r, kw: dict, pair_weights) -> torch.Tensor:
    """Per sequence ``[2B]``: SEQ_ROUNDING (|H_ss| |s| + |H_ss'| |s'|), s' the other sequence of its pair."""
    s = seq.detach().clone().requires_grad_(True)
    b = s.shape[0] // 2
    losses = ref.dpo_loss(s[:b], s[b:], ref_c, ref_r, chosen_weights=pair_weights[0],
                          rejected_weights=pair_weights[1], **kw)[0]
    (grad,) = torch.autograd.grad(losses.mean(), s, create_graph=True)
    size = torch.zeros_like(s)
    if not grad.requires_grad:  # a loss linear in seq (hinge with a linear score)
        return size
    for half in (slice(0, b), slice(b, None)):
        v = torch.zeros_like(s)
        v[half] = s.detach()[half].abs()
        (hv,) = torch.autograd.grad(grad, s, grad_outputs=v, retain_graph=True, allow_unused=True)
        size += 0.0 if hv is None else hv.abs()
    return SEQ_ROUNDING * size


def _expected(logits, targets, mask, ref_c, ref_r, cfg: DPOConfig, temperature: float = 1.0,
              ignore_index: int = -100):
    """Reference sequence log-probs ``[2B]``, WPO weights (or None), rewards, d loss/d logits and the
    gradient's row scale (per token, the pair scale of ``_pair_grad_scales`` plus the rounding of the float32
    sequence log-probs, times d seq/d logp_token)."""
    x = logits.detach().double().requires_grad_(True)
    options = dict(temperature=temperature, ignore_index=ignore_index)
    seq = ref.sequence_logprobs(x, targets, mask, average=cfg.average_logps, ld_alpha=cfg.ld_alpha, **options)
    b = seq.shape[0] // 2
    weights = ref.wpo_weights(x, targets, mask, **options) if cfg.use_weighting else None
    pair_weights = (None, None) if weights is None else (weights[:b], weights[b:])
    kw = _kwargs(cfg) | {"loss_weights": cfg.loss_weights}
    losses, chosen, rejected = ref.dpo_loss(seq[:b], seq[b:], ref_c, ref_r, chosen_weights=pair_weights[0],
                                            rejected_weights=pair_weights[1], **kw)
    losses.mean().backward()
    pc_scale, pr_scale, _, _ = _pair_grad_scales((seq[:b], seq[b:], ref_c, ref_r), kw, *pair_weights,
                                                 reduce=torch.mean)
    pair_scale = torch.cat([pc_scale, pr_scale]) + _sequence_rounding_scale(seq, ref_c, ref_r, kw, pair_weights)
    row_scale = pair_scale[:, None] * _token_weights(targets, mask, cfg, ignore_index)
    return seq.detach(), weights, chosen, rejected, x.grad, row_scale


def _check_outputs(out: DPOOutput, seq, weights, chosen, rejected, ref_c, ref_r, cfg: DPOConfig, dtype, name: str):
    """A DPO op's outputs vs the reference sequence log-probs ``seq`` and rewards (from ``_expected``).

    A reward beta (policy - ref) of O(1) is the difference of two sequence log-probs of O(10), which float32
    holds to ~1e-6 of themselves: compare the policy sequence log-probs the rewards carry, then the loss
    of the reference formulas at those sequence log-probs (the O(N) algebra on its own).
    """
    assert out.loss.dtype == out.chosen_rewards.dtype == torch.float32
    out = DPOOutput(*(t.detach().cpu() for t in out))
    b = len(ref_c)
    policy = torch.cat([out.chosen_rewards, out.rejected_rewards]).double() / cfg.beta + torch.cat([ref_c, ref_r])
    assert_close_to_reference(policy, seq, dtype=dtype, name=f"{name} rewards / beta + ref")
    kw = _kwargs(cfg) | {"loss_weights": cfg.loss_weights}
    loss_at_policy = ref.dpo_loss(policy[:b], policy[b:], ref_c, ref_r, **kw,
                                  chosen_weights=None if weights is None else weights[:b],
                                  rejected_weights=None if weights is None else weights[b:])[0].mean()
    assert_close_to_reference(out.loss, loss_at_policy, dtype=dtype, name=f"{name} loss")
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)
    assert out.accuracy.item() == pytest.approx((chosen > rejected).double().mean().item())


def _check_fused(backend, dtype, cfg, case, temperature=1.0, inplace=False, ignore_index=-100):
    """fused_dpo_loss on ``backend`` vs the reference: rewards, loss, margins, accuracy and d/dlogits.

    With ``inplace`` the logits are a non-leaf (as a model's output is) whose storage must hold the
    gradient once backward has run; the gradient reaching their producer must match the reference too.
    """
    logits, targets, mask, ref_c, ref_r = case
    seq, weights, chosen, rejected, grad, row_scale = _expected(logits, targets, mask, ref_c, ref_r, cfg,
                                                                temperature, ignore_index)
    device = DEVICE if backend == "triton" else "cpu"
    leaf = logits.clone().to(device).requires_grad_(True)
    x = leaf * 1.0 if inplace else leaf
    out = fused_dpo_loss(x, targets.to(device), mask.to(device), ref_c.to(device), ref_r.to(device), config=cfg,
                         backend=backend, temperature=temperature, inplace_grad=inplace, ignore_index=ignore_index)
    name = f"{backend} {cfg.loss_type}"
    out.loss.backward()
    if inplace:
        assert_close_to_reference(x.detach(), grad, dtype=dtype, kind="grad", name=f"{name} logits buffer",
                                  row_scale=row_scale)
    _check_outputs(out, seq, weights, chosen, rejected, ref_c, ref_r, cfg, dtype, name)
    assert leaf.grad.dtype == dtype
    assert_close_to_reference(leaf.grad, grad, dtype=dtype, kind="grad", name=f"{name} d/dlogits",
                              row_scale=row_scale)
    ignored = targets == ignore_index
    assert bool((leaf.grad.cpu()[ignored] == 0).all())


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


# ---------------------------------------------------------------------------------------------
# Bad inputs name the argument, what was expected and what was given.

def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_dpo_loss_bad_inputs():
    ok = [torch.zeros(3) for _ in range(4)]
    _raises(ValueError, r"ref_rejected_logps: expected shape \(3,\).*got \(4,\)", dpo_loss, *ok[:3],
            torch.zeros(4))
    _raises(ValueError, r"policy_chosen_logps: expected shape \[B\].*got \(3, 1\)", dpo_loss,
            torch.zeros(3, 1), *ok[1:])
    _raises(TypeError, r"policy_rejected_logps: expected dtype.*got torch.int64", dpo_loss, ok[0],
            torch.zeros(3, dtype=torch.long), *ok[2:])
    _raises(ValueError, "chosen_weights / rejected_weights", dpo_loss, *ok, chosen_weights=torch.ones(3))
    _raises(ValueError, "use_weighting=True", dpo_loss, *ok, use_weighting=True)
    _raises(ValueError, r"loss_type: expected one of .* got 'kto'", dpo_loss, *ok, loss_type="kto")
    _raises(ValueError, r"loss_weights: expected 2 weight", dpo_loss, *ok, loss_type=["ipo", "hinge"],
            loss_weights=[1.0])
    _raises(ValueError, r"beta: expected a number > 0, got 0", dpo_loss, *ok, beta=0)
    _raises(ValueError, r"label_smoothing: expected a number in \[0, 0.5\), got 0.5", dpo_loss, *ok,
            label_smoothing=0.5)
    _raises(ValueError, r"f_divergence: expected one of", dpo_loss, *ok, f_divergence="kl")
    _raises(ValueError, r"ld_alpha: expected None or a number in \[0, 1\], got 2", DPOConfig, ld_alpha=2)
    _raises(TypeError, r"unknown option\(s\) \['betta'\]", dpo_loss, *ok, betta=0.1)


def test_fused_dpo_loss_bad_inputs():
    logits, targets, mask, ref_c, ref_r = _fused_case(0, 2, 3, 5, torch.float32)
    _raises(ValueError, r"logits: expected shape \[2B, T, V\].*got \(3, 3, 5\)", fused_dpo_loss, logits[:3],
            targets[:3], mask[:3], ref_c, ref_r)
    _raises(ValueError, r"logits: expected shape \[2B, T, V\].*got \(12, 5\)", fused_dpo_loss,
            logits.reshape(12, 5), targets.reshape(12), None, ref_c, ref_r)
    _raises(ValueError, r"mask: expected shape \(4, 3\).*got \(4, 2\)", fused_dpo_loss, logits, targets,
            mask[:, :2], ref_c, ref_r)
    _raises(ValueError, r"ref_chosen_logps: expected shape \(2,\).*got \(4,\)", fused_dpo_loss, logits,
            targets, mask, torch.zeros(4), ref_r)
    _raises(TypeError, r"ref_rejected_logps: expected dtype", fused_dpo_loss, logits, targets, mask, ref_c,
            torch.zeros(2, dtype=torch.long))
    _raises(ValueError, r"targets: expected values in \[0, 5\)", fused_dpo_loss, logits, targets + 5, mask,
            ref_c, ref_r)
    _raises(ValueError, r"backend: expected one of", fused_dpo_loss, logits, targets, mask, ref_c, ref_r,
            backend="cuda")
    _raises(ValueError, r"temperature: expected a number > 0", fused_dpo_loss, logits, targets, mask, ref_c,
            ref_r, temperature=0.0)
