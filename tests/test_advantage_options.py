"""gae, masked_whiten, group_advantages and value_loss: option defaults, hand-derived option values,
input and output dtypes, the default dtype / device not leaking in, and errors naming the argument."""

import pytest
import torch

from fastrl_kernels import reference as ref
from fastrl_kernels.ops import advantages as ops
from fastrl_kernels.testing import assert_close_to_reference

GAES = [pytest.param(ref.gae, id="reference"), pytest.param(ops.gae, id="ops")]
GROUP_ADVANTAGES = [pytest.param(ref.group_advantages, id="reference"), pytest.param(ops.group_advantages, id="ops")]
VALUE_LOSSES = [pytest.param(ref.value_loss, id="reference"), pytest.param(ops.value_loss, id="ops")]


def _gae_inputs():
    g = torch.Generator().manual_seed(1234)
    rewards = torch.randn(3, 7, generator=g, dtype=torch.float64)
    values = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool
    )
    return rewards, values, mask


def _reward_to_go(rewards, mask):
    """sum of the rewards of the unmasked steps s >= t (0 at masked t), one scalar at a time."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        total = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                total += float(rewards[b, t])
                out[b, t] = total
    return out



# --- gae ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gae", GAES)
def test_gae_gamma_and_lam_default_to_one(gae):
    """Without gamma / lam, A_t = (sum of unmasked rewards from t on) - V_t: undiscounted Monte Carlo."""
    rewards, values, mask = _gae_inputs()
    if gae is ops.gae:
        rewards, values = rewards.float(), values.float()
    default_adv, default_ret = gae(rewards, values, mask)
    explicit_adv, explicit_ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.equal(default_adv, explicit_adv) and torch.equal(default_ret, explicit_ret)
    to_go = _reward_to_go(rewards.double(), mask)
    want_adv = torch.where(mask, to_go - values.double(), torch.zeros_like(to_go))
    want_ret = torch.where(mask, to_go, values.double())
    for got, want in ((default_adv, want_adv), (default_ret, want_ret)):
        if gae is ops.gae:
            assert_close_to_reference(got, want, dtype=torch.float32, name="gae default gamma / lam")
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gae", GAES)
def test_gae_gamma_and_lam_only_one_given(gae):
    """gamma alone keeps lam = 1 and lam alone keeps gamma = 1 (hand case, all steps unmasked)."""
    # rewards [1, 2], values [0.5, 4]. gamma 0.5, lam 1: A_1 = 2 - 4 = -2, A_0 = 1 + 0.5 * 4 - 0.5 + 0.5 * -2 = 1.5
    # gamma 1, lam 0.5: A_1 = -2, A_0 = 1 + 4 - 0.5 + 0.5 * -2 = 3.5
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.5, 4.0]])
    adv, _ = gae(rewards, values, None, gamma=0.5)
    torch.testing.assert_close(adv.double(), torch.tensor([[1.5, -2.0]], dtype=torch.float64))
    adv, _ = gae(rewards, values, None, lam=0.5)
    torch.testing.assert_close(adv.double(), torch.tensor([[3.5, -2.0]], dtype=torch.float64))


@pytest.mark.parametrize("gae", GAES)
def test_gae_lam_zero_is_the_one_step_td_error(gae):
    """lam = 0: A_t = r_t + gamma V_next - V_t, V_next the value of the next unmasked step (0 after the last)."""
    rewards, values, mask = _gae_inputs()
    gamma = 0.9
    want = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                want[b, t] = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
                next_value = float(values[b, t])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret.double(), torch.where(mask, want + values, values), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gae", GAES)
def test_gae_gamma_zero_is_reward_minus_value(gae):
    """gamma = 0 (any lam): A_t = r_t - V_t at unmasked steps, returns = r_t there."""
    rewards, values, mask = _gae_inputs()
    adv, ret = gae(rewards, values, mask, gamma=0.0, lam=0.7)
    torch.testing.assert_close(adv.double(), torch.where(mask, rewards - values, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ret.double(), torch.where(mask, rewards, values), rtol=1e-6, atol=1e-6)


def test_gae_reference_is_float64_for_float32_and_bf16_inputs():
    rewards, values, mask = _gae_inputs()
    for dtype in (torch.float32, torch.bfloat16):
        r, v = rewards.to(dtype), values.to(dtype)
        exact_adv, exact_ret = ref.gae(r.double(), v.double(), mask, gamma=0.9, lam=0.8, whiten=True)
        adv, ret = ref.gae(r, v, mask, gamma=0.9, lam=0.8, whiten=True)
        assert adv.dtype == ret.dtype == torch.float64
        torch.testing.assert_close(adv, exact_adv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret, exact_ret, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_ops_is_float32_for_float64_inputs(whiten):
    rewards, values, mask = _gae_inputs()
    adv, ret = ops.gae(rewards, values, mask, gamma=0.95, lam=0.9, whiten=whiten)
    assert adv.dtype == ret.dtype == torch.float32
    assert adv.shape == ret.shape == rewards.shape
    want_adv, want_ret = ref.gae(rewards, values, mask, gamma=0.95, lam=0.9, whiten=whiten)
    assert_close_to_reference(adv, want_adv, dtype=torch.float32, name="gae advantages")
    assert_close_to_reference(ret, want_ret, dtype=torch.float32, name="gae returns")


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("gae", GAES)
def test_gae_is_independent_of_the_default_dtype(gae, with_mask, whiten, float64_default):
    rewards, values, mask = _gae_inputs()
    mask = mask if with_mask else None
    rewards, values = rewards.float(), values.float()
    want_dtype = torch.float64 if gae is ref.gae else torch.float32
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=whiten)
    torch.set_default_dtype(torch.float32)
    want_adv, want_ret = gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=whiten)
    assert adv.dtype == ret.dtype == want_adv.dtype == want_dtype
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("gae", GAES)
def test_gae_buffers_are_made_on_the_inputs_device(gae, with_mask, whiten):
    """With another default device (meta stands in for cuda), CPU inputs give the same CPU results."""
    rewards, values, mask = _gae_inputs()
    mask = mask if with_mask else None
    want_adv, want_ret = gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=whiten)
    torch.set_default_device("meta")
    try:
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=whiten)
    finally:
        torch.set_default_device(None)
    assert adv.device.type == ret.device.type == "cpu"
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)


@pytest.mark.parametrize(
    "rewards, values, error, match",
    [
        (torch.zeros(3), torch.zeros(3), ValueError, r"^rewards: expected shape \[B, T\], got \(3,\)$"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3), TypeError, r"^rewards: expected dtype"),
        ([[0.0, 1.0]], torch.zeros(1, 2), TypeError, r"^rewards: expected a torch.Tensor, got list$"),
        (torch.zeros(2, 3), torch.zeros(2, 4), ValueError,
         r"^values: expected shape \(2, 3\) \(the shape of rewards\), got \(2, 4\)$"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), TypeError, r"^values: expected dtype"),
    ],
)
def test_gae_bad_inputs_name_the_argument(rewards, values, error, match):
    with pytest.raises(error, match=match):
        ops.gae(rewards, values, None)


# --- masked_whiten -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_whiten_computes_in_float64_whatever_the_input_dtype(dtype):
    g = torch.Generator().manual_seed(7)
    values = (3.0 + torch.randn(4, 9, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(4, 9, generator=g) < 0.7
    got = ref.masked_whiten(values, mask)
    assert got.dtype == torch.float64
    kept = values.double()[mask]
    want = torch.where(mask, (values.double() - kept.mean()) / torch.sqrt(kept.var() + 1e-8), 0.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16, torch.float16])
def test_masked_whiten_counts_every_unmasked_entry_whatever_the_mask_dtype(mask_dtype):
    """2,051 unmasked entries: more than bf16 / fp16 can count exactly, still mean and variance over all."""
    g = torch.Generator().manual_seed(11)
    values = torch.randn(2060, generator=g, dtype=torch.float64) + 1.0
    mask = torch.ones(2060, dtype=torch.bool)
    mask[[3, 100, 500, 900, 1500, 1800, 2000, 2050, 2059]] = False
    kept = values[mask]
    assert kept.numel() == 2051
    want = torch.where(mask, (values - kept.mean()) / torch.sqrt(kept.var() + 1e-8), 0.0)
    got = ref.masked_whiten(values, mask.to(mask_dtype))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- group_advantages --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", GROUP_ADVANTAGES)
def test_group_advantages_option_defaults(fn):
    """Defaults: scale='std', std_ddof=0 (population std), eps=1e-8."""
    rewards = torch.tensor([0.0, 1.0, 3.0, 4.0, 2.0, 2.0, 5.0, -1.0], dtype=torch.float64)
    want = fn(rewards, 4, scale="std", std_ddof=0, eps=1e-8)
    torch.testing.assert_close(fn(rewards, 4), want, rtol=0, atol=0)
    # group [0, 1, 3, 4]: mean 2, population std sqrt(2.5)
    torch.testing.assert_close(
        want[:4].double(), torch.tensor([-2.0, -1, 1, 2], dtype=torch.float64) / (2.5**0.5 + 1e-8), rtol=1e-6, atol=0
    )


def test_group_advantages_reference_is_float64_for_float32_inputs():
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.9, 0.2, 0.2, 0.5, -1.3])
    for scale in ("std", "none"):
        got = ref.group_advantages(rewards, 4, scale=scale, std_ddof=1)
        assert got.dtype == torch.float64
        want = ref.group_advantages(rewards.double(), 4, scale=scale, std_ddof=1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_ops_is_float32_for_float64_inputs(scale):
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.9, 0.2, 0.2], dtype=torch.float64)
    got = ops.group_advantages(rewards, 3, scale=scale)
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert_close_to_reference(got, ref.group_advantages(rewards, 3, scale=scale), dtype=torch.float32,
                              name="group_advantages")


@pytest.mark.parametrize("fn", GROUP_ADVANTAGES)
@pytest.mark.parametrize("group_size", [0, -1, -2, 3, 5])
def test_group_advantages_group_size_must_divide_the_batch(fn, group_size):
    with pytest.raises(ValueError, match=rf"^group_size: expected a divisor of the batch size 4, got {group_size}$"):
        fn(torch.zeros(4), group_size)


def test_group_advantages_group_size_must_be_an_int():
    with pytest.raises(ValueError, match=r"^group_size: expected a divisor of the batch size 4, got 2.0$"):
        ops.group_advantages(torch.zeros(4), 2.0)


@pytest.mark.parametrize("fn", GROUP_ADVANTAGES)
def test_group_advantages_bad_shape_and_scale_name_the_argument(fn):
    with pytest.raises(ValueError, match=r"^rewards: expected shape \[B\], got \(2, 2\)$"):
        fn(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"^scale: expected 'std' or 'none', got 'mean'$"):
        fn(torch.zeros(4), 2, scale="mean")


@pytest.mark.parametrize("rewards", [torch.zeros(4, dtype=torch.int64), [0.0, 1.0, 0.0, 1.0]])
def test_group_advantages_rewards_must_be_a_float_tensor(rewards):
    with pytest.raises(TypeError, match=r"^rewards: expected "):
        ops.group_advantages(rewards, 2)


# --- value_loss --------------------------------------------------------------------------------


def _value_inputs(dtype=torch.float32):
    values = torch.tensor([[2.0, 0.2, 1.4], [1.0, 9.0, 0.3]], dtype=dtype)
    old = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 1.0]], dtype=dtype)
    returns = torch.tensor([[0.0, 1.5, 2.0], [0.0, 0.0, -0.1]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    return values, old, returns, mask


@pytest.mark.parametrize("fn", VALUE_LOSSES)
def test_value_loss_clip_hand_case_in_both_directions(fn):
    """clip 0.3: per token 0.5 max((v - R)^2, (v_old + clamp(v - v_old, -0.3, 0.3) - R)^2), token-mean."""
    values, old, returns, mask = _value_inputs()
    values.requires_grad_(True)
    # row 0: v_clip [1.3, 0.7, 1.3]: max(4, 1.69) = 4, max(1.69, 0.64) = 1.69, max(0.36, 0.49) = 0.49 (clipped)
    # row 1: v_clip [0.8, -, 0.7]: max(1, 0.64) = 1, masked, max(0.16, 0.64) = 0.64 (clipped, from below)
    per_token = torch.tensor([[4.0, 1.69, 0.49], [1.0, 0.0, 0.64]], dtype=torch.float64)
    loss = fn(values, old, returns, mask, clip=0.3)
    assert loss.item() == pytest.approx(0.5 * per_token.sum().item() / 5, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, values)
    # the clipped branch is flat in v: tokens (0, 2), (1, 2) and the masked one get no gradient
    want = torch.tensor([[2.0, -1.3, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64) / 5
    torch.testing.assert_close(grad.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", VALUE_LOSSES)
def test_value_loss_option_defaults(fn):
    """No mask, clip=None, loss_agg='token-mean' and no normalizer: 0.5 mean (v - R)^2 over every token."""
    values, old, returns, _ = _value_inputs()
    got = fn(values, old, returns)
    explicit = fn(values, old, returns, None, clip=None, loss_agg="token-mean", normalizer=None)
    assert got.item() == explicit.item()
    want = 0.5 * ((values.double() - returns.double()) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("normalizer", [2.5, 10, torch.tensor(0.5)])
@pytest.mark.parametrize("fn", VALUE_LOSSES)
def test_value_loss_normalizer_with_clip(fn, normalizer):
    values, old, returns, mask = _value_inputs()
    per_token_sum = 0.5 * (4.0 + 1.69 + 0.49 + 1.0 + 0.64)
    got = fn(values, old, returns, mask, clip=0.3, loss_agg="token-mean", normalizer=normalizer)
    assert got.item() == pytest.approx(per_token_sum / float(normalizer), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("which", ["values", "old_values", "returns"])
def test_value_loss_ops_is_float32_when_any_input_is_another_dtype(which, dtype):
    values, old, returns, mask = _value_inputs()
    args = dict(values=values, old_values=old, returns=returns)
    args[which] = args[which].to(dtype)
    got = ops.value_loss(args["values"], args["old_values"], args["returns"], mask, clip=0.3)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = ref.value_loss(*(args[k].double() for k in ("values", "old_values", "returns")), mask, clip=0.3)
    assert_close_to_reference(got, want, dtype=torch.float32, name="value_loss")


@pytest.mark.parametrize("fn", VALUE_LOSSES)
def test_value_loss_is_independent_of_the_default_dtype(fn, float64_default):
    values, old, returns, mask = _value_inputs()
    got = fn(values, old, returns, mask, clip=0.3, loss_agg="seq-mean-token-mean")
    torch.set_default_dtype(torch.float32)
    want = fn(values, old, returns, mask, clip=0.3, loss_agg="seq-mean-token-mean")
    assert got.dtype == want.dtype == (torch.float64 if fn is ref.value_loss else torch.float32)
    assert got.item() == want.item()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(values=[[0.0, 0.0, 0.0]] * 2), TypeError, r"^values: expected a torch.Tensor, got list$"),
        (dict(values=torch.zeros(2, 3, dtype=torch.int32)), TypeError, r"^values: expected dtype"),
        (dict(values=torch.zeros(2, 3, 1)), ValueError, r"^values: expected shape \[B, T\] or \[N\], got \(2, 3, 1\)$"),
        (dict(old_values=torch.zeros(3, 2)), ValueError,
         r"^old_values: expected shape \(2, 3\) \(the shape of values\), got \(3, 2\)$"),
        (dict(returns=torch.zeros(2, 4)), ValueError,
         r"^returns: expected shape \(2, 3\) \(the shape of values\), got \(2, 4\)$"),
        (dict(clip=-0.1), ValueError, r"^clip: expected a number > 0 or None, got -0.1$"),
        (dict(clip=0), ValueError, r"^clip: expected a number > 0 or None, got 0$"),
    ],
)
def test_value_loss_bad_inputs_name_the_argument_with_no_clip(change, error, match):
    args = dict(values=torch.zeros(2, 3), old_values=torch.zeros(2, 3), returns=torch.zeros(2, 3), clip=None)
    args.update(change)
    with pytest.raises(error, match=match):
        ops.value_loss(args["values"], args["old_values"], args["returns"], clip=args["clip"])
