"""DPO ops: every option of ``fused_dpo_loss(backend="reference")`` against float64 formulas written out
here, the rewards ``dpo_loss`` returns, inputs that must not change the result (garbage logits at masked
positions, a rejected response of probability 0, the default ``inplace_grad``), the dtype of the WPO
weights, and the errors naming the argument, what was expected and what was given."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fastrl_kernels.config import DPOConfig
from fastrl_kernels.losses import dpo as fast
from fastrl_kernels.ops.dpo_loss import dpo_loss, fused_dpo_loss
from fastrl_kernels.reference import dpo as ref
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends

# Two pairs (rows 0, 1 chosen; 2, 3 rejected), T = 6, V = 9. Position 0 is prompt in every row, a few
# later positions are padding (mask 0) or carry ignore_index, so that mask, ignore_index and the response
# lengths (4, 2 | 2, 3) all matter; the pairs' shorter responses have 2 tokens, so LD-DPO down-weights
# two tokens of row 0 and one of row 3.
MASK = torch.tensor([[0, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 0, 0],
                     [0, 1, 1, 0, 0, 0],
                     [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
IGNORED = [(0, 3), (3, 5)]
V = 9


def _logits_targets(ignore_index: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(4, 6, V, generator=g)
    targets = torch.randint(0, V, (4, 6), generator=g)
    for row, col in IGNORED:
        targets[row, col] = ignore_index
    return logits, targets


def _hand_sequence(logits, targets, mask, *, temperature=1.0, ignore_index=-100, average=False, ld_alpha=None):
    """Float64 by hand: token log-probs of softmax(logits / temperature) at the targets, summed over the
    response tokens (mask and target != ignore_index), the tokens past the pair's shorter response weighted
    ld_alpha, divided by the response length when averaging; and the WPO weights
    exp(mean over response tokens of [log p_y - log sum_v p_v^2]) (detached)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    response = mask.bool() & (targets != ignore_index)
    token = logp.gather(-1, torch.where(response, targets, 0).unsqueeze(-1)).squeeze(-1)
    token = torch.where(response, token, torch.zeros((), dtype=torch.float64))
    resp = response.double()
    lengths = resp.sum(dim=1)
    weights = resp
    if ld_alpha is not None:
        half = resp.shape[0] // 2
        shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
        rank = torch.cumsum(resp, dim=1)
        weights = resp * torch.where(rank <= shared[:, None], 1.0, ld_alpha)
    seq = (token * weights).sum(dim=1)
    if average:
        seq = seq / lengths.clamp(min=1.0)
    with torch.no_grad():
        log_sum_p2 = torch.logsumexp(2.0 * logp, dim=-1)
        wpo = torch.exp(((token - log_sum_p2) * resp).sum(dim=1) / lengths.clamp(min=1.0))
    return seq, wpo


def _ref_logps(seq: torch.Tensor, seed: int = 1):
    """Reference sequence log-probs within +-1 of the policy's: O(1) log-ratios, as in training."""
    g = torch.Generator().manual_seed(seed)
    noise = 2.0 * torch.rand(seq.shape[0], generator=g, dtype=torch.float64) - 1.0
    ref_logps = (seq.detach() + noise).float()
    half = seq.shape[0] // 2
    return ref_logps[:half], ref_logps[half:]


def _pair_kwargs(cfg: DPOConfig) -> dict:
    return dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                f_divergence=cfg.f_divergence, f_alpha=cfg.f_alpha, loss_weights=cfg.loss_weights,
                discopop_tau=cfg.discopop_tau)


# ---------------------------------------------------------------------------------------------
# backend="reference": every option reaches the float64 formulas.

# Each field away from its default, each one changing the loss: a mixture with weights, label smoothing
# (robust), an alpha-divergence with alpha != 1/2, discopop's tau, LD-DPO, length averaging and WPO.
EVERY_OPTION = DPOConfig(beta=0.4, loss_type=("discopop", "robust"), loss_weights=(0.6, 1.5), label_smoothing=0.2,
                         f_divergence="alpha_divergence", f_alpha=0.3, ld_alpha=0.5, use_weighting=True,
                         average_logps=True, discopop_tau=0.5)


