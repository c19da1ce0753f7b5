"""gae, group_advantages and value_loss: reference (float64) and ops (float32) against plain loops."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import reference as ref
from fastrl_kernels.config import LOSS_AGG_ALIASES, LOSS_AGG_MODES
from fastrl_kernels.ops import advantages as ops
from fastrl_kernels.testing import assert_close_to_reference
from fastrl_kernels.testing.strategies import masks

seeds = st.integers(0, 2**31 - 1)


def loop_gae(rewards, values, mask, gamma, lam):
    """One scalar at a time; a masked step is skipped (next value and running advantage carry over)."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, (r_row, v_row, m_row) in enumerate(zip(rewards, values, mask)):
        next_value, running = 0.0, 0.0
        for t in reversed(range(len(r_row))):
            if not m_row[t]:
                continue
            delta = r_row[t] + gamma * next_value - v_row[t]
            running = delta + gamma * lam * running
            next_value = v_row[t]
            advantages[b][t] = running
    return torch.tensor(advantages, dtype=torch.float64)


@st.composite
def gae_inputs(draw):
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(seeds))
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = draw(masks((batch, length)))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5, 0.0]) | st.floats(0.0, 1.0))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]) | st.floats(0.0, 1.0))
    return rewards, values, mask, gamma, lam


@settings(max_examples=50)
@given(inputs=gae_inputs())
def test_gae_matches_a_plain_loop(inputs):
    rewards, values, mask, gamma, lam = inputs
    want = loop_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    advantages, returns = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, torch.where(mask, want + values, values), rtol=1e-12, atol=1e-12)
    fast_adv, fast_ret = ops.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    assert fast_adv.dtype == fast_ret.dtype == torch.float32
    assert_close_to_reference(fast_adv, advantages, dtype=torch.float32, name="gae advantages")
    assert_close_to_reference(fast_ret, returns, dtype=torch.float32, name="gae returns")


def test_gae_hand_case_skips_masked_steps():
    # mask [1, 0, 1], gamma 0.5, lam 1: the middle step is skipped, so step 0 looks at step 2
    # t=2: A = 1 - 0.5 = 0.5 (no next value); t=0: delta = 0 + 0.5 * V_2 - V_0 = 0.25 - 1 = -0.75,
    #      A = -0.75 + 0.5 * 0.5 = -0.5. The reward 7 and value 9 of the masked step are ignored.
    rewards = torch.tensor([[0.0, 7.0, 1.0]])
    values = torch.tensor([[1.0, 9.0, 0.5]])
    mask = torch.tensor([[1, 0, 1]])
    for gae in (ref.gae, ops.gae):
        advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
        torch.testing.assert_close(advantages.double(), torch.tensor([[-0.5, 0.0, 0.5]], dtype=torch.float64))
        torch.testing.assert_close(returns.double(), torch.tensor([[0.5, 9.0, 1.0]], dtype=torch.float64))


def numpy_masked_whiten(x, m):
    kept = x[m]
    if kept.size <= 1:
        return np.zeros_like(x)
    out = (x - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8)
    return np.where(m, out, 0.0)


@settings(max_examples=30)
@given(inputs=gae_inputs())
def test_gae_whiten_is_masked_unbiased_whitening(inputs):
    rewards, values, mask, gamma, lam = inputs
    raw, raw_returns = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    whitened, returns = ref.gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    torch.testing.assert_close(returns, raw_returns)  # returns come before whitening
    want = numpy_masked_whiten(raw.numpy(), mask.numpy())
    np.testing.assert_allclose(whitened.numpy(), want, rtol=1e-9, atol=1e-9)
    fast, _ = ops.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam, whiten=True)
    # whitening divides by the spread, so float32 rounding of A is amplified by 1 / std
    spread = float(raw[mask].std()) if int(mask.sum()) > 1 else 1.0
    if spread > 1e-3:
        np.testing.assert_allclose(fast.numpy(), want, rtol=1e-4, atol=1e-4 / min(spread, 1.0))


def test_gae_accepts_half_inputs_and_gives_float32():
    rewards = torch.randn(2, 5).bfloat16()
    advantages, returns = ops.gae(rewards, rewards, None, gamma=0.9, lam=0.9)
    assert advantages.dtype == returns.dtype == torch.float32
    want, _ = ref.gae(rewards, rewards, None, gamma=0.9, lam=0.9)
    assert_close_to_reference(advantages, want, dtype=torch.float32, name="bf16 gae")


def test_gae_rejects_bad_shapes():
    with pytest.raises(ValueError, match="values"):
        ops.gae(torch.zeros(2, 3), torch.zeros(2, 4), None)
    with pytest.raises(ValueError, match="rewards"):
        ops.gae(torch.zeros(3), torch.zeros(3), None)


