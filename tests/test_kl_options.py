"""kl_agg (the KL term's own aggregation) and kl_value_cap (a cap on the KL estimator's value per token):
config checks, hand values, verl 0.9.1's ``kl_penalty``, and every entry point against the float64 reference.

Peers: verl's ``kl_penalty_forward`` for "k3" / "low_var_kl" clamps k = ref - logp to [-20, 20], then the
value e^k - k - 1 to [-10, 10] with ``torch.clamp`` (zero gradient where the cap binds); its "+" estimators
detach that value and take k2's gradient. OpenRLHF's ``compute_approx_kl`` (openrlhf/models/utils.py)
computes log_ratio = logp - ref (k1), log_ratio^2 / 2 (k2) or exp(-log_ratio) - 1 + log_ratio (k3), then
``log_ratio.clamp(min=-10, max=10)`` for every estimator: kl_value_cap=10 with kl_clamp=None. OpenRLHF's
actor takes ``masked_mean(kl, action_mask)`` of it whatever the policy aggregation: kl_agg="token-mean".
"""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.losses.kl import kl_penalty as fused_kl_penalty
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends
from tests.test_linear import _problem, _reference_logits
from tests.verl_import import import_core_algos

BACKENDS = cpu_fused_backends()
ESTIMATORS = ["k1", "abs", "k2", "k3", "k1+", "k3+"]


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_kl_value_cap_refusals_name_it(value):
    with pytest.raises(ValueError, match="kl_value_cap"):
        PolicyLossConfig(kl_value_cap=value)


@pytest.mark.parametrize("value", ["mean", "token_mean", ""])
def test_kl_agg_refusals_name_it(value):
    with pytest.raises(ValueError, match="kl_agg"):
        PolicyLossConfig(kl_agg=value)


def test_kl_agg_defaults_to_loss_agg_and_takes_trl_names():
    assert PolicyLossConfig().kl_agg is None and PolicyLossConfig().kl_value_cap is None
    assert PolicyLossConfig(loss_agg="grpo").resolved_kl_agg == "seq-mean-token-mean"
    config = PolicyLossConfig(loss_agg="grpo", kl_agg="bnpo")
    assert config.kl_agg == config.resolved_kl_agg == "token-mean"


# --- the estimator -----------------------------------------------------------------------------


def _k(values):
    ref = torch.zeros(len(values), dtype=torch.float64)
    logp = -torch.tensor(values, dtype=torch.float64)  # k = ref - logp = values
    return logp.requires_grad_(), ref