@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_reference_backend_applies_every_option(ignore_index):
    temperature = 0.7
    logits, targets = _logits_targets(ignore_index)
    x = logits.double().requires_grad_(True)
    seq, wpo = _hand_sequence(x, targets, MASK, temperature=temperature, ignore_index=ignore_index,
                              average=True, ld_alpha=0.5)
    ref_c, ref_r = _ref_logps(seq)
    losses, chosen, rejected = ref.dpo_loss(seq[:2], seq[2:], ref_c, ref_r, chosen_weights=wpo[:2],
                                            rejected_weights=wpo[2:], **_pair_kwargs(EVERY_OPTION))
    losses.mean().backward()

    leaf = logits.clone().requires_grad_(True)
    out = fused_dpo_loss(leaf, targets, MASK, ref_c, ref_r, config=EVERY_OPTION, backend="reference",
                         temperature=temperature, ignore_index=ignore_index)
    for name, value in out._asdict().items():
        assert value.dtype == torch.float32, name
    torch.testing.assert_close(out.loss, losses.mean().float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.chosen_rewards, (0.4 * (seq[:2] - ref_c)).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.rejected_rewards, (0.4 * (seq[2:] - ref_r)).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.margins, (chosen - rejected).float(), rtol=1e-6, atol=1e-7)
    assert out.accuracy.item() == (chosen > rejected).double().mean().item()
    out.loss.backward()
    assert leaf.grad.dtype == torch.float32
    torch.testing.assert_close(leaf.grad, x.grad.float(), rtol=1e-5, atol=1e-8)


def test_reference_backend_defaults_are_plain_dpo():
    """No options: sigmoid DPO at beta 0.1 on the summed log-probs of softmax(logits) over mask & target != -100."""
    logits, targets = _logits_targets(-100, seed=3)
    seq, _ = _hand_sequence(logits, targets, MASK)
    ref_c, ref_r = _ref_logps(seq, seed=4)
    h = 0.1 * ((seq[:2] - ref_c) - (seq[2:] - ref_r))
    expected = -torch.nn.functional.logsigmoid(h).mean()
    out = fused_dpo_loss(logits, targets, MASK, ref_c, ref_r, backend="reference")
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-6, atol=0)
    explicit = fused_dpo_loss(logits, targets, MASK, ref_c, ref_r, config=DPOConfig(), backend="reference",
                              temperature=1.0, ignore_index=-100)
    torch.testing.assert_close(out.loss, explicit.loss, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Fused backends: what must not change the result.

@pytest.mark.parametrize("backend", cpu_fused_backends())
@pytest.mark.parametrize("use_weighting", [False, True])
def test_fused_garbage_logits_at_masked_positions_do_not_reach_the_loss(backend, use_weighting):
    """NaN and +-inf logits at prompt / padding positions: loss and rewards are those of the float64
    formulas on any finite logits there, and their gradient is 0."""
    logits, targets = _logits_targets(-100, seed=5)
    seq, wpo = _hand_sequence(logits, targets, MASK)
    ref_c, ref_r = _ref_logps(seq, seed=6)
    kwargs = dict(beta=0.3, loss_type="sigmoid")
    losses, chosen, rejected = ref.dpo_loss(seq[:2], seq[2:], ref_c, ref_r, **kwargs,
                                            chosen_weights=wpo[:2] if use_weighting else None,
                                            rejected_weights=wpo[2:] if use_weighting else None)
    garbage = logits.clone()
    masked = ~MASK
    count = int(masked.sum()) * V
    fill = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(count)[:count]
    garbage[masked] = fill.view(-1, V)
    leaf = garbage.requires_grad_(True)
    out = fused_dpo_loss(leaf, targets, MASK, ref_c, ref_r, backend=backend, use_weighting=use_weighting, **kwargs)
    assert_close_to_reference(out.loss, losses.mean(), dtype=torch.float32, name=f"{backend} loss")
    assert_close_to_reference(out.chosen_rewards, chosen, dtype=torch.float32, name="chosen_rewards")
    assert_close_to_reference(out.rejected_rewards, rejected, dtype=torch.float32, name="rejected_rewards")
    out.loss.backward()
    assert bool((leaf.grad[masked] == 0).all())
    assert bool(torch.isfinite(leaf.grad).all())


@pytest.mark.parametrize("backend", cpu_fused_backends())
def test_fused_default_leaves_the_logits_untouched(backend):
    """inplace_grad defaults to False: after backward the logits (a non-leaf, as a model's output) keep
    their values, and the gradient reaching their producer equals the explicit inplace_grad=False one."""
    logits, targets = _logits_targets(-100, seed=7)
    seq, _ = _hand_sequence(logits, targets, MASK)
    ref_c, ref_r = _ref_logps(seq, seed=8)
    grads = []
    for options in ({}, {"inplace_grad": False}):
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1.0
        out = fused_dpo_loss(x, targets, MASK, ref_c, ref_r, backend=backend, **options)
        out.loss.backward()
        torch.testing.assert_close(x.detach(), logits, rtol=0, atol=0)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_fused_native_backend_is_used_as_asked():
    """backend="native" runs on CPU tensors only: asked for meta tensors it refuses them rather than fall
    back to another backend."""
    logits, targets = _logits_targets(-100)
    meta = dict(device="meta")
    with pytest.raises(RuntimeError, match=r"^backend='native': runs on CPU tensors only; got a tensor on meta$"):
        fused_dpo_loss(logits.to(**meta), targets.to(**meta), None, torch.zeros(2, **meta), torch.zeros(2, **meta),
                       backend="native")


# ---------------------------------------------------------------------------------------------
# dpo_loss on sequence log-probs.

PC, PR, RC, RR = [-1.0, -4.0, -2.5], [-3.0, -2.0, -6.0], [-2.0, -3.5, -2.0], [-2.5, -2.5, -5.0]


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_dpo_loss_returns_the_rewards_beta_times_the_log_ratios():
    out = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.5)
    chosen = [0.5 * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [0.5 * (pr - rr) for pr, rr in zip(PR, RR)]
    torch.testing.assert_close(out.chosen_rewards, _t(chosen), rtol=0, atol=0)
    torch.testing.assert_close(out.rejected_rewards, _t(rejected), rtol=0, atol=0)
    torch.testing.assert_close(out.margins, _t([c - r for c, r in zip(chosen, rejected)]), rtol=0, atol=0)
    assert out.accuracy.item() == pytest.approx(2 / 3)
    for name, value in out._asdict().items():
        assert value.dtype == torch.float32, name


def test_dpo_loss_of_a_rejected_response_with_probability_zero():
    """policy_rejected_logps = -inf (a token at a -inf logit): h = +inf, and the sigmoid DPO loss of that
    pair is its limit -log sigmoid(+inf) = 0 (no label smoothing), with a zero gradient."""
    pc = _t(PC[:2]).requires_grad_(True)
    pr = _t([PR[0], -math.inf]).requires_grad_(True)
    rc, rr = _t(RC[:2]), _t(RR[:2])
    losses, chosen, rejected = fast.dpo_pair_losses(pc, pr, rc, rr, DPOConfig(beta=0.5))
    h0 = 0.5 * ((PC[0] - RC[0]) - (PR[0] - RR[0]))
    torch.testing.assert_close(losses, _t([math.log1p(math.exp(-h0)), 0.0]), rtol=1e-6, atol=0)
    assert rejected[1].item() == -math.inf
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-h0)) / 2, rel=1e-6)
    out.loss.backward()
    assert bool(torch.isfinite(pc.grad).all()) and bool(torch.isfinite(pr.grad).all())
    assert pc.grad[1].item() == 0.0 and pr.grad[1].item() == 0.0


