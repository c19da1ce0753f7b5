"""The float64 KL estimators: the straight-through construction of "k1+" / "k3+" gives any estimator's
value with the gradient of k^2 / 2, and kl_penalty is float64 whatever the dtype of logp."""

from __future__ import annotations

import pytest
import torch

from fastrl_kernels.reference import policy as ref

ESTIMATORS = {"k1": lambda k: -k, "k3": lambda k: torch.exp(k) - k - 1.0, "abs": lambda k: k.abs()}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_straight_through_keeps_the_value_and_takes_the_k2_gradient(name):
    value = ESTIMATORS[name]
    k = torch.tensor([-1.5, -0.25, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    out = ref._straight_through(value)(k)
    torch.testing.assert_close(out, value(k.detach()), rtol=0, atol=1e-15)
    (grad,) = torch.autograd.grad(out.sum(), k)
    torch.testing.assert_close(grad, k.detach(), rtol=0, atol=0)  # d(k^2 / 2) / dk = k


def test_kl_penalty_of_float32_logp_against_one_reference_value_is_float64():
    logp32 = torch.tensor([-0.1, -1.3, -2.7], dtype=torch.float32)
    ref_lp = torch.tensor(-0.9, dtype=torch.float64)  # one value, broadcast over the tokens
    kl = ref.kl_penalty(logp32, ref_lp)
    assert kl.dtype == torch.float64 and kl.shape == logp32.shape
    torch.testing.assert_close(kl, ref.kl_penalty(logp32.double(), ref_lp), rtol=0, atol=0)
