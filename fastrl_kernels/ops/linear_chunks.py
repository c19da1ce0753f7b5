"""The chunked lm_head engine behind ``ops/linear.py``: logits = hidden @ weight^T (+ bias), C rows at a time.

Never more than C x V logits exist (docs/design.md, "The lm_head path"). Per chunk the logits GEMM feeds the
backend's ``stats``; the gradient of the chunk is written over its logits by the backend's ``grad``;
two more GEMMs turn it into grad_hidden (g @ W) and grad_weight (+= g^T @ h, float32 accumulator).

Routes (observable with ``count_gemms``):

- ``"stats"``: no gradient wanted (``torch.no_grad``, rollouts): 1 GEMM per chunk, no grad buffers.
- ``"fused"``: the loss is a sum of per-token terms given mask-only weights (``token_fn``): the
  coefficients of a chunk come from autograd on that chunk's O(C) terms, so stats, coefficients and
  gradient happen in one visit: 3 GEMMs per chunk.
- ``"two_pass"``: a sequence-coupled loss (GSPO, DPO, any ``loss_fn``): stats of every chunk first
  (logp, H, lse, E[x] stored, O(N)), coefficients by autograd on the whole O(N) loss, then a second
  sweep recomputes each logits chunk: 4 GEMMs per chunk.
- ``"logprobs_backward"``: gradients reaching the returned logp / entropy (``linear_token_logprobs``
  or logp fed to another loss): 3 GEMMs per chunk in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..backends import primitives
from ..core import CoreParams, CoreStats
from .logprobs import refuse_double_backward

# CPU: chunk logits of at most 64 MiB stay far below a naive N x V buffer while every GEMM still has
# >= 8 rows x V columns of work; the fp32 grad_weight accumulator is then read and written N / C times.
CPU_CHUNK_BYTES = 64 << 20
# CUDA: at most this share of the free memory and this many bytes for one chunk of logits.
CUDA_FREE_FRACTION = 0.125
CUDA_CHUNK_BYTES = 1 << 30
_CPU_ROW_MULTIPLE = 8
_CUDA_ROW_MULTIPLE = 64


@dataclass
class GemmCount:
    """GEMMs run by the lm_head ops while counting, by kind, and the routes taken (in order)."""

    logits: int = 0
    grad_hidden: int = 0
    grad_weight: int = 0
    routes: list = field(default_factory=list)
    chunk_sizes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.logits + self.grad_hidden + self.grad_weight


_counters: list[GemmCount] = []


@contextmanager
def count_gemms() -> Iterator[GemmCount]:
    """Count the GEMMs and record the routes of the lm_head ops run inside the block (debugging, tests)."""
    counter = GemmCount()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def _record(kind: str, route: Optional[str] = None, chunk_size: Optional[int] = None) -> None:
    for counter in _counters:
        if route is not None:
            counter.routes.append(route)
            counter.chunk_sizes.append(chunk_size)
        else:
            setattr(counter, kind, getattr(counter, kind) + 1)


def choose_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the most that keep one C x V logits chunk (plus its float32 copy for half
    precision on CPU) within budget, rounded down to a multiple of 8 (CPU) / 64 (CUDA) for the GEMMs.

    Trade-off: memory grows as C x V; time shrinks with C because every chunk reads W twice and
    reads + writes the float32 grad_weight accumulator once (traffic ~ (N / C) x V x H x (2 itemsize + 8)
    bytes), and small GEMMs run below peak. Budget: CPU 64 MiB; CUDA min(1 GiB, free / 8) from
    ``torch.cuda.mem_get_info`` (a driver query, not a stream sync).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, multiple = min(CUDA_CHUNK_BYTES, int(free * CUDA_FREE_FRACTION)), _CUDA_ROW_MULTIPLE
    else:
        budget, multiple = CPU_CHUNK_BYTES, _CPU_ROW_MULTIPLE
        if itemsize < 4:
            itemsize += 4  # the float32 copy of the chunk gradient for the weight GEMM (see _GradAccumulator)
    rows = budget // max(vocab * itemsize, 1)
    rows = max(multiple, rows // multiple * multiple)
    return max(1, min(rows, n_rows))


@dataclass(frozen=True)
class LinearSpec:
    """Everything but tensors for the Functions (one object instead of many positional args).

    ``loss_fn(logp [N], entropy [N], log_sum_p2 [N] | None, *loss_inputs) -> (loss 0-d, aux dict)`` is the
    whole O(N) loss (value, metrics, and coefficients on the two-pass route). ``token_fn(logp_c,
    entropy_c, *token_inputs_c) -> terms [C]`` (optional) gives per-token terms summing to the loss,
    which selects the fused route; ``token_inputs`` are ``[N]`` tensors (or None) sliced per chunk.
    """

    backend: str
    params: CoreParams
    chunk_size: int
    loss_fn: Optional[Callable[..., Any]] = None
    token_fn: Optional[Callable[..., torch.Tensor]] = None
    with_log_sum_p2: bool = False
    aux_keys: list = field(default_factory=list)


def _chunks(n_rows: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n_rows, chunk_size):
        yield start, min(start + chunk_size, n_rows)


class _LogitsChunks:
    """One reusable C x V buffer in the hidden dtype; each chunk of logits is a GEMM into it."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], chunk_size: int):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        rows = min(chunk_size, hidden.shape[0])
        self.buffer = torch.empty((rows, weight.shape[0]), dtype=hidden.dtype, device=hidden.device)

    def compute(self, start: int, stop: int) -> torch.Tensor:
        out = self.buffer[: stop - start]
        rows = self.hidden[start:stop]
        if self.bias is None:
            torch.mm(rows, self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, rows, self.weight.t(), out=out)
        _record("logits")
        return out


