"""Non-finite logits give the same defined result on every backend.

- a row holding NaN gives NaN logp and entropy, and a gradient row with NaN (NaN propagates, it is
  never hidden as a dead lane);
- a row holding +inf without softcap has no distribution: NaN as well (a softcap maps +inf to c);
- -inf logits are masked vocabulary entries: probability 0; a target there has logp = -inf and a
  finite gradient;
- every other row is unaffected and matches the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import device_of, every_backend

UNDEFINED_ROWS = {None: (1, 2, 3), 4.0: (1,)}  # rows whose logp / entropy are NaN, by softcap


def _rows(seed: int = 0, v: int = 300):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(7, v, generator=g)
    y = torch.randint(0, v, (7,), generator=g)
    z[1, 7] = math.nan
    z[2, 9] = math.inf  # target elsewhere
    y[3], z[3, 11] = 11, math.inf  # target at the +inf logit
    z[4, :40] = -math.inf  # masked vocabulary entries
    y[5], z[5, 13] = 13, -math.inf  # target at a -inf logit
    z[6, :] = -math.inf
    z[6, 0], y[6] = 0.0, 0  # one live entry: p = 1, entropy 0
    return z, y


def _run(backend, z, y, softcap):
    # Each backend runs on its test device (Triton: the GPU where there is one, else the interpreter); the
    # reference on CPU. Results come back to CPU.
    device = "cpu" if backend == "reference" else device_of(backend)
    leaf = z.to(device).requires_grad_(True)
    logp, entropy = fk.token_logprobs(leaf, y.to(device), softcap=softcap, backend=backend)
    g = torch.Generator().manual_seed(1)
    c_lp, c_h = (torch.randn(logp.shape, generator=g).to(device) for _ in range(2))
    # -inf logp (row 5) times a coefficient is still differentiable: the gradient is c (1[y] - p).
    finite_lp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    (grad,) = torch.autograd.grad((c_lp * (logp - logp.detach() + finite_lp.detach())).sum() + (c_h * entropy).sum(),
                                  leaf)
    return logp.detach().cpu(), entropy.detach().cpu(), grad.cpu()


def _check(backend, softcap):
    z, y = _rows()
    logp, entropy, grad = _run(backend, z, y, softcap)
    want_logp, want_entropy, want_grad = _run("reference", z, y, softcap)
    undefined = list(UNDEFINED_ROWS[softcap])
    defined = [i for i in range(z.shape[0]) if i not in undefined]
    assert torch.isnan(logp[undefined]).all() and torch.isnan(entropy[undefined]).all()
    assert torch.isnan(want_logp[undefined]).all() and torch.isnan(want_entropy[undefined]).all()
    for i in undefined:
        assert torch.isnan(grad[i]).any(), f"row {i}: NaN hidden in the gradient"
    if softcap is None:
        assert logp[5] == -math.inf and want_logp[5] == -math.inf
        defined.remove(5)
        assert_close_to_reference(entropy[5], want_entropy[5], dtype=torch.float32, name="entropy, -inf target")
    assert_close_to_reference(logp[defined], want_logp[defined], dtype=torch.float32, name="logp")
    assert_close_to_reference(entropy[defined], want_entropy[defined], dtype=torch.float32, name="entropy")
    rows = [i for i in range(z.shape[0]) if i not in undefined]
    assert torch.isfinite(grad[rows]).all()
    assert_close_to_reference(grad[rows], want_grad[rows], dtype=torch.float32, kind="grad", name="gradient")


@pytest.mark.parametrize("backend", every_backend())
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_nonfinite_logits_match_the_reference(backend, softcap):
    _check(backend, softcap)
