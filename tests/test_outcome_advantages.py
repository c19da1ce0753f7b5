"""outcome_advantages: each estimator equal to verl 0.9.1's function of the same name, and to the float64 twin.

verl is imported as in tests/test_integration_verl.py (stand-ins for ray and orjson when absent); the
verl tests skip when verl is not importable, the reference and refusal tests run anyway.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.ops import outcome_advantages as ops
from fastrl_kernels.reference import outcome_advantages as ref
from tests.verl_import import import_core_algos

ESTIMATORS = sorted(ops.ESTIMATORS)
# Ids in no order, uneven groups: 7 has one row, 3 has equal rewards (see _batch), 11 has four.
INDEX = [5, 3, 11, 5, 7, 3, 11, 11, 3, 5, 11, 2, 2]


@pytest.fixture(scope="module")
def core_algos():
    return import_core_algos()


def _batch(seed=0, index=INDEX, length=6):
    """Outcome rewards on each row's last unmasked token; the rows of group 3 share one reward."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(index)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    scores = torch.randn(batch, generator=gen)
    plain = torch.tensor(index) == 3
    scores[plain] = 0.5
    plain[0] = True
    scores[0] = 0.0  # gpg counts the nonzero scores
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), lengths - 1] = scores
    # Some per-token reward too, except on the rows whose score must stay exact.
    rewards += 0.1 * torch.randn(batch, length, generator=gen) * mask * (~plain).float()[:, None]
    baselines = torch.randn(batch, generator=gen)
    return rewards, mask, torch.tensor(index), baselines


def _ours(estimator, rewards, mask, index, baselines, **options):
    if estimator in ("reinforce_plus_plus", "remax"):
        index = None
    if estimator == "remax":
        options["reward_baselines"] = baselines
    return fk.outcome_advantages(rewards, mask, estimator=estimator, index=index, **options)


def _verl(core_algos, estimator, rewards, mask, index, baselines, *, norm=True, gamma=1.0):
    fn = core_algos.get_adv_estimator_fn(estimator)
    config = {"gamma": gamma, "norm_adv_by_std_in_grpo": norm}
    if estimator == "reinforce_plus_plus":
        config = types.SimpleNamespace(gamma=gamma)
    kwargs = dict(token_level_rewards=rewards.clone(), response_mask=mask.clone(), config=config)
    if estimator == "remax":
        kwargs["reward_baselines"] = baselines.clone()
    elif estimator != "reinforce_plus_plus":
        kwargs["index"] = np.asarray(index.tolist())
    if estimator == "grpo":
        kwargs["norm_adv_by_std_in_grpo"] = norm
    return fn(**kwargs)


def _cases():
    cases = [(name, {}) for name in ESTIMATORS]
    cases += [("grpo", {"norm_adv_by_std": False}), ("grpo_passk", {"norm_adv_by_std": False})]
    return cases + [("reinforce_plus_plus", {"gamma": 0.9})]


def _index_for(estimator):
    # grpo_passk needs two rows in every group: the single row 7 joins group 5.
    return [5 if i == 7 else i for i in INDEX] if estimator == "grpo_passk" else INDEX


@pytest.mark.parametrize("estimator, options", _cases(), ids=lambda x: str(x) if x else "")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_verl(core_algos, estimator, options, seed):
    rewards, mask, index, baselines = _batch(seed, _index_for(estimator))
    want_adv, want_ret = _verl(core_algos, estimator, rewards, mask, index, baselines,
                               norm=options.get("norm_adv_by_std", True), gamma=options.get("gamma", 1.0))
    adv, ret = _ours(estimator, rewards, mask, index, baselines, **options)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == rewards.shape
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    torch.testing.assert_close(adv, want_adv.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, want_ret.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator, options", _cases(), ids=lambda x: str(x) if x else "")
@pytest.mark.parametrize("seed", [0, 3])
def test_matches_reference(estimator, options, seed):
    rewards, mask, index, baselines = _batch(seed, _index_for(estimator))
    adv, ret = _ours(estimator, rewards, mask, index, baselines, **options)
    if estimator == "remax":
        options = {**options, "reward_baselines": baselines}
    grouped = estimator not in ("reinforce_plus_plus", "remax")
    want_adv, want_ret = ref.outcome_advantages(rewards.double(), mask, estimator=estimator,
                                                index=index if grouped else None, **options)
    assert want_adv.dtype == torch.float64
    torch.testing.assert_close(adv.double(), want_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret.double(), want_ret, rtol=1e-5, atol=1e-6)


def test_registries_have_the_same_names():
    assert set(ops.ESTIMATORS) == set(ref.ESTIMATORS)


@pytest.mark.parametrize("estimator", sorted(ops.GROUPED))
def test_group_size_equals_index(estimator):
    rewards, mask, _, baselines = _batch(4, [0] * 8)
    index = torch.arange(8) // 4 * 10 + 3  # contiguous groups of four, arbitrary ids
    by_index = fk.outcome_advantages(rewards, mask, estimator=estimator, index=index)
    by_size = fk.outcome_advantages(rewards, mask, estimator=estimator, group_size=4)
    for a, b in zip(by_index, by_size):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grpo_batch_std_divides_by_the_batch_std():
    rewards, mask, index, _ = _batch(5)
    adv, _ = fk.outcome_advantages(rewards, mask, index=index, std_scope="batch", epsilon=1e-4)
    centred, _ = fk.outcome_advantages(rewards, mask, index=index, norm_adv_by_std=False)
    torch.testing.assert_close(adv, centred / (rewards.sum(-1).std() + 1e-4), rtol=1e-6, atol=1e-7)
    want, _ = ref.outcome_advantages(rewards, mask, index=index, std_scope="batch", epsilon=1e-4)
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-6)
    # TRL's scale_rewards="batch" on contiguous groups: (r - group mean) / (std of all r + 1e-4).
    scores = rewards[:12].sum(-1)
    trl = (scores - scores.view(-1, 4).mean(1).repeat_interleave(4)) / (scores.std() + 1e-4)
    adv, _ = fk.outcome_advantages(rewards[:12], mask[:12], group_size=4, std_scope="batch", epsilon=1e-4)
    torch.testing.assert_close(adv, trl[:, None] * mask[:12], rtol=1e-5, atol=1e-6)
    one, _ = fk.outcome_advantages(rewards[:1], mask[:1], group_size=1, std_scope="batch")
    assert torch.isfinite(one).all()


