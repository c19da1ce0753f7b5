"""DPO family: the O(N) algebra (losses/dpo.py) and the dpo_loss op against the float64 reference.

Also the checks of a fused DPO op against the reference (``_fused_case``, ``_expected``, ``_check_outputs``,
``_check_fused``, with the gradient's row scales from ``_pair_grad_scales`` and ``_sequence_rounding_scale``),
used by ``tests/test_dpo_loss_fused.py`` and the lm_head tests (``tests/test_linear_dpo.py``).
"""

from __future__ import annotations

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
from tests.backends_under_test import cpu_backends
from tests.conftest import examples

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

BACKENDS = cpu_backends()
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
