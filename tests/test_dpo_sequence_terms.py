"""The sequence terms of the fused DPO losses (``fastrl_kernels.losses.dpo``): ``sequence_logps`` computes in
the compute dtype of the token log-probs whatever the mask's float dtype or torch's default dtype, and
``fused_dpo_objective`` returns the documented aux entries, the policy sequence log-probs included."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.config import DPOConfig
from fastrl_kernels.losses import dpo as fast

# Two pairs: rows 0, 1 chosen, rows 2, 3 rejected; response lengths 3, 2 | 1, 4.
MASK = [[1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 0]]
LOGP = [[-0.5, -1.25, -7.0, -2.0, -3.0], [-9.0, -0.75, -1.5, -4.0, -6.0],
        [-5.0, -8.0, -0.25, -2.5, -1.0], [-1.0, -2.0, -0.5, -1.75, -3.5]]


def _by_hand(ld_alpha=None, average=False):
    """sum_t m_t w_t logp_t per row (w_t = ld_alpha past the shorter response of the pair, else 1), in
    float64; ``average`` divides by the response length."""
    out = []
    for i, (row, m) in enumerate(zip(LOGP, MASK)):
        pair = i + 2 if i < 2 else i - 2
        shared = min(sum(m), sum(MASK[pair]))
        total, seen = 0.0, 0
        for lp, keep in zip(row, m):
            if keep:
                seen += 1
                total += lp * (ld_alpha if ld_alpha is not None and seen > shared else 1.0)
        out.append(total / max(sum(m), 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(ld_alpha=0.5), dict(average=True)],
                         ids=["sum", "ld_alpha", "average"])
def test_sequence_logps_dtype_is_that_of_float32_token_logps_whatever_the_mask_dtype(mask_dtype, options):
    """float32 token log-probs give float32 sequence log-probs for a float64 / half / bf16 mask."""
    logp = torch.tensor(LOGP, dtype=torch.float32)
    got = fast.sequence_logps(logp, torch.tensor(MASK, dtype=mask_dtype), **options)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, _by_hand(**options).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sequence_logps_of_half_precision_inputs_are_float32(dtype):
    """Half-precision token log-probs and mask are summed in float32 (compute_dtype), not in half."""
    logp = torch.tensor(LOGP, dtype=torch.float64).to(dtype)
    got = fast.sequence_logps(logp, torch.tensor(MASK, dtype=dtype))
    assert got.dtype == torch.float32
    # The hand value on the rounded inputs (all are exact in half precision here).
    torch.testing.assert_close(got, _by_hand().float(), rtol=0, atol=0)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("average", [False, True])
def test_ld_alpha_sequence_logps_are_float32_under_a_float64_default_dtype(average):
    """The LD-DPO token weights are made in the compute dtype, not torch's default dtype."""
    logp = torch.tensor(LOGP, dtype=torch.float32)
    got = fast.sequence_logps(logp, torch.tensor(MASK, dtype=torch.float32), ld_alpha=0.25, average=average)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _by_hand(ld_alpha=0.25, average=average).float(), rtol=1e-6, atol=1e-6)


def test_fused_dpo_objective_returns_the_documented_aux_with_policy_sequence_logps():
    """aux holds chosen_rewards, rejected_rewards, margins, accuracy, policy_chosen_logps and
    policy_rejected_logps; the last two are the masked sums of rows [0:B] and [B:2B], detached."""
    logp = torch.tensor(LOGP, dtype=torch.float32).requires_grad_(True)
    mask = torch.tensor(MASK, dtype=torch.float32)
    ref_c, ref_r = torch.tensor([-3.0, -2.0]), torch.tensor([-1.0, -4.0])
    beta = 0.5
    loss, aux = fast.fused_dpo_objective(DPOConfig(beta=beta), logp.reshape(-1), None, None, mask, ref_c, ref_r)
    assert set(aux) == {"chosen_rewards", "rejected_rewards", "margins", "accuracy", "policy_chosen_logps",
                        "policy_rejected_logps"}
    seq = _by_hand()
    torch.testing.assert_close(aux["policy_chosen_logps"], seq[:2].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux["policy_rejected_logps"], seq[2:].float(), rtol=1e-6, atol=1e-6)
    assert not aux["policy_chosen_logps"].requires_grad and not aux["policy_rejected_logps"].requires_grad
    chosen = beta * (seq[:2] - ref_c.double())
    rejected = beta * (seq[2:] - ref_r.double())
    torch.testing.assert_close(aux["chosen_rewards"], chosen.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux["rejected_rewards"], rejected.float(), rtol=1e-6, atol=1e-6)
    expected = torch.nn.functional.softplus(-(chosen - rejected)).mean()
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