def test_equal_rewards_and_single_rows_give_finite_values():
    rewards = torch.zeros(5, 3)
    rewards[:, -1] = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0])
    index = torch.tensor([0, 0, 0, 1, 2])
    for estimator in ESTIMATORS:
        idx = index if estimator in ops.GROUPED else None
        extra = {"reward_baselines": torch.zeros(5)} if estimator == "remax" else {}
        if estimator == "grpo_passk":
            idx = torch.tensor([0, 0, 0, 1, 1])
        adv, ret = fk.outcome_advantages(rewards, None, estimator=estimator, index=idx, **extra)
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), estimator
    adv, _ = fk.outcome_advantages(rewards, None, index=index)
    assert (adv[:3] == 0).all()


@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_empty_batches_give_empty_results(estimator, shape):
    extra = {"reward_baselines": torch.zeros(shape[0])} if estimator == "remax" else {}
    if estimator in ops.GROUPED:
        extra["index"] = torch.zeros(shape[0], dtype=torch.int64)
    adv, ret = fk.outcome_advantages(torch.zeros(shape), None, estimator=estimator, **extra)
    assert adv.shape == ret.shape == shape


def test_dense_groups_numbers_sorted_ids():
    got = ops.dense_groups(torch.tensor([9, -2, 9, 4, -2]))
    assert got.tolist() == [2, 0, 2, 1, 0]


@pytest.mark.parametrize("kwargs, exc, names", [
    ({"rewards": torch.zeros(4)}, ValueError, "rewards"),
    ({"rewards": torch.zeros(4, 3, dtype=torch.int64)}, TypeError, "rewards"),
    ({"mask": torch.ones(4, 2)}, ValueError, "mask"),
    ({"estimator": "ppo"}, ValueError, "estimator"),
    ({"index": torch.tensor([0, 0, 1])}, ValueError, "index"),
    ({"index": torch.tensor([0.0, 0.0, 1.0, 1.0])}, TypeError, "index"),
    ({"index": [0, 0, 1, 1]}, TypeError, "index"),
    ({"index": None, "group_size": 3}, ValueError, "group_size"),
    ({"index": None}, ValueError, "index, group_size"),
    ({"group_size": 2}, ValueError, "index, group_size"),
    ({"epsilon": 0.0}, ValueError, "epsilon"),
    ({"gamma": 1.5}, ValueError, "gamma"),
    ({"std_scope": "token"}, ValueError, "std_scope"),
    ({"std_scope": "batch", "estimator": "rloo"}, ValueError, "std_scope"),
    ({"reward_baselines": torch.zeros(4)}, ValueError, "reward_baselines"),
    ({"estimator": "remax", "index": None}, TypeError, "reward_baselines"),
    ({"estimator": "remax", "index": None, "reward_baselines": torch.zeros(3)}, ValueError, "reward_baselines"),
    ({"estimator": "remax"}, ValueError, "index, group_size"),
    ({"estimator": "grpo_passk", "index": torch.tensor([0, 0, 0, 1])}, ValueError, "index, group_size"),
])
def test_bad_inputs_are_refused_by_name(kwargs, exc, names):
    args = {"rewards": torch.zeros(4, 3), "mask": None, "index": torch.tensor([0, 0, 1, 1]), **kwargs}
    if kwargs.get("estimator") == "remax" and "reward_baselines" not in kwargs and args["index"] is not None:
        args["reward_baselines"] = torch.zeros(4)
    with pytest.raises(exc, match=names):
        fk.outcome_advantages(args.pop("rewards"), args.pop("mask"), **args)