@settings(max_examples=40)
@given(s=seeds, group_size=st.integers(2, 8), groups=st.integers(1, 3), scale=st.sampled_from(["std", "none"]))
def test_group_advantages_ddof_1_is_torch_std(s, group_size, groups, scale):
    rewards = torch.randn(groups * group_size, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    by_group = rewards.view(groups, group_size)
    centred = by_group - by_group.mean(1, keepdim=True)
    want = (centred / (by_group.std(1, keepdim=True) + 1e-8) if scale == "std" else centred).reshape(-1)
    got = ref.group_advantages(rewards, group_size, scale=scale, std_ddof=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    fast = ops.group_advantages(rewards, group_size, scale=scale, std_ddof=1)
    assert fast.dtype == torch.float32
    assert_close_to_reference(fast, want, dtype=torch.float32, name="group_advantages")


@settings(max_examples=40)
@given(s=seeds, group_size=st.integers(1, 8), groups=st.integers(1, 3), scale=st.sampled_from(["std", "none"]),
       std_ddof=st.sampled_from([0, 1]), eps=st.sampled_from([1e-8, 1e-3, 0.5, 2.0]) | st.floats(1e-8, 4.0),
       ties=st.booleans())
def test_group_advantages_ops_match_reference_for_every_option(s, group_size, groups, scale, std_ddof, eps, ties):
    if scale == "std" and group_size - std_ddof < 1:
        group_size += 1
    g = torch.Generator().manual_seed(s)
    rewards = torch.randn(groups * group_size, generator=g)
    if ties:  # 0/1 rewards: groups with equal rewards have std 0, where only eps keeps A finite
        rewards = (rewards > 0).float()
    want = ref.group_advantages(rewards, group_size, scale=scale, std_ddof=std_ddof, eps=eps)
    got = ops.group_advantages(rewards, group_size, scale=scale, std_ddof=std_ddof, eps=eps)
    assert got.dtype == torch.float32
    assert_close_to_reference(got, want, dtype=torch.float32, name="group_advantages")


def test_group_advantages_hand_case_and_errors():
    # group [0, 1, 1, 0]: mean 0.5, population std 0.5 -> [-1, 1, 1, -1]; groups are contiguous
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    for fn in (ref.group_advantages, ops.group_advantages):
        got = fn(rewards, 4).double()
        torch.testing.assert_close(
            got, torch.tensor([-1.0, 1, 1, -1, 0, 0, 0, 0], dtype=torch.float64), atol=1e-7, rtol=0
        )
        with pytest.raises(ValueError, match="group_size"):
            fn(rewards, 3)
        with pytest.raises(ValueError, match="group_size"):
            fn(rewards[:1], 1, std_ddof=1)


def test_group_advantages_eps_hand_case():
    # group [0, 1, 1, 0]: std 0.5 (ddof 0) or 1/sqrt(3) (ddof 1); eps 0.5 is added to the std
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    signs = torch.tensor([-1.0, 1, 1, -1], dtype=torch.float64)
    for fn in (ref.group_advantages, ops.group_advantages):
        got = fn(rewards, 4, eps=0.5).double()
        torch.testing.assert_close(got, 0.5 * signs, atol=1e-7, rtol=0)
        got = fn(rewards, 4, std_ddof=1, eps=0.5).double()
        torch.testing.assert_close(got, 0.5 / (3**-0.5 + 0.5) * signs, atol=1e-7, rtol=0)
        got = fn(rewards, 4, scale="none", eps=0.5).double()  # no std, no eps
        torch.testing.assert_close(got, 0.5 * signs, atol=1e-7, rtol=0)


def test_value_loss_clip_hand_cases():
    v = torch.tensor([2.0, 0.2, 1.4], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    returns = torch.tensor([0.0, 1.5, 2.0], dtype=torch.float64)
    # clip 0.5: token 0: v_clip 1.5, max(4, 2.25) = 4; token 1: v_clip 0.5, max(1.69, 1) = 1.69
    # clip 0.2 on token 2: v_clip 1.2, max(0.36, 0.64) = 0.64: the clipped branch, flat in v
    for fn in (ref.value_loss, ops.value_loss):
        loss = fn(v[:2], old[:2], returns[:2], clip=0.5, loss_agg="sum")
        assert loss.item() == pytest.approx(0.5 * (4.0 + 1.69), abs=1e-6)
        loss = fn(v[2:], old[2:], returns[2:], clip=0.2, loss_agg="sum")
        assert loss.item() == pytest.approx(0.32, abs=1e-6)
        (grad,) = torch.autograd.grad(loss, v)
        assert grad[2].item() == 0.0
        # no clip: 0.5 (v - R)^2 = 0.5 * 0.36
        assert fn(v[2:], old[2:], returns[2:]).item() == pytest.approx(0.18, abs=1e-6)


@settings(max_examples=30)
@given(
    s=seeds,
    shape=st.sampled_from([(1, 1), (2, 5), (3, 4), (6,)]),
    clip=st.none() | st.floats(0.05, 1.0),
    loss_agg=st.sampled_from(LOSS_AGG_MODES + tuple(LOSS_AGG_ALIASES)),
    normalizer=st.none() | st.sampled_from([1.0, 7.0, 0.25, 64])
    | st.floats(0.1, 100.0).map(lambda x: torch.tensor(x, dtype=torch.float32)),
    data=st.data(),
)
def test_value_loss_ops_matches_reference(s, shape, clip, loss_agg, normalizer, data):
    g = torch.Generator().manual_seed(s)
    values = torch.randn(shape, generator=g, requires_grad=True)
    old = values.detach() + 0.5 * torch.randn(shape, generator=g)
    returns = torch.randn(shape, generator=g)
    mask = data.draw(masks(shape))
    want = ref.value_loss(values, old, returns, mask, clip=clip, loss_agg=loss_agg, normalizer=normalizer)
    got = ops.value_loss(values, old, returns, mask, clip=clip, loss_agg=loss_agg, normalizer=normalizer)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert_close_to_reference(got, want, dtype=torch.float32, name="value_loss")
    (want_grad,) = torch.autograd.grad(want, values)
    (grad,) = torch.autograd.grad(got, values)
    assert_close_to_reference(grad, want_grad, dtype=torch.float32, kind="grad", name="value_loss grad")
    if not bool(mask.any()):
        assert got.item() == 0.0 and bool((grad == 0).all())


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_value_loss_normalizer_replaces_the_divisor(loss_agg):
    # per-token 0.5 (v - R)^2 = [2, 0.845, 0.18 | 0.5, 0 (masked), 0.08]; the normalizer 4 replaces the
    # mode's divisor (token count 5, 2 sequences, B * T = 6, or 1)
    values = torch.tensor([[2.0, 0.2, 1.4], [1.0, 9.0, 0.3]], requires_grad=True)
    returns = torch.tensor([[0.0, 1.5, 2.0], [0.0, 0.0, -0.1]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    per_token = 0.5 * (values.detach().double() - returns.double()) ** 2 * mask
    sums = per_token.sum(dim=1)
    total = sums.sum() if loss_agg != "seq-mean-token-mean" else (sums / mask.sum(dim=1)).sum()
    for normalizer in (4.0, torch.tensor(4.0)):
        for fn in (ref.value_loss, ops.value_loss):
            loss = fn(values, values.detach(), returns, mask, loss_agg=loss_agg, normalizer=normalizer)
            assert loss.item() == pytest.approx(total.item() / 4.0, rel=1e-6)
            (grad,) = torch.autograd.grad(loss, values)
            scale = 1.0 if loss_agg != "seq-mean-token-mean" else 1.0 / mask.sum(dim=1, keepdim=True)
            want = (values.detach() - returns) * mask * scale / 4.0
            torch.testing.assert_close(grad.double(), want.double(), rtol=1e-6, atol=1e-7)


def test_value_loss_clips_below_as_well_as_above():
    # v 0.8 below old: v_clip = old - 0.5 = 0.5, and (0.5 - 0)^2 = 0.25 beats the unclipped 0.2^2.
    v = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    old, returns = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    for fn in (ref.value_loss, ops.value_loss):
        assert fn(v, old, returns, clip=0.5, loss_agg="sum").item() == pytest.approx(0.5 * 0.25, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_value_loss_is_float32_whatever_the_input_dtype(dtype):
    values = torch.tensor([[0.5, 1.5]], dtype=dtype, requires_grad=True)
    old, returns = torch.tensor([[1.0, 1.0]], dtype=dtype), torch.tensor([[0.0, 2.0]], dtype=dtype)
    loss = ops.value_loss(values, old, returns, clip=0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.value_loss(values.double(), old.double(), returns.double(),
                                                       clip=0.2).item(), rel=1e-2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(values=torch.zeros(2, 3, 4)), ValueError, r"values: expected shape \[B, T\] or \[N\], got \(2, 3, 4\)"),
        (dict(values=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "values: expected"),
        (dict(old_values=torch.zeros(2, 4)), ValueError,
         r"old_values: expected shape \(2, 3\) \(the shape of values\)"),
        (dict(returns=torch.zeros(3, 3)), ValueError, r"returns: expected shape \(2, 3\) \(the shape of values\)"),
        (dict(clip=0.0), ValueError, r"clip: expected a number > 0 or None, got 0.0"),
    ],
)
def test_value_loss_bad_inputs_name_the_argument(change, error, match):
    args = dict(values=torch.zeros(2, 3), old_values=torch.zeros(2, 3), returns=torch.zeros(2, 3))
    clip = change.pop("clip", None)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.value_loss(args["values"], args["old_values"], args["returns"], clip=clip)