NAMES = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
         "chosen_weights", "rejected_weights"]


def _dpo_args(**replace) -> dict:
    args = dict(zip(NAMES, [_t(v) for v in (PC, PR, RC, RR)] + [torch.ones(3), torch.ones(3)]))
    args.update(replace)
    return args


def _call(args: dict):
    positional = [args.pop(name) for name in NAMES[:4]]
    return dpo_loss(*positional, **args)


@pytest.mark.parametrize("name", NAMES)
def test_dpo_loss_names_a_tensor_of_the_wrong_dtype(name):
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype in \[.*\], got torch.int64$"):
        _call(_dpo_args(**{name: torch.ones(3, dtype=torch.int64)}))


def test_dpo_loss_names_a_first_argument_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"^policy_chosen_logps: expected a torch.Tensor, got list$"):
        _call(_dpo_args(policy_chosen_logps=PC))


@pytest.mark.parametrize("name", NAMES[1:])
def test_dpo_loss_names_a_tensor_of_the_wrong_shape(name):
    pattern = rf"^{name}: expected shape \(3,\) \(\[B\] like policy_chosen_logps\), got \(4,\)$"
    with pytest.raises(ValueError, match=pattern):
        _call(_dpo_args(**{name: torch.zeros(4)}))


@pytest.mark.parametrize("name", NAMES[1:])
def test_dpo_loss_names_a_tensor_on_another_device(name):
    pattern = rf"^{name}: expected a tensor on cpu like policy_chosen_logps, got meta$"
    with pytest.raises(ValueError, match=pattern):
        _call(_dpo_args(**{name: torch.zeros(3, device="meta")}))


