"""Input checks of the lm_head ops, message by message, and the choices they make from the inputs: the
chunk size from the hidden dtype, the stats-only route when nothing requires a gradient; the target range
check, which reads the targets on the host, stays off while torch.compile traces."""

from __future__ import annotations

import re

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import config as checks
from fastrl_kernels.ops import linear_chunks
from fastrl_kernels.ops.linear import count_gemms
from tests.test_linear import _problem


def _inputs():
    return _problem((4,), 6, 23, seed=81)


def _refused(error, message, *args, **kwargs):
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        fk.linear_token_logprobs(*args, backend="torch", **kwargs)


def test_hidden_checks_name_hidden():
    hidden, weight, bias, targets = _inputs()
    _refused(TypeError, "hidden: expected dtype in", hidden.long(), weight, targets)
    _refused(ValueError, "hidden: expected shape [N, H] or [B, T, H], got (1, 1, 4, 6)",
             hidden.view(1, 1, 4, 6), weight, targets.view(1, 1, 4))


def test_weight_checks_name_weight_and_give_h():
    hidden, weight, bias, targets = _inputs()
    _refused(TypeError, "weight: expected dtype in ['torch.float32'], got torch.float64", hidden, weight.double(),
             targets)
    _refused(ValueError, "weight: expected shape [V, 6] (V >= 1, H of hidden), got (23, 5)", hidden, weight[:, :5],
             targets)
    _refused(ValueError, "weight: expected shape [V, 6] (V >= 1, H of hidden), got (0, 6)", hidden, weight[:0],
             targets.clamp(max=-100))


def test_bias_checks_name_bias_and_need_the_hidden_dtype():
    hidden, weight, bias, targets = _inputs()
    _refused(TypeError, "bias: expected dtype in ['torch.float32'], got torch.float64", hidden, weight, targets,
             bias=bias.double())
    _refused(ValueError, "bias: ", hidden, weight, targets, bias=bias[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunk_size_follows_the_hidden_dtype(dtype):
    hidden, weight, bias, targets = _problem((700,), 4, 60000, seed=82, dtype=dtype)
    with count_gemms() as counter:
        fk.linear_token_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    expected = linear_chunks.choose_chunk_size(700, 60000, dtype, hidden.device)
    assert counter.chunk_sizes == [expected]
    assert expected < 700  # more than one chunk, so the size is the rule's and not the row count


def test_nothing_requiring_grad_takes_the_stats_only_route_in_grad_mode():
    # Grad mode on, no input requiring grad (and no bias: None is not a tensor): one GEMM per chunk.
    hidden, weight, _, targets = _inputs()
    assert torch.is_grad_enabled()
    with count_gemms() as counter:
        out = fk.linear_policy_loss(hidden.view(2, 2, 6), weight, targets.view(2, 2), torch.full((2, 2), -3.0),
                                    torch.ones(2), backend="torch", chunk_size=2)
    assert counter.routes == ["stats"] and counter.total == 2
    assert not out.loss.requires_grad


def test_bias_and_targets_messages_in_full():
    hidden, weight, bias, targets = _inputs()
    _refused(ValueError, "bias: expected shape (23,) ([V], the rows of weight), got (3,)", hidden, weight, targets,
             bias=bias[:3])
    _refused(TypeError, "targets: expected dtype torch.int64, got torch.int32", hidden, weight, targets.int())
    _refused(TypeError, "targets: expected an int64 torch.Tensor, got list", hidden, weight, [1, 2, 3, 4])
    _refused(ValueError, "targets: expected shape (4,) (the leading shape of hidden), got (3,)", hidden, weight,
             targets[:3])


@pytest.mark.parametrize("rows", [1, 4])
def test_a_target_equal_to_v_is_refused_with_its_value(rows):
    # V itself is the first value out of range; one bad target among `rows` (a single row is checked too).
    hidden, weight, bias, _ = _inputs()
    targets = torch.tensor([1, 2, 23, 5][:rows] if rows > 1 else [23])
    _refused(ValueError, "targets: expected values in [0, 23) or ignore_index=-100, got 23", hidden[:rows], weight,
             targets)


@pytest.mark.parametrize("name", ["weight", "bias", "targets"])
def test_an_input_on_another_device_is_refused_by_name(name):
    # meta stands in for a GPU: each of weight, bias and targets must be on hidden's device.
    hidden, weight, bias, targets = _inputs()
    args = dict(weight=weight, bias=bias, targets=targets)
    args[name] = args[name].to("meta")
    _refused(ValueError, f"{name}: expected a tensor on cpu like hidden, got meta", hidden, args["weight"],
             args["targets"], bias=args["bias"])


@pytest.mark.parametrize("check", ["linear", "logits"])
def test_target_range_check_is_off_while_tracing(check):
    hidden, weight = torch.randn(4, 8), torch.randn(31, 8)
    targets = torch.tensor([0, 5, 99, -100])  # 99 is out of range: refused eagerly on CPU

    def run(h, w, t):
        if check == "linear":
            checks.check_linear_inputs(h, w, None, t, -100)
        else:
            checks.check_logits_targets(h @ w.t(), t, -100)
        return h.sum()

    with pytest.raises(ValueError, match=r"^targets: expected values in \[0, 31\) or ignore_index=-100, got 99"):
        run(hidden, weight, targets)
    torch._dynamo.reset()
    # a host read of the targets would be a data-dependent branch, which fullgraph=True refuses
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(hidden, weight, targets), hidden.sum())