_cuda_out_dtype_ok = [True]


def _accumulate_outer(acc: torch.Tensor, grad_chunk: torch.Tensor, rows: torch.Tensor) -> None:
    """acc += grad_chunk^T @ rows with a float32 (or wider) accumulator whatever the input dtype."""
    if grad_chunk.dtype == acc.dtype:
        acc.addmm_(grad_chunk.t(), rows)
        return
    if acc.is_cuda and _cuda_out_dtype_ok[0]:
        try:
            # cuBLAS accumulates half inputs in fp32 and adds into acc (beta = 1): no upcast copies.
            torch.addmm(acc, grad_chunk.t(), rows, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _cuda_out_dtype_ok[0] = False
    acc.addmm_(grad_chunk.t().to(acc.dtype), rows.to(acc.dtype))


class _GradAccumulator:
    """grad_hidden rows per chunk (hidden dtype); grad_weight, grad_bias summed over chunks in float32."""

    def __init__(self, hidden, weight, bias, needs: Sequence[bool]):
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs[1] else None
        self.bias = (
            torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if needs[2] and bias is not None else None
        )

    @property
    def active(self) -> bool:
        return self.hidden is not None or self.weight is not None or self.bias is not None

    def add(self, start: int, stop: int, grad_chunk: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor):
        if self.hidden is not None:
            torch.mm(grad_chunk, weight, out=self.hidden[start:stop])
            _record("grad_hidden")
        if self.weight is not None:
            _accumulate_outer(self.weight, grad_chunk, hidden[start:stop])
            _record("grad_weight")
        if self.bias is not None:
            self.bias.add_(grad_chunk.sum(dim=0, dtype=self.bias.dtype))

    def finish(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> list:
        """[grad_hidden, grad_weight, grad_bias] in the parameters' dtypes (one cast each, at the end)."""
        grad_w = None if self.weight is None else self.weight.to(weight.dtype)
        grad_b = None if self.bias is None else self.bias.to(bias.dtype)
        self.weight = self.bias = None
        return [self.hidden, grad_w, grad_b]


class _StatsStore:
    """Per-token statistics of every chunk, ``[N]`` each: logp, entropy (and log_sum_p2) float32, lse and
    E[x] float64 as the primitives give them (pass 2 takes them apart to keep p exact at |z| = 1e4)."""

    def __init__(self, n_rows: int, device: torch.device, with_log_sum_p2: bool):
        self.data = torch.zeros((3 if with_log_sum_p2 else 2, n_rows), dtype=torch.float32, device=device)
        self.logp, self.entropy = self.data[0], self.data[1]
        self.log_sum_p2 = self.data[2] if with_log_sum_p2 else None
        self.lse, self.mean_x = torch.zeros((2, n_rows), dtype=torch.float64, device=device)

    def put(self, start: int, stop: int, stats: CoreStats) -> None:
        self.logp[start:stop] = stats.logp
        self.entropy[start:stop] = stats.entropy
        self.lse[start:stop] = stats.lse
        self.mean_x[start:stop] = stats.mean_x
        if self.log_sum_p2 is not None:
            self.log_sum_p2[start:stop] = stats.log_sum_p2


def stats_sweep(hidden, weight, bias, targets, backend: str, params: CoreParams, chunk_size: int,
                with_log_sum_p2: bool = False) -> _StatsStore:
    """Pass 1 over all chunks: 1 GEMM per chunk, only O(N) results kept."""
    _record("", "stats", chunk_size)
    prims = primitives(backend)
    store = _StatsStore(hidden.shape[0], hidden.device, with_log_sum_p2)
    logits = _LogitsChunks(hidden, weight, bias, chunk_size)
    for start, stop in _chunks(hidden.shape[0], chunk_size):
        store.put(start, stop, prims.stats(logits.compute(start, stop), targets[start:stop], params, with_log_sum_p2))
    return store


def grad_sweep(hidden, weight, bias, targets, lse, mean_x, g_lp, g_entropy, backend: str, params: CoreParams,
               chunk_size: int, acc: _GradAccumulator, route: str) -> None:
    """Pass 2 with known coefficients: recompute each logits chunk, gradient in place, 3 GEMMs per chunk."""
    _record("", route, chunk_size)
    prims = primitives(backend)
    logits = _LogitsChunks(hidden, weight, bias, chunk_size)
    for start, stop in _chunks(hidden.shape[0], chunk_size):
        chunk = logits.compute(start, stop)
        part = slice(start, stop)
        # grad needs only lse and E[x]; logp / entropy slots are unused there.
        stats = CoreStats(lse[part], lse[part], lse[part], mean_x[part])
        grad_chunk = prims.grad(chunk, targets[part], stats, g_lp[part], g_entropy[part], params, out=chunk)
        acc.add(start, stop, grad_chunk, hidden, weight)


def _token_coefficients(token_fn, logp, entropy, token_inputs):
    """(dL/dlogp, dL/dH) of one chunk by autograd on its O(C) per-token terms."""
    logp = logp.detach().requires_grad_(True)
    entropy = entropy.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = token_fn(logp, entropy, *token_inputs)
        g_lp, g_h = torch.autograd.grad(terms.sum(), (logp, entropy), allow_unused=True)
    return (torch.zeros_like(logp) if g_lp is None else g_lp,
            torch.zeros_like(entropy) if g_h is None else g_h)


def fused_sweep(hidden, weight, bias, targets, token_inputs, spec: LinearSpec, acc: _GradAccumulator) -> _StatsStore:
    """Stats, coefficients and gradient of each chunk in one visit: 3 GEMMs per chunk."""
    _record("", "fused", spec.chunk_size)
    prims = primitives(spec.backend)
    store = _StatsStore(hidden.shape[0], hidden.device, spec.with_log_sum_p2)
    logits = _LogitsChunks(hidden, weight, bias, spec.chunk_size)
    for start, stop in _chunks(hidden.shape[0], spec.chunk_size):
        chunk = logits.compute(start, stop)
        part_targets = targets[start:stop]
        stats = prims.stats(chunk, part_targets, spec.params, spec.with_log_sum_p2)
        store.put(start, stop, stats)
        inputs = [None if x is None else x[start:stop] for x in token_inputs]
        g_lp, g_h = _token_coefficients(spec.token_fn, stats.logp, stats.entropy, inputs)
        grad_chunk = prims.grad(chunk, part_targets, stats, g_lp, g_h, spec.params, out=chunk)
        acc.add(start, stop, grad_chunk, hidden, weight)
    return store


def _full_loss(spec: LinearSpec, store: _StatsStore, loss_inputs: tuple, token_grads: bool):
    """The O(N) loss on all stored statistics: (loss, aux, g_lp, g_H, grads of loss_inputs)."""
    logp = store.logp.detach().requires_grad_(token_grads)
    entropy = store.entropy.detach().requires_grad_(token_grads)
    positions = [i for i, x in enumerate(loss_inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    inputs = [x.detach().requires_grad_(True) if i in positions else x for i, x in enumerate(loss_inputs)]
    wrt = ([logp, entropy] if token_grads else []) + [inputs[i] for i in positions]
    with torch.set_grad_enabled(bool(wrt)):
        loss, aux = spec.loss_fn(logp, entropy, store.log_sum_p2, *inputs)
        # A loss that depends on none of them (the loss inputs are constants of every policy loss).
        differentiable = bool(wrt) and loss.requires_grad
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if differentiable else [None] * len(wrt)
    g_lp = g_h = None
    if token_grads:
        g_lp, g_h = grads[:2]
        g_lp = torch.zeros_like(logp) if g_lp is None else g_lp
        g_h = torch.zeros_like(entropy) if g_h is None else g_h
        grads = grads[2:]
    input_grads = [None] * len(loss_inputs)
    for i, g in zip(positions, grads):
        input_grads[i] = g
    return loss.detach(), aux, g_lp, g_h, input_grads


def evaluate_without_grad(hidden, weight, bias, targets, spec: LinearSpec, loss_inputs: tuple):
    """(loss, logp, entropy, aux) with one GEMM per chunk and no gradient buffers."""
    store = stats_sweep(hidden, weight, bias, targets, spec.backend, spec.params, spec.chunk_size,
                        spec.with_log_sum_p2)
    with torch.no_grad():
        loss, aux = spec.loss_fn(store.logp, store.entropy, store.log_sum_p2, *loss_inputs)
    return loss, store.logp, store.entropy, aux


def _combine(first: Optional[torch.Tensor], second: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if first is None:
        return second
    return first if second is None else first.add_(second)


class LinearLoss(torch.autograd.Function):
    """A scalar loss of per-token (logp, H) of ``hidden @ weight^T + bias``, gradients computed in forward.

    Inputs: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]``, spec, token_inputs
    (tuple, fused route only), *loss_inputs. Outputs: (loss, logp [N], entropy [N], *aux values).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: LinearSpec, token_inputs: tuple, *loss_inputs):
        acc = _GradAccumulator(hidden, weight, bias, ctx.needs_input_grad[:3])
        if spec.token_fn is not None:
            store = fused_sweep(hidden, weight, bias, targets, token_inputs, spec, acc) if acc.active else \
                stats_sweep(hidden, weight, bias, targets, spec.backend, spec.params, spec.chunk_size,
                            spec.with_log_sum_p2)
            loss, aux, _, _, input_grads = _full_loss(spec, store, loss_inputs, token_grads=False)
        else:
            store = stats_sweep(hidden, weight, bias, targets, spec.backend, spec.params, spec.chunk_size,
                                spec.with_log_sum_p2)
            loss, aux, g_lp, g_h, input_grads = _full_loss(spec, store, loss_inputs, token_grads=acc.active)
            if acc.active:
                grad_sweep(hidden, weight, bias, targets, store.lse, store.mean_x, g_lp, g_h, spec.backend,
                           spec.params, spec.chunk_size, acc, "two_pass")
        # Plain attributes, not saved tensors: backward hands them on without another reference, so the
        # weight's AccumulateGrad can take the buffer instead of cloning it.
        ctx.grads = acc.finish(weight, bias)
        ctx.input_grads = input_grads
        ctx.spec = spec
        ctx.save_for_backward(hidden, weight, bias, targets, store.lse, store.mean_x)
        ctx.set_materialize_grads(False)
        aux_values = tuple(aux.values())
        ctx.mark_non_differentiable(*aux_values)
        spec.aux_keys[:] = list(aux.keys())
        return (loss, store.logp, store.entropy) + aux_values

    @staticmethod
    def backward(ctx, grad_loss, grad_logp, grad_entropy, *_aux_grads):
        refuse_double_backward("the lm_head loss")
        if ctx.grads is None:
            raise RuntimeError(
                "fastrl_kernels linear loss: backward was already run once; the gradients are computed in the "
                "forward and scaled in place, so run the forward again instead of retain_graph=True"
            )
        grads, ctx.grads = ctx.grads, None
        if grad_loss is None:
            grads = [None, None, None]
        else:
            # The stored buffers are the gradients for d(loss) = 1; scale them in place.
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        if grad_logp is not None or grad_entropy is not None:
            extra = logprobs_backward(ctx, grad_logp, grad_entropy)
            grads = [_combine(a, b) for a, b in zip(grads, extra)]
        input_grads = [None if g is None or grad_loss is None else g * grad_loss.to(g.dtype)
                       for g in ctx.input_grads]
        return (*grads, None, None, None, *input_grads)


def logprobs_backward(ctx, grad_logp, grad_entropy) -> list:
    """Gradients of hidden / weight / bias for incoming gradients of logp and entropy: one more sweep."""
    hidden, weight, bias, targets, lse, mean_x = ctx.saved_tensors
    zeros = torch.zeros(lse.shape, dtype=torch.float32, device=lse.device)
    acc = _GradAccumulator(hidden, weight, bias, ctx.needs_input_grad[:3])
    if acc.active:
        spec = ctx.spec
        grad_sweep(hidden, weight, bias, targets, lse, mean_x,
                   zeros if grad_logp is None else grad_logp.float(),
                   zeros if grad_entropy is None else grad_entropy.float(),
                   spec.backend, spec.params, spec.chunk_size, acc, "logprobs_backward")
    return acc.finish(weight, bias)


class LinearTokenLogprobs(torch.autograd.Function):
    """(logp [N], entropy [N]) of ``hidden @ weight^T + bias``: stats in forward, a gradient sweep in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, spec: LinearSpec):
        store = stats_sweep(hidden, weight, bias, targets, spec.backend, spec.params, spec.chunk_size)
        ctx.spec = spec
        ctx.save_for_backward(hidden, weight, bias, targets, store.lse, store.mean_x)
        ctx.set_materialize_grads(False)
        return store.logp, store.entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("linear_token_logprobs")
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        return (*logprobs_backward(ctx, grad_logp, grad_entropy), None, None)
