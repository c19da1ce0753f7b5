"""A training step over the logits makes three N x V passes and not one more.

Every loss on the logits path is ``token_stats`` (pass 1 in forward, pass 2 in backward) plus O(N)
algebra: one call of each primitive per forward + backward, whatever feeds on the log-probs; no
whole-tensor op besides them (checked op by op with a TorchDispatchMode on the torch backend, whose
primitives work in chunks far smaller than the tensor); only pass 1 without gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastrl_kernels as fk
from fastrl_kernels import backends
from fastrl_kernels.testing import assert_close_to_reference
from tests.backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()


class CountingPrimitives:
    """Wraps a backend module and counts its stats / grad calls."""

    def __init__(self, module):
        self.module, self.calls = module, {"stats": 0, "grad": 0}

    def stats(self, *args, **kwargs):
        self.calls["stats"] += 1
        return self.module.stats(*args, **kwargs)

    def grad(self, *args, **kwargs):
        self.calls["grad"] += 1
        return self.module.grad(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    def install(backend):
        counter = CountingPrimitives(backends.primitives(backend))
        monkeypatch.setitem(backends._MODULES, backend, counter)
        return counter.calls

    return install


def _inputs(b=2, t=6, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    old = torch.randn(b, t, generator=g) - 4
    adv = torch.randn(b, generator=g)
    return logits, targets, old, adv


def _dpo(z, targets, backend, **kw):
    half = z.shape[0] // 2
    return fk.fused_dpo_loss(z, targets, None, torch.full((half,), -300.0), torch.full((half,), -310.0),
                             backend=backend, beta=0.1, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, inplace", [("token_logprobs", False), ("policy_loss", False), ("policy_loss", True),
                                         ("fused_dpo_loss", False), ("fused_dpo_loss", True)])
def test_one_stats_and_one_grad_per_step(counted, backend, op, inplace):
    calls = counted(backend)
    logits, targets, old, adv = _inputs()
    z = logits.clone().requires_grad_(True)
    x = z * 1.0  # a non-leaf the in-place gradient may overwrite
    extra = {"inplace_grad": True} if inplace else {}
    if op == "token_logprobs":
        logp, entropy = fk.token_logprobs(x, targets, backend=backend)
        loss = logp.sum() + 0.1 * entropy.sum()
    elif op == "policy_loss":
        out = fk.policy_loss(x, targets, old, adv, backend=backend, entropy_coef=0.1, **extra)
        # A second consumer of the returned log-probs and entropies joins the same pass 2.
        loss = out.loss + (0.0 if inplace else 0.3 * out.logprobs.sum() + 0.2 * out.entropy.sum())
    else:
        loss = _dpo(x, targets, backend, **extra).loss
    assert calls == {"stats": 1, "grad": 0}
    loss.backward()
    assert calls == {"stats": 1, "grad": 1}
    assert z.grad is not None and bool(z.grad.abs().sum() > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_runs_only_pass_one(counted, backend):
    calls = counted(backend)
    logits, targets, old, adv = _inputs()
    with torch.no_grad():
        fk.policy_loss(logits.requires_grad_(True), targets, old, adv, backend=backend)
        _dpo(logits, targets, backend)
    fk.token_logprobs(logits.detach(), targets, backend=backend)
    assert calls == {"stats": 3, "grad": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_backward_needs_no_extra_pass(counted, backend):
    calls = counted(backend)
    logits, targets, old, adv = _inputs(seed=1)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    fk.policy_loss(a, targets, old, adv, backend=backend).loss.backward()
    (2.5 * fk.policy_loss(b, targets, old, adv, backend=backend).loss).backward()
    assert calls == {"stats": 2, "grad": 2}
    assert_close_to_reference(b.grad, 2.5 * a.grad.double(), dtype=torch.float32, kind="grad")


class WholeTensorOps(TorchDispatchMode):
    """Records every aten op that reads or writes a tensor of ``numel`` elements (views and
    allocations move no data and are not recorded)."""

    FREE = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "reshape", "detach", "alias",
            "as_strided", "slice", "select", "t", "transpose", "expand", "unsqueeze", "squeeze", "permute",
            "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias"}

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in self.FREE:
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
            if any(t.numel() >= self.numel for t in tensors):
                self.ops.append(name)
        return out


def test_torch_backend_step_has_no_whole_tensor_op_besides_the_primitives(counted):
    """N x V = 16 x 65536 = 2^20 elements, 4x the torch backend's chunk: any op on the whole tensor
    is an extra pass (the primitives' own ops see one chunk at a time)."""
    logits, targets, old, adv = _inputs(b=2, t=8, v=65536, seed=2)
    ref = old + 0.1
    for inplace in (False, True):
        z = logits.clone().requires_grad_(True)
        x = z * 1.0
        with WholeTensorOps(logits.numel()) as mode:
            out = fk.policy_loss(x, targets, old, adv, torch.rand(2, 8) > 0.3, ref_logprobs=ref, backend="torch",
                                 kl_coef=0.04, entropy_coef=0.01, inplace_grad=inplace)
            out.loss.backward()
        # The two primitives (custom ops, in whose bodies the torch backend works chunk by chunk)
        # and autograd's backward of ``z * 1.0`` (the test's own op, not ours).
        assert mode.ops == ["token_stats", "token_grad_" if inplace else "token_grad", "mul"], (inplace, mode.ops)


class LogitsReads(TorchDispatchMode):
    """Records, for every op that takes a tensor sharing the logits' storage as an input, the op's name
    and (for index_select) the rows it gathers."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.storage = logits.untyped_storage().data_ptr()
        self.ops, self.rows = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        inputs = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if inputs and name not in ("empty", "empty_like", "new_empty") and any(
                t.untyped_storage().data_ptr() == self.storage for t in inputs[:1]):
            self.ops.append(name)
            if name == "index_select":
                self.rows += args[2].tolist()
        return func(*args, **kwargs)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_backend_reads_only_the_rows_it_computes(inplace):
    """Both torch-backend primitives gather exactly the rows whose target is not ignore_index (in
    chunks) and touch the ignored rows only to write their zero gradient."""
    from fastrl_kernels import torch_backend
    from fastrl_kernels.core import CoreParams

    g = torch.Generator().manual_seed(5)
    n, v = 40, 16384  # 16 rows per chunk: the 25 kept rows span two chunks
    logits = torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.4
    targets[ignored] = -100
    params = CoreParams(1.0, 1.0, None, -100)
    kept = (~ignored).nonzero().view(-1).tolist()
    with LogitsReads(logits) as mode:
        stats = torch_backend.stats(logits, targets, params)
    assert sorted(mode.rows) == kept and set(mode.ops) == {"index_select"}, mode.ops
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    with LogitsReads(logits) as mode:
        torch_backend.grad(logits, targets, stats, g_lp, g_h, params, out=logits if inplace else None)
    assert sorted(mode.rows) == kept, mode.rows
    # In place, the ignored rows are written (index_put_ of zeros) and the kept ones scattered back.
    expected = {"index_select", "index_put_", "index_copy_"} if inplace else {"index_select"}
    assert set(mode.ops) == expected, mode.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_ignored_rows_give_zero_whatever_they_hold(backend, garbage):
    """Ignored rows holding NaN / inf / huge logits give logp = entropy = 0 and a zero gradient row,
    and leave every other row's values and gradient as they are with finite ignored rows."""
    g = torch.Generator().manual_seed(6)
    n, v = 24, 3000
    logits = 3.0 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[[0, 5, 6, 7, 23]] = True
    targets[ignored] = -100
    coef = torch.randn(n, generator=g)

    def run(z):
        z = z.clone().requires_grad_(True)
        logp, entropy = fk.token_logprobs(z, targets, backend=backend)
        (grad,) = torch.autograd.grad((coef * logp).sum() + (coef * entropy).sum(), z)
        return logp, entropy, grad

    clean = run(logits)
    poisoned = logits.clone()
    poisoned[ignored] = garbage
    dirty = run(poisoned)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert bool((dirty[0][ignored] == 0).all() and (dirty[1][ignored] == 0).all())
    assert bool((dirty[2][ignored] == 0).all())
    assert_close_to_reference(dirty[0], fk.token_logprobs(logits, targets, backend="reference")[0], dtype=torch.float32,
                              name="logp")
