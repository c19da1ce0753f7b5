"""Every numeric option refuses NaN, infinities (except where inf has a stated meaning) and values out of
its range with a ValueError naming it; the limits that are allowed give finite losses and gradients;
float64 inputs run on every backend and op, within float32 tolerances of the reference."""

import math
import typing
from dataclasses import fields
from functools import partial

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.config import DPOConfig, PolicyLossConfig
from fastrl_kernels.ops import advantages as ops
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends

NAN, INF = math.nan, math.inf
FUSED = cpu_fused_backends(interpreted=True)
BACKENDS = FUSED + ["reference"]
NOT_A_NUMBER = ["0.1", True, torch.tensor(0.5)]

# Per numeric field: values refused, values accepted (edges included).
POLICY_FIELDS = {
    "clip_eps_low": ([NAN, -INF, -0.1], [0.0, 1.0, INF]),
    "clip_eps_high": ([NAN, -INF, -1e-9], [0.0, 0.28, INF]),
    "delta": ([NAN, INF, 1.0, 0.5, -2.0], [None, 1.0001, 4.0]),
    "dual_clip": ([NAN, INF, 1.0, 0.0], [None, 1.5, 3.0]),
    "sapo_temp_pos": ([NAN, INF, 0.0, -1.0], [1e-3, 1.0]),
    "sapo_temp_neg": ([NAN, INF, 0.0, -1.0], [1e-3, 1.05]),
    "kl_coef": ([NAN, INF, -INF, -0.1], [0.0, 0.04]),
    "kl_clamp": ([NAN, INF, 0.0, -1.0], [None, 1e-3, 20.0]),
    "kl_value_cap": ([NAN, INF, 0.0, -1.0], [None, 1e-3, 10.0]),
    "entropy_coef": ([NAN, INF, -INF], [-0.01, 0.0, 0.01]),
    "temperature": ([NAN, INF, 0.0, -1.0], [1e-3, 0.7, 1.0]),
}
DPO_FIELDS = {
    "beta": ([NAN, INF, 0.0, -1.0], [1e-3, 0.1, 10.0]),
    "label_smoothing": ([NAN, INF, -0.1, 0.5, 0.7], [0.0, 0.49]),
    "f_alpha": ([NAN, INF, -INF], [-2.0, 0.0, 0.5, 1.0]),
    "ld_alpha": ([NAN, INF, -0.1, 1.1], [None, 0.0, 0.5, 1.0]),
    "discopop_tau": ([NAN, INF, 0.0, -0.05], [1e-3, 0.05]),
}
CONFIG_TABLES = [(PolicyLossConfig, POLICY_FIELDS), (DPOConfig, DPO_FIELDS)]


def _numeric_fields(cls) -> set:
    hints = typing.get_type_hints(cls)
    return {f.name for f in fields(cls) if "float" in str(hints[f.name])}


@pytest.mark.parametrize("cls, table", CONFIG_TABLES)
def test_every_numeric_config_field_is_in_the_tables(cls, table):
    """A new float option must come with its refused and accepted values here."""
    assert _numeric_fields(cls) == set(table)


def _cases():
    for cls, table in CONFIG_TABLES:
        for name, (bad, good) in table.items():
            for value in bad + NOT_A_NUMBER:
                yield pytest.param(cls, name, value, False, id=f"{cls.__name__}-{name}={value!r}-refused")
            for value in good:
                yield pytest.param(cls, name, value, True, id=f"{cls.__name__}-{name}={value!r}-accepted")


@pytest.mark.parametrize("cls, name, value, accepted", list(_cases()))
def test_config_option_values(cls, name, value, accepted):
    if accepted:
        assert getattr(cls(**{name: value}), name) == value
        return
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, got "):
        cls(**{name: value})


@pytest.mark.parametrize("weights", [(1.0, NAN), (INF, 1.0), (1.0, -0.5), ("1", 1.0)])
def test_dpo_loss_weights_must_be_finite_and_nonnegative(weights):
    with pytest.raises(ValueError, match=r"^loss_weights: expected numbers >= 0, got "):
        DPOConfig(loss_type=("sigmoid", "ipo"), loss_weights=weights)


