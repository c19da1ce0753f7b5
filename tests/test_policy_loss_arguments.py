"""policy_loss's argument checking (each error names the argument), TRL's aggregation names giving the
reference loss of their verl mode, and the op inside torch.compile."""

import dataclasses

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import reference
from fastrl_kernels.config import PolicyLossConfig
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends
from tests.test_policy_loss import RICH, _assert_loss_close, _case, _reference, _run

BACKENDS = cpu_fused_backends()


# ---------------------------------------------------------------------------------------------
# Argument checking and integration.


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(advantages=torch.zeros(3)), ValueError, r"advantages: expected shape \(2, 4\) per token or \(2,\)"),
        (dict(old_logprobs=torch.zeros(2, 3)), ValueError, r"old_logprobs: expected shape \(2, 4\)"),
        (dict(mask=torch.ones(2, 5)), ValueError, r"mask: expected shape \(2, 4\)"),
        (dict(kl_coef=0.1), ValueError, "ref_logprobs: required when kl_coef"),
        (dict(loss_type="ppo2"), ValueError, "loss_type: expected one of"),
        (dict(loss_agg="mean"), ValueError, "loss_agg: expected one of"),
        (dict(kl_estimator="k4", ref_logprobs=torch.zeros(2, 4)), ValueError, "kl_estimator"),
        (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low: expected a number >= 0"),
        (dict(bogus=1), TypeError, r"unknown option\(s\) \['bogus'\]"),
        (dict(old_logprobs=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "old_logprobs: expected dtype"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    args = dict(logits=torch.zeros(2, 4, 10), targets=torch.zeros(2, 4, dtype=torch.int64),
                old_logprobs=torch.zeros(2, 4), advantages=torch.zeros(2, 4), mask=None)
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(error, match=match):
        fk.policy_loss(*args.values(), backend="torch", **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias, canonical", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"),
                                              ("dapo", "token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")])
def test_trl_aggregation_names_give_the_reference_loss_of_their_verl_mode(backend, alias, canonical):
    assert PolicyLossConfig(loss_agg=alias).loss_agg == canonical
    inputs = _case(30)
    out, grad = _run(backend, inputs, dataclasses.replace(RICH, loss_agg=alias, entropy_agg=alias))
    expected = _reference(inputs, dataclasses.replace(RICH, loss_agg=canonical, entropy_agg=canonical))
    _assert_loss_close(out.loss, expected.loss, expected.loss_scale, dtype=torch.float32, name=f"{alias} loss")
    assert_close_to_reference(grad, expected.grad, dtype=torch.float32, kind="grad", name=f"{alias} grad",
                              row_scale=expected.scale)


def test_runs_inside_torch_compile_with_one_graph_break():
    """fullgraph=True is not supported (the fused Function differentiates a sub-graph in its forward);
    the op runs eagerly at a graph break and the rest of the compiled function around it still works."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 61, generator=g)
    args = (torch.randint(0, 61, (2, 5), generator=g), torch.randn(2, 5, generator=g) - 4, torch.randn(2, generator=g))
    config = fk.PolicyLossConfig(kl_coef=0.0, entropy_coef=0.01)

    def step(z):
        out = fk.policy_loss(z * 1.5, *args, config=config, backend="torch")
        return out.loss * 2.0

    compiled_z = logits.clone().requires_grad_(True)
    torch.compile(step, backend="eager")(compiled_z).backward()
    z64 = logits.double().requires_grad_(True)
    loss, *_ = reference.policy_loss(z64 * 1.5, *args, config=config)
    (loss * 2.0).backward()
    assert_close_to_reference(compiled_z.grad, z64.grad, dtype=torch.float32, kind="grad", name="compiled grad")


def test_without_a_backend_the_default_is_auto():
    # "auto" on a CPU tensor: the native backend when it builds, else torch (with a warning).
    g = torch.Generator().manual_seed(91)
    logits = torch.randn(2, 4, 30, generator=g)
    targets = torch.randint(0, 30, (2, 4), generator=g)
    old, adv = torch.full((2, 4), -3.0), torch.randn(2, generator=g)
    implicit = fk.policy_loss(logits, targets, old, adv)
    explicit = fk.policy_loss(logits, targets, old, adv, backend="auto")
    assert torch.equal(implicit.loss, explicit.loss) and torch.equal(implicit.logprobs, explicit.logprobs)
    logp, entropy = fk.token_logprobs(logits, targets)
    assert torch.equal(logp, fk.token_logprobs(logits, targets, backend="auto")[0])
