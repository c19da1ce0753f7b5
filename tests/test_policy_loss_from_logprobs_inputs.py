"""policy_loss_from_logprobs refuses bad input by name, describing shapes in terms of logp (the tensor
its caller passed), and a normalizer that would broadcast is refused on every entry point."""

from __future__ import annotations

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.ops.policy_loss import policy_loss_from_logprobs

B, T = 3, 5
FLOATS = r"\['torch.float32', 'torch.bfloat16', 'torch.float16', 'torch.float64'\]"


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(logp=-torch.rand(B, T, generator=g), entropy=torch.rand(B, T, generator=g),
                old=-torch.rand(B, T, generator=g), adv=torch.randn(B, generator=g), ref=-torch.rand(B, T, generator=g))


def _call(x, **kw):
    return policy_loss_from_logprobs(x["logp"], x["entropy"], x["old"], x["adv"], **kw)


BAD = {
    "logp int": (TypeError, rf"^logp: expected dtype in {FLOATS}, got torch.int64$",
                 lambda x: x.update(logp=x["logp"].long())),
    "logp 3-d": (ValueError, r"^logp: expected shape \[B, T\] or \[N\], got \(1, 3, 5\)$",
                 lambda x: x.update(logp=x["logp"][None])),
    "entropy int": (TypeError, rf"^entropy: expected dtype in {FLOATS}, got torch.int64$",
                    lambda x: x.update(entropy=x["entropy"].long())),
    "entropy shape": (ValueError, r"^entropy: expected shape \(3, 5\) \(the shape of logp\), got \(3, 4\)$",
                      lambda x: x.update(entropy=x["entropy"][:, :4])),
    "entropy device": (ValueError, r"^entropy: expected a tensor on cpu like logp, got meta$",
                       lambda x: x.update(entropy=torch.empty(B, T, device="meta"))),
    "old_logprobs int": (TypeError, rf"^old_logprobs: expected dtype in {FLOATS}, got torch.int64$",
                         lambda x: x.update(old=x["old"].long())),
    "old_logprobs shape": (ValueError, r"^old_logprobs: expected shape \(3, 5\) \(the shape of logp\), got \(3, 4\)$",
                           lambda x: x.update(old=x["old"][:, :4])),
    "advantages shape": (ValueError,
                         r"^advantages: expected shape \(3, 5\) per token or \(3,\) per sequence, got \(4,\)$",
                         lambda x: x.update(adv=torch.randn(B + 1))),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_input_is_refused_by_name(case):
    error, message, spoil = BAD[case]
    x = _inputs()
    spoil(x)
    with pytest.raises(error, match=message):
        _call(x)


@pytest.mark.parametrize("arg", ["ref_logprobs", "is_weights", "mask"])
def test_optional_inputs_of_the_wrong_shape_are_described_against_logp(arg):
    x = _inputs()
    wrong = torch.ones(B, T + 1)
    kw = {"ref_logprobs": x["ref"], "kl_coef": 0.1, arg: wrong}
    with pytest.raises(ValueError, match=rf"^{arg}: expected shape \(3, 5\) \(the shape of logp\), got \(3, 6\)$"):
        _call(x, **kw)


def test_missing_entropy_and_missing_reference_say_what_to_pass():
    x = _inputs()
    with pytest.raises(ValueError, match=r"^entropy: required when entropy_mode='exact'; pass it or use "):
        policy_loss_from_logprobs(x["logp"], None, x["old"], x["adv"])
    with pytest.raises(ValueError, match=r"^ref_logprobs: required when kl_coef != 0 \(kl_coef=0.1\), got None$"):
        _call(x, kl_coef=0.1)
    loss, _ = policy_loss_from_logprobs(x["logp"], None, x["old"], x["adv"], entropy_mode="sampled")
    assert torch.isfinite(loss)


def test_advantages_of_shape_b_by_1_equal_per_sequence_advantages():
    x = _inputs()
    per_sequence, _ = _call(x)
    column, _ = policy_loss_from_logprobs(x["logp"], x["entropy"], x["old"], x["adv"][:, None])
    torch.testing.assert_close(column, per_sequence, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2,), (T,), (B, 1)])
def test_a_normalizer_of_several_values_is_refused_everywhere(shape):
    """A [T] or [B, 1] normalizer would broadcast against the per-token weights into a wrong loss."""
    x = _inputs()
    normalizer = torch.full(shape, 4.0)
    message = rf"^normalizer: expected one value \(a 0-d or one-element tensor\), got shape {re_shape(shape)}$"
    with pytest.raises(ValueError, match=message):
        _call(x, normalizer=normalizer)
    logits, targets = torch.randn(B, T, 11), torch.randint(0, 11, (B, T))
    with pytest.raises(ValueError, match=message):
        fk.policy_loss(logits, targets, x["old"], x["adv"], normalizer=normalizer, backend="torch")
    with pytest.raises(ValueError, match=message):
        fk.value_loss(x["old"], x["old"], x["old"], normalizer=normalizer)
    one = _call(x, normalizer=torch.tensor([4.0]))[0]
    torch.testing.assert_close(one, _call(x, normalizer=4.0)[0])


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_one_sequence_of_shape_n_equals_a_batch_of_one():
    x = _inputs()
    flat, flat_metrics = policy_loss_from_logprobs(x["logp"][0], x["entropy"][0], x["old"][0], x["adv"][:1].expand(T))
    batch, metrics = policy_loss_from_logprobs(x["logp"][:1], x["entropy"][:1], x["old"][:1], x["adv"][:1])
    torch.testing.assert_close(flat, batch)
    torch.testing.assert_close(flat_metrics["ratio_mean"], metrics["ratio_mean"])


@pytest.mark.parametrize("arg", ["mask", "normalizer"])
def test_mask_and_normalizer_on_another_device_are_refused_against_logp(arg):
    x = _inputs()
    other = torch.ones(B, T, device="meta") if arg == "mask" else torch.tensor(4.0, device="meta")
    with pytest.raises(ValueError, match=rf"^{arg}: expected a tensor on cpu like logp, got meta$"):
        _call(x, **{arg: other})