@pytest.mark.parametrize("name", ["use_weighting", "average_logps"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_dpo_flags_must_be_bools(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected True or False, got "):
        DPOConfig(**{name: value})


def test_infinite_values_are_named_finite_in_the_message():
    with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0, got inf$"):
        PolicyLossConfig(temperature=INF)
    with pytest.raises(ValueError, match=r"^beta: expected a finite number > 0, got nan$"):
        DPOConfig(beta=NAN)


# --- the transform options of the ops (not config fields) -----------------------------------------


def _logits_inputs(dtype=torch.float32, seed=0, shape=(2, 3), vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(*shape, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    return logits, targets


TRANSFORM_BAD = [("temperature", v) for v in (NAN, INF, 0.0, -1.0)] + \
    [("logit_scale", v) for v in (NAN, INF, 0.0, -2.0)] + [("softcap", v) for v in (NAN, INF, 0.0, -30.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, value", TRANSFORM_BAD)
def test_transform_options_are_checked_by_every_logits_op(backend, name, value):
    logits, targets = _logits_inputs()
    old, adv = torch.zeros(2, 3), torch.zeros(2)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(11, 4)
    calls = [
        lambda: fk.token_logprobs(logits, targets, backend=backend, **{name: value}),
        lambda: fk.policy_loss(logits, targets, old, adv, backend=backend, **{name: value}),
        lambda: fk.linear_token_logprobs(hidden, weight, targets, backend=backend, **{name: value}),
        lambda: fk.linear_policy_loss(hidden, weight, targets, old, adv, backend=backend, **{name: value}),
    ]
    if name == "temperature":  # the DPO ops take no logit_scale / softcap
        calls += [
            lambda: fk.fused_dpo_loss(logits, targets, None, torch.zeros(1), torch.zeros(1), backend=backend,
                                      temperature=value),
            lambda: fk.linear_dpo_loss(hidden, weight, targets, None, torch.zeros(1), torch.zeros(1),
                                       backend=backend, temperature=value),
        ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"^{name}: expected "):
            call()


# --- clip ranges of inf: no clipping on that side --------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss_type", ["clip", "cispo", "gspo"])
@pytest.mark.parametrize("side", ["clip_eps_low", "clip_eps_high"])
def test_an_infinite_clip_range_is_no_clipping_on_that_side(backend, loss_type, side):
    """Loss, gradient and metrics finite, equal to a huge finite range, and match the reference."""
    logits, targets = _logits_inputs(seed=11)
    g = torch.Generator().manual_seed(12)
    old = torch.randn(2, 3, generator=g) - 2.5  # ratios far from 1 on both sides
    adv = torch.tensor([1.0, -1.0])
    results = {}
    for eps in (INF, 1e30):
        for be in (backend, "reference"):
            z = logits.clone().requires_grad_()
            out = fk.policy_loss(z, targets, old, adv, backend=be, loss_type=loss_type, **{side: eps})
            out.loss.backward()
            assert math.isfinite(out.loss.item()) and bool(torch.isfinite(z.grad).all())
            assert all(math.isfinite(v.item()) for v in out.metrics.values())
            results[eps, be] = (out.loss, z.grad)
    for be in (backend, "reference"):
        assert results[INF, be][0].item() == pytest.approx(results[1e30, be][0].item(), rel=1e-6)
    assert_close_to_reference(results[INF, backend][0], results[INF, "reference"][0], dtype=torch.float32)
    assert_close_to_reference(results[INF, backend][1], results[INF, "reference"][1], dtype=torch.float32,
                              kind="grad")


# --- normalizer ------------------------------------------------------------------------------------

BAD_NORMALIZERS = [0, 0.0, -1.0, NAN, INF, "3", torch.tensor(0.0), torch.tensor(NAN), torch.tensor(-4),
                   torch.tensor([3.0, INF])]
GOOD_NORMALIZERS = [3, 2.5, torch.tensor(3.0), torch.tensor(6, dtype=torch.int64)]


def _normalizer_calls(normalizer, backend):
    logits, targets = _logits_inputs()
    old, adv, mask = torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3)
    hidden, weight = torch.randn(2, 3, 4), torch.randn(11, 4)
    return [
        lambda: fk.policy_loss(logits, targets, old, adv, mask, backend=backend, normalizer=normalizer).loss,
        lambda: fk.linear_policy_loss(hidden, weight, targets, old, adv, mask, backend=backend,
                                      normalizer=normalizer).loss,
        lambda: fk.policy_loss_from_logprobs(old, old, old, adv, mask, normalizer=normalizer)[0],
        lambda: fk.value_loss(old, old, old + 1.0, mask, normalizer=normalizer),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalizer", BAD_NORMALIZERS, ids=repr)
def test_a_normalizer_must_be_finite_and_positive(backend, normalizer):
    for call in _normalizer_calls(normalizer, backend):
        with pytest.raises(ValueError, match=r"^normalizer: expected "):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalizer", GOOD_NORMALIZERS, ids=repr)
def test_positive_normalizers_are_accepted(backend, normalizer):
    for call in _normalizer_calls(normalizer, backend):
        assert math.isfinite(call().item())


def test_a_bool_normalizer_is_refused():
    with pytest.raises(TypeError, match=r"^normalizer: expected a float or integer tensor, got torch.bool$"):
        fk.value_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), normalizer=torch.tensor(True))


# --- advantage options -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, -0.1, 1.0001, 2.0, "0.9", True])
def test_gae_discounts_must_lie_in_zero_one(name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a (finite )?number in \[0, 1\], got "):
        ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), None, **{name: value})


@pytest.mark.parametrize("gamma, lam", [(0.0, 0.0), (1.0, 1.0), (0, 1)])
def test_gae_accepts_the_ends_of_zero_one(gamma, lam):
    adv, ret = ops.gae(torch.randn(2, 3), torch.randn(2, 3), None, gamma=gamma, lam=lam)
    assert bool(torch.isfinite(adv).all() and torch.isfinite(ret).all())


@pytest.mark.parametrize("eps", [NAN, INF, 0.0, -1e-8, "1e-8"])
def test_group_advantages_eps_must_be_positive_and_finite(eps):
    """eps = 0 would make a group of equal rewards 0 / 0 = NaN."""
    with pytest.raises(ValueError, match=r"^eps: expected a (finite )?number > 0, got "):
        ops.group_advantages(torch.zeros(4), 2, eps=eps)


@pytest.mark.parametrize("std_ddof", [-1, 0.5, True, None])
def test_group_advantages_std_ddof_must_be_a_nonnegative_int(std_ddof):
    with pytest.raises(ValueError, match=r"^std_ddof: expected an int >= 0"):
        ops.group_advantages(torch.zeros(4), 2, std_ddof=std_ddof)


@pytest.mark.parametrize("clip", [NAN, INF, -INF, "0.2"])
def test_value_loss_clip_must_be_finite(clip):
    with pytest.raises(ValueError, match=r"^clip: expected a (finite )?number > 0 or None, got "):
        ops.value_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip=clip)


# --- float64 inputs: accepted by every backend and op -----------------------------------------------


def _grad_of(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    loss.backward()
    return loss, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", FUSED)
def test_float64_logits_match_the_reference(backend):
    """token_logprobs, policy_loss and fused_dpo_loss on float64 logits: float32 results within float32
    tolerances of the float64 reference, and a float64 gradient (in place too)."""
    logits, targets = _logits_inputs(torch.float64, seed=21, shape=(4, 5), vocab=13)
    g = torch.Generator().manual_seed(22)
    old = torch.randn(4, 5, generator=g, dtype=torch.float64) - 2.5
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    ref_c, ref_r = -torch.rand(2, generator=g, dtype=torch.float64) * 10, -torch.rand(2, dtype=torch.float64) * 10

    def token(be, z):
        lp, h = fk.token_logprobs(z, targets, backend=be, temperature=0.8)
        return (lp * torch.linspace(-1, 1, 5)).sum() + 0.3 * h.sum(), lp, h

    def policy(be, z, inplace=False):
        out = fk.policy_loss(z, targets, old, adv, backend=be, ref_logprobs=old + 0.2, kl_coef=0.1,
                             entropy_coef=0.01, inplace_grad=inplace)
        return out.loss, out.logprobs, out.entropy

    def dpo(be, z, inplace=False):
        out = fk.fused_dpo_loss(z, targets, None, ref_c, ref_r, backend=be, use_weighting=True,
                                inplace_grad=inplace)
        return out.loss, out.margins, None

    for name, fn in (("token_logprobs", token), ("policy_loss", policy), ("fused_dpo_loss", dpo)):
        results = {}
        for be in (backend, "reference"):
            z = logits.clone().requires_grad_()
            loss, a, b = fn(be, z)
            loss.backward()
            assert loss.dtype == torch.float32 and a.dtype == torch.float32, name
            assert z.grad.dtype == torch.float64, name
            results[be] = (loss, a, b, z.grad)
        got, want = results[backend], results["reference"]
        for part, x, y in zip(("loss", "out1", "out2"), got[:3], want[:3]):
            if y is not None:
                assert_close_to_reference(x, y, dtype=torch.float32, name=f"{name} {part}")
        assert_close_to_reference(got[3], want[3], dtype=torch.float32, kind="grad", name=f"{name} grad")
        if name != "token_logprobs":  # in place: the gradient is written over the float64 logits
            z = logits.clone().requires_grad_()
            x = z * 1.0
            fn(backend, x, inplace=True)[0].backward()
            torch.testing.assert_close(z.grad, got[3], rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_float64_lm_head_ops_match_the_reference(backend):
    g = torch.Generator().manual_seed(31)
    hidden = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64) / 2
    targets = torch.randint(0, 13, (2, 3), generator=g)
    old = torch.randn(2, 3, generator=g, dtype=torch.float64) - 2.5
    adv = torch.randn(2, generator=g, dtype=torch.float64)

    def token(be, h, w):
        lp, ent = fk.linear_token_logprobs(h, w, targets, backend=be, chunk_size=4)
        return lp.sum() + 0.3 * ent.sum()

    def policy(be, h, w):
        return fk.linear_policy_loss(h, w, targets, old, adv, backend=be, chunk_size=4, entropy_coef=0.01).loss

    def dpo(be, h, w):
        return fk.linear_dpo_loss(h, w, targets, None, torch.tensor([-3.0], dtype=torch.float64),
                                  torch.tensor([-4.0], dtype=torch.float64), backend=be, chunk_size=4).loss

    for name, fn in (("linear_token_logprobs", token), ("linear_policy_loss", policy), ("linear_dpo_loss", dpo)):
        loss, grads = _grad_of(partial(fn, backend), hidden, weight)
        want, want_grads = _grad_of(partial(fn, "reference"), hidden, weight)
        assert loss.dtype == torch.float32 and all(gr.dtype == torch.float64 for gr in grads), name
        assert_close_to_reference(loss, want, dtype=torch.float32, name=name)
        for part, x, y in zip(("hidden", "weight"), grads, want_grads):
            assert_close_to_reference(x, y, dtype=torch.float32, kind="grad", name=f"{name} d{part}")


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "torch"])
def test_float64_primitives_write_a_float64_gradient(backend):
    """The kernels' stats / grad on float64 rows: those of the float32-rounded rows (the torch backend
    reads float64 itself), into a new tensor, into out= and in place."""
    from fastrl_kernels.backends import primitives
    from fastrl_kernels.core import CoreParams

    prims = primitives(backend)
    logits, targets = _logits_inputs(torch.float64, seed=41, shape=(5,), vocab=9)
    targets[1] = -100
    params = CoreParams(temperature=0.9)
    g_lp, g_h = torch.randn(5), torch.randn(5)
    stats = prims.stats(logits, targets, params)
    stats32 = prims.stats(logits.float(), targets, params)
    for field in ("logp", "entropy", "lse", "mean_x"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats32, field), rtol=0, atol=0)
    want = prims.grad(logits.float(), targets, stats32, g_lp, g_h, params).double()
    fresh = prims.grad(logits, targets, stats, g_lp, g_h, params)
    assert fresh.dtype == torch.float64
    out = torch.full_like(logits, NAN)
    assert prims.grad(logits, targets, stats, g_lp, g_h, params, out=out) is out
    in_place = logits.clone()
    prims.grad(in_place, targets, stats, g_lp, g_h, params, out=in_place)
    for got in (fresh, out, in_place):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not in_place[1].any()
    with pytest.raises(ValueError, match=r"^out: expected \(5, 9\) torch.float64"):
        prims.grad(logits, targets, stats, g_lp, g_h, params, out=torch.empty(5, 9))