def test_dpo_loss_checks_rejected_weights_without_chosen_weights():
    """A wrongly shaped rejected_weights is reported by its shape even when chosen_weights is missing."""
    pattern = r"^rejected_weights: expected shape \(3,\) \(\[B\] like policy_chosen_logps\), got \(4,\)$"
    with pytest.raises(ValueError, match=pattern):
        _call(_dpo_args(chosen_weights=None, rejected_weights=torch.zeros(4)))


@pytest.mark.parametrize("given", ["chosen_weights", "rejected_weights"])
def test_dpo_loss_needs_both_pair_weights_or_neither(given):
    other = "rejected_weights" if given == "chosen_weights" else "chosen_weights"
    message = "chosen_weights / rejected_weights: expected both [B] tensors or neither, got one"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _call(_dpo_args(**{other: None}))


def test_dpo_loss_with_use_weighting_needs_the_weights():
    message = ("use_weighting=True: expected chosen_weights and rejected_weights ([B] WPO weights); "
               "fused_dpo_loss computes them from the logits")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _call(_dpo_args(chosen_weights=None, rejected_weights=None, use_weighting=True))


# ---------------------------------------------------------------------------------------------
# fused_dpo_loss: the reference log-probs are checked against the logits.

@pytest.mark.parametrize("name", ["ref_chosen_logps", "ref_rejected_logps"])
def test_fused_names_reference_logps_of_the_wrong_shape(name):
    logits, targets = _logits_targets(-100)
    args = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    args[name] = torch.zeros(4)
    pattern = rf"^{name}: expected shape \(2,\) \(\[B\], half the rows of logits\), got \(4,\)$"
    with pytest.raises(ValueError, match=pattern):
        fused_dpo_loss(logits, targets, MASK, args["ref_chosen_logps"], args["ref_rejected_logps"], backend="torch")


@pytest.mark.parametrize("name", ["ref_chosen_logps", "ref_rejected_logps"])
def test_fused_names_reference_logps_on_another_device(name):
    logits, targets = _logits_targets(-100)
    args = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    args[name] = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on cpu like logits, got meta$"):
        fused_dpo_loss(logits, targets, MASK, args["ref_chosen_logps"], args["ref_rejected_logps"], backend="torch")


# ---------------------------------------------------------------------------------------------
# WPO weights of the O(N) algebra: computed in float32 or higher, whatever the inputs' dtypes.

def _wpo_inputs(seed: int = 9):
    g = torch.Generator().manual_seed(seed)
    token_logps = -4.0 * torch.rand(4, 6, generator=g)
    log_sum_p2 = -2.0 * torch.rand(4, 6, generator=g) - 0.01
    return token_logps, log_sum_p2


def _hand_wpo(token_logps, log_sum_p2, mask):
    m = mask.double()
    return torch.exp(((token_logps.double() - log_sum_p2.double()) * m).sum(1) / m.sum(1).clamp(min=1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wpo_weights_of_half_precision_log_probs_are_float32(dtype):
    """Half-precision token log-probs and log sum p^2: the difference is taken in float32 (a bf16 difference
    of two O(1) numbers is off by up to 2^-8 of itself), the weights are float32."""
    token_logps, log_sum_p2 = (t.to(dtype) for t in _wpo_inputs())
    got = fast.wpo_sequence_weights(token_logps, log_sum_p2, MASK)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _hand_wpo(token_logps, log_sum_p2, MASK).float(), rtol=1e-6, atol=0)


def test_wpo_weights_follow_the_token_log_probs_dtype():
    """float32 token log-probs with a float64 log sum p^2 and mask: float32 weights, as for a float32 mask."""
    token_logps, log_sum_p2 = _wpo_inputs()
    want = fast.wpo_sequence_weights(token_logps, log_sum_p2, MASK.float())
    assert want.dtype == torch.float32
    torch.testing.assert_close(want, _hand_wpo(token_logps, log_sum_p2, MASK).float(), rtol=1e-6, atol=0)
    got = fast.wpo_sequence_weights(token_logps, log_sum_p2.double(), MASK.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)



@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_wpo_weights_ignore_the_default_dtype(float64_default, mask_dtype):
    """Under a float64 default dtype, float32 token log-probs and a bool / int mask still give float32
    weights equal to the formula."""
    token_logps, log_sum_p2 = (t.float() for t in _wpo_inputs())
    got = fast.wpo_sequence_weights(token_logps, log_sum_p2, MASK.to(mask_dtype))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _hand_wpo(token_logps, log_sum_p2, MASK).float(), rtol=1e-6, atol=0)
