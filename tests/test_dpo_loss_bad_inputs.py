"""dpo_loss and fused_dpo_loss on bad inputs: each error names the argument, what was expected and what
was given."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.config import DPOConfig
from fastrl_kernels.ops.dpo_loss import dpo_loss, fused_dpo_loss
from tests.test_dpo_loss import _fused_case


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


def test_dpo_loss_bad_inputs():
    ok = [torch.zeros(3) for _ in range(4)]
    _raises(ValueError, r"ref_rejected_logps: expected shape \(3,\).*got \(4,\)", dpo_loss, *ok[:3],
            torch.zeros(4))
    _raises(ValueError, r"policy_chosen_logps: expected shape \[B\].*got \(3, 1\)", dpo_loss,
            torch.zeros(3, 1), *ok[1:])
    _raises(TypeError, r"policy_rejected_logps: expected dtype.*got torch.int64", dpo_loss, ok[0],
            torch.zeros(3, dtype=torch.long), *ok[2:])
    _raises(ValueError, "chosen_weights / rejected_weights", dpo_loss, *ok, chosen_weights=torch.ones(3))
    _raises(ValueError, "use_weighting=True", dpo_loss, *ok, use_weighting=True)
    _raises(ValueError, r"loss_type: expected one of .* got 'kto'", dpo_loss, *ok, loss_type="kto")
    _raises(ValueError, r"loss_weights: expected 2 weight", dpo_loss, *ok, loss_type=["ipo", "hinge"],
            loss_weights=[1.0])
    _raises(ValueError, r"beta: expected a number > 0, got 0", dpo_loss, *ok, beta=0)
    _raises(ValueError, r"label_smoothing: expected a number in \[0, 0.5\), got 0.5", dpo_loss, *ok,
            label_smoothing=0.5)
    _raises(ValueError, r"f_divergence: expected one of", dpo_loss, *ok, f_divergence="kl")
    _raises(ValueError, r"ld_alpha: expected None or a number in \[0, 1\], got 2", DPOConfig, ld_alpha=2)
    _raises(TypeError, r"unknown option\(s\) \['betta'\]", dpo_loss, *ok, betta=0.1)


def test_fused_dpo_loss_bad_inputs():
    logits, targets, mask, ref_c, ref_r = _fused_case(0, 2, 3, 5, torch.float32)
    _raises(ValueError, r"logits: expected shape \[2B, T, V\].*got \(3, 3, 5\)", fused_dpo_loss, logits[:3],
            targets[:3], mask[:3], ref_c, ref_r)
    _raises(ValueError, r"logits: expected shape \[2B, T, V\].*got \(12, 5\)", fused_dpo_loss,
            logits.reshape(12, 5), targets.reshape(12), None, ref_c, ref_r)
    _raises(ValueError, r"mask: expected shape \(4, 3\).*got \(4, 2\)", fused_dpo_loss, logits, targets,
            mask[:, :2], ref_c, ref_r)
    _raises(ValueError, r"ref_chosen_logps: expected shape \(2,\).*got \(4,\)", fused_dpo_loss, logits,
            targets, mask, torch.zeros(4), ref_r)
    _raises(TypeError, r"ref_rejected_logps: expected dtype", fused_dpo_loss, logits, targets, mask, ref_c,
            torch.zeros(2, dtype=torch.long))
    _raises(ValueError, r"targets: expected values in \[0, 5\)", fused_dpo_loss, logits, targets + 5, mask,
            ref_c, ref_r)
    _raises(ValueError, r"backend: expected one of", fused_dpo_loss, logits, targets, mask, ref_c, ref_r,
            backend="cuda")
    _raises(ValueError, r"temperature: expected a number > 0", fused_dpo_loss, logits, targets, mask, ref_c,
            ref_r, temperature=0.0)