@pytest.mark.parametrize("fn", [reference.kl_penalty, fused_kl_penalty], ids=["reference", "fused"])
def test_value_cap_hand_values_and_gradients(fn):
    # k = 3: k3 = e^3 - 4 = 16.09 -> capped at 10, gradient 0; k = 0.5: e^0.5 - 1.5 = 0.149, not capped,
    # d/dlogp = -(e^k - 1) = -0.6487; k = -12: k1 = 12 -> 10 (gradient 0), k = 0.5: k1 = -0.5.
    logp, ref = _k([3.0, 0.5])
    value = fn(logp, ref, "k3", None, 10.0)
    torch.testing.assert_close(value, torch.tensor([10.0, 0.5 ** 0 * (2.718281828459045 ** 0.5 - 1.5)],
                                                   dtype=torch.float64))
    value.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -(2.718281828459045 ** 0.5 - 1.0)], dtype=torch.float64))
    logp, ref = _k([-12.0, 0.5])
    value = fn(logp, ref, "k1", None, 10.0)
    torch.testing.assert_close(value, torch.tensor([10.0, -0.5], dtype=torch.float64))
    value.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.0], dtype=torch.float64))
    # "+": the capped value with k2's gradient, d(k^2/2)/dlogp = -k, also where the cap binds.
    logp, ref = _k([3.0, 0.5])
    value = fn(logp, ref, "k3+", None, 10.0)
    value.sum().backward()
    assert value[0].item() == 10.0
    torch.testing.assert_close(logp.grad, torch.tensor([-3.0, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_value_cap_equals_verl_kl_penalty(estimator):
    """verl caps k3 at 10 after clamping k at 20: kl_clamp=20, kl_value_cap=10; values and gradients."""
    core_algos = import_core_algos()
    g = torch.Generator().manual_seed(3)
    ref = -1.0 - torch.rand(64, generator=g, dtype=torch.float64)
    logp = ref - 4.0 * torch.randn(64, generator=g, dtype=torch.float64)  # |k| up to ~10: the cap binds
    results = []
    for fn in (lambda lp: core_algos.kl_penalty(lp, ref, estimator),
               lambda lp: reference.kl_penalty(lp, ref, estimator, 20.0, 10.0),
               lambda lp: fused_kl_penalty(lp, ref, estimator, 20.0, 10.0)):
        lp = logp.clone().requires_grad_()
        value = fn(lp)
        value.sum().backward()
        results.append((value.detach(), lp.grad))
    assert bool((results[0][0] == 10.0).any()) and bool((results[0][0] < 10.0).any())
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)


# --- the losses --------------------------------------------------------------------------------


def test_kl_agg_hand_value():
    """gpg with A = 0 leaves only the KL: kl_agg="token-mean" gives kl_coef * sum(m kl) / sum(m) whatever
    loss_agg (here seq-mean-token-sum, which would give kl_coef * sum(m kl) / B)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -1.0, -0.5], [-1.0, -0.4, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    k = ref - logp
    kl = torch.exp(k) - k - 1.0
    config = PolicyLossConfig(loss_type="gpg", kl_coef=0.5, loss_agg="seq-mean-token-sum", entropy_mode="sampled")
    adv = torch.zeros(2)
    for fn in (reference.policy_loss_from_logprobs, fk.policy_loss_from_logprobs):
        own, _ = fn(logp, None, logp, adv, mask, ref_logprobs=ref, config=config.with_overrides(kl_agg="token-mean"))
        same, _ = fn(logp, None, logp, adv, mask, ref_logprobs=ref, config=config)
        torch.testing.assert_close(own.double(), 0.5 * (kl * mask).sum() / 5.0)
        torch.testing.assert_close(same.double(), 0.5 * (kl * mask).sum() / 2.0)


CASES = [
    dict(loss_agg="seq-mean-token-sum", kl_agg="token-mean", kl_estimator="k3"),
    dict(loss_agg="token-mean", kl_agg="seq-mean-token-mean", kl_estimator="k1", kl_value_cap=0.3),
    dict(loss_agg="grpo", kl_agg="dr_grpo", kl_estimator="k3+", kl_value_cap=0.05, entropy_coef=0.1),
    dict(loss_agg="seq-mean-token-mean", kl_estimator="k2", kl_value_cap=0.02),
    dict(loss_agg="token-mean", kl_agg="sum", kl_estimator="abs", kl_value_cap=0.1, loss_type="cispo"),
]


def _policy_inputs(seed, shape=(3, 6), vocab=17):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn((*shape, vocab), generator=g)
    targets = torch.randint(0, vocab, shape, generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] + 0.3 * torch.randn(shape, generator=g)
    ref = old - 1.0 * torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    return logits, targets, old, adv, mask, ref


def _config(case):
    return PolicyLossConfig(**{"kl_coef": 0.7, **case})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_policy_loss_matches_reference(backend, case):
    logits, targets, old, adv, mask, ref = _policy_inputs(10 + case)
    config = _config(CASES[case])
    x = logits.clone().requires_grad_()
    out = fk.policy_loss(x, targets, old, adv, mask, ref_logprobs=ref, config=config, backend=backend)
    out.loss.backward()
    y = logits.double().requires_grad_()
    want, *_, metrics = reference.policy_loss(y, targets, old, adv, mask, ref_logprobs=ref, config=config)
    want.backward()
    assert_close_to_reference(out.loss, want, dtype=torch.float32, name="loss")
    assert_close_to_reference(x.grad, y.grad, dtype=torch.float32, kind="grad", name="grad")
    assert_close_to_reference(out.metrics["kl_mean"], metrics["kl_mean"], dtype=torch.float32, name="kl_mean")
    # the option matters: without it the loss differs
    plain = reference.policy_loss(logits.double(), targets, old, adv, mask, ref_logprobs=ref,
                                  config=config.with_overrides(kl_agg=None, kl_value_cap=None))[0]
    assert abs(plain.item() - want.item()) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_linear_policy_loss_matches_reference(backend, case):
    hidden, weight, bias, targets = _problem((3, 6), 8, 19, seed=30 + case)
    g = torch.Generator().manual_seed(case)
    old = -2.0 - torch.rand((3, 6), generator=g)
    ref = old - torch.randn((3, 6), generator=g)
    adv = torch.randn((3, 6), generator=g)
    mask = torch.rand((3, 6), generator=g) > 0.25
    config = _config(CASES[case])
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fk.linear_policy_loss(h, w, targets, old, adv, mask, bias=b, ref_logprobs=ref, config=config,
                                backend=backend, chunk_size=5)
    out.loss.backward()
    hd, wd, bd = (t.double().requires_grad_() for t in (hidden, weight, bias))
    want, *_ = reference.policy_loss(hd @ wd.t() + bd, targets, old, adv, mask, ref_logprobs=ref, config=config)
    want.backward()
    assert_close_to_reference(out.loss, want, dtype=torch.float32, name="loss")
    for name, got, expected in (("hidden", h.grad, hd.grad), ("weight", w.grad, wd.grad), ("bias", b.grad, bd.grad)):
        assert_close_to_reference(got, expected, dtype=torch.float32, kind="grad", name=name)
    torch.testing.assert_close(_reference_logits(hidden, weight, bias), (hd @ wd.t() + bd).detach())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_policy_loss_from_logprobs_matches_reference(case):
    logits, targets, old, adv, mask, ref = _policy_inputs(50 + case)
    config = _config(CASES[case])
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    lp, h = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    got, metrics = fk.policy_loss_from_logprobs(lp, h, old, adv, mask, ref_logprobs=ref, config=config)
    got.backward()
    lpd, hd = logp.double().requires_grad_(), entropy.double().requires_grad_()
    want, want_metrics = reference.policy_loss_from_logprobs(lpd, hd, old, adv, mask, ref_logprobs=ref, config=config)
    want.backward()
    assert_close_to_reference(got, want, dtype=torch.float32, name="loss")
    assert_close_to_reference(lp.grad, lpd.grad, dtype=torch.float32, kind="grad", name="dlogp")
    if config.entropy_coef != 0.0:
        assert_close_to_reference(h.grad, hd.grad, dtype=torch.float32, kind="grad", name="dentropy")
    assert_close_to_reference(metrics["kl_mean"], want_metrics["kl_mean"], dtype=torch.float32, name="kl_mean")


def test_kl_agg_equal_to_loss_agg_changes_nothing():
    logits, targets, old, adv, mask, ref = _policy_inputs(7)
    config = PolicyLossConfig(kl_coef=0.4, loss_agg="seq-mean-token-mean")
    base = fk.policy_loss(logits, targets, old, adv, mask, ref_logprobs=ref, config=config, backend="torch").loss
    same = fk.policy_loss(logits, targets, old, adv, mask, ref_logprobs=ref, backend="torch",
                          config=config.with_overrides(kl_agg="grpo")).loss
    assert torch.equal(base, same)
