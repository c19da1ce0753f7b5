"""The seed's numpy functions equal the reference calls named in docs/design.md, "Seed functions"."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrl_kernels import reference as ref
from fastrl_kernels.ops import advantages as ops_adv
from fastrl_kernels.reference import seed

seeds = st.integers(0, 2**31 - 1)


def rng(s):
    return np.random.default_rng(s)


@settings(max_examples=40)
@given(
    s=seeds,
    shape=st.sampled_from([(1,), (7,), (40,), (3, 5)]),
    kl_coef=st.floats(0.0, 1.0),
    eps=st.floats(0.0, 0.5),
    entropy_coef=st.floats(0.0, 0.5),
)
def test_ppo_seed_equals_token_mean_clip_with_k1_to_old(s, shape, kl_coef, eps, entropy_coef):
    r = rng(s)
    old = -r.exponential(1.0, shape)
    new = old + 0.3 * r.standard_normal(shape)
    adv = r.standard_normal(shape)
    want = seed.ppo_loss_with_gae_entropy(old, new, adv, kl_coef, eps, entropy_coef)
    old_t, new_t, adv_t = (torch.from_numpy(a) for a in (old, new, adv))
    loss, _ = ref.policy_loss_from_logprobs(
        new_t, None, old_t, adv_t, ref_logprobs=old_t, kl_coef=kl_coef, kl_estimator="k1",
        entropy_coef=entropy_coef, entropy_mode="sampled", loss_agg="token-mean",
        clip_eps_low=eps, clip_eps_high=eps,
    )  # fmt: skip
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(max_examples=30)
@given(
    s=seeds,
    batch=st.integers(1, 4),
    length=st.integers(1, 6),
    vocab=st.integers(1, 20),
    beta=st.sampled_from([0.1, 0.5, 2.0]),
)
def test_dpo_seed_is_sigmoid_dpo_up_to_its_epsilon(s, batch, length, vocab, beta):
    r = rng(s)
    logits = [3.0 * r.standard_normal((batch, length, vocab)) for _ in range(4)]
    ids = [r.integers(0, vocab, (batch, length)) for _ in range(2)]
    masks = [(r.random((batch, length)) < 0.7).astype(np.float64) for _ in range(2)]
    got = seed.dpo_loss(
        *logits, beta, preferred_ids=ids[0], dispreferred_ids=ids[1],
        preferred_mask=masks[0], dispreferred_mask=masks[1],
    )  # fmt: skip

    def seq_logp(z, y, m):  # the reference core op, summed over the masked response
        logp, _ = ref.token_logprobs(torch.from_numpy(z), torch.from_numpy(y))
        return (logp * torch.from_numpy(m)).sum(-1)

    pc, pr = seq_logp(logits[0], ids[0], masks[0]), seq_logp(logits[1], ids[1], masks[1])
    rc, rr = seq_logp(logits[2], ids[0], masks[0]), seq_logp(logits[3], ids[1], masks[1])
    h = beta * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(got, -torch.log(torch.sigmoid(h) + 1e-8).numpy(), rtol=1e-10, atol=1e-12)
    # DPO "sigmoid" is -logsigmoid(h); the seed's + 1e-8 moves it by at most 1e-8 / sigmoid(h)
    exact = -torch.nn.functional.logsigmoid(h).numpy()
    assert bool((np.abs(got - exact) <= 1e-8 / torch.sigmoid(h).numpy() + 1e-12).all())


@settings(max_examples=40)
@given(s=seeds, group_size=st.integers(1, 8), groups=st.integers(1, 3), binary=st.booleans())
def test_grae_seed_equals_group_advantages_with_ddof_0(s, group_size, groups, binary):
    r = rng(s)
    rewards = (
        r.integers(0, 2, groups * group_size).astype(np.float64) if binary else r.standard_normal(groups * group_size)
    )
    want = np.concatenate([seed.grae_advantages(g) for g in rewards.reshape(groups, group_size)])
    got = ref.group_advantages(torch.from_numpy(rewards), group_size, std_ddof=0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    fast = ops_adv.group_advantages(torch.from_numpy(rewards).float(), group_size, std_ddof=0)
    assert fast.dtype == torch.float32
    # float32 rounding of rewards is amplified by 1 / (std + 1e-8) when a group is almost constant
    spread = rewards.reshape(groups, group_size).std(axis=1).min()
    if spread > 1e-3:
        np.testing.assert_allclose(fast.numpy(), want, rtol=1e-4, atol=1e-4)


@settings(max_examples=40)
@given(
    s=seeds,
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    kl_coef=st.floats(0.0, 1.0),
    eps=st.floats(0.0, 0.5),
)
def test_grpo_seed_equals_seq_mean_token_mean(s, lengths, kl_coef, eps):
    r = rng(s)
    old = [-r.exponential(1.0, n) for n in lengths]
    new = [o + 0.3 * r.standard_normal(len(o)) for o in old]
    adv = r.standard_normal(len(lengths))
    want = seed.grpo_loss(old, new, adv, kl_coef, eps)
    width = max(lengths)
    # padding holds garbage that the mask must hide
    old_t = torch.full((len(lengths), width), -1e4, dtype=torch.float64)
    new_t = torch.full((len(lengths), width), 3.0, dtype=torch.float64)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        old_t[i, :n], new_t[i, :n], mask[i, :n] = torch.from_numpy(old[i]), torch.from_numpy(new[i]), True
    loss, _ = ref.policy_loss_from_logprobs(
        new_t, None, old_t, torch.from_numpy(adv), mask, ref_logprobs=old_t, kl_coef=kl_coef,
        kl_estimator="k1", entropy_mode="sampled", loss_agg="seq-mean-token-mean",
        clip_eps_low=eps, clip_eps_high=eps,
    )  # fmt: skip
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_grpo_seed_with_one_logprob_per_response():
    # scalars per response (the seed's literal reading): the token mean is the identity
    old, new, adv = [np.log(1.0), np.log(1.0)], [np.log(1.5), np.log(0.5)], np.array([1.0, -2.0])
    # clip losses -1.2 and 1.6 (see test_reference); k1 = new - old = ln 1.5, ln 0.5; coef 0.1
    want = (-1.2 + 1.6 + 0.1 * (np.log(1.5) + np.log(0.5))) / 2
    assert seed.grpo_loss(old, new, adv, 0.1, 0.2) == pytest.approx(want, abs=1e-14)


def test_the_reference_package_loads_the_seed_module_on_first_use_only():
    import subprocess
    import sys

    code = ("import sys, fastrl_kernels.reference as r\n"
            "assert 'fastrl_kernels.reference.seed' not in sys.modules\n"
            "assert r.seed.sequence_logps is not None and 'fastrl_kernels.reference.seed' in sys.modules\n"
            "print('OK')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
