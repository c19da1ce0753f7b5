"""Calls from several threads give bit-for-bit the results of the same calls made one after another
(torch and native backends), and the native backend's results do not depend on the thread count.

Each op runs on several different inputs (shapes, dtypes, options, ``inplace_grad``), first serially,
then each input three times over from a pool of 4 threads, so that threads run the same input and
different inputs at the same time; every output and gradient must equal the serial one exactly.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastrl_kernels as fk
from fastrl_kernels import native

from .backends_under_test import cpu_fused_backends

BACKENDS = cpu_fused_backends()
THREADS = 4
INPUTS = 6  # different inputs per op
ROUNDS = 3  # each input is computed this many times by the pool
NATIVE_OPS = ("token_logprobs", "policy_loss", "fused_dpo_loss")  # the ops that run the native kernels


@pytest.fixture(autouse=True)
def two_intra_op_threads():
    # Intra-op parallelism inside each call too (the native rows and torch's kernels use a thread pool).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _logits(g: torch.Generator, shape, dtype) -> torch.Tensor:
    scale = 1 + 4 * torch.rand((), generator=g)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _targets(g: torch.Generator, shape, vocab: int) -> torch.Tensor:
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < 0.15] = -100  # some ignored rows
    return targets


def _case(seed: int) -> dict:
    """Inputs of every op for one seed; shapes and options differ from seed to seed."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, H = 2 + seed % 3, 5 + 3 * seed, 512 * (1 + seed % 4), 16
    dtype = (torch.float32, torch.bfloat16)[seed % 2]
    mask = torch.rand(B, T, generator=g) < 0.8
    return dict(
        seed=seed, dtype=dtype, B=B, T=T,
        logits=_logits(g, (B, T, V), dtype), targets=_targets(g, (B, T), V), mask=mask,
        old=-3 * torch.rand(B, T, generator=g), ref=-3 * torch.rand(B, T, generator=g),
        adv=torch.randn(B, generator=g), weights=torch.randn(B, T, generator=g),
        temperature=(1.0, 0.7, 1.3)[seed % 3], softcap=(None, 30.0)[seed % 2],
        pair_logits=_logits(g, (2 * B, T, V), dtype), pair_targets=_targets(g, (2 * B, T), V),
        ref_chosen=-20 * torch.rand(B, generator=g), ref_rejected=-20 * torch.rand(B, generator=g),
        hidden=torch.randn(B, T, H, generator=g).to(dtype), weight=(0.3 * torch.randn(V, H, generator=g)).to(dtype),
    )


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_(True)


def run_token_logprobs(c: dict, backend: str) -> list:
    logits = _leaf(c["logits"])
    logp, entropy = fk.token_logprobs(logits, c["targets"], temperature=c["temperature"], softcap=c["softcap"],
                                      backend=backend)
    (logp * c["weights"] + entropy * c["mask"]).sum().backward()
    return [logp, entropy, logits.grad]


def run_policy_loss(c: dict, backend: str) -> list:
    logits = _leaf(c["logits"])
    inplace = c["seed"] % 3 == 0
    produced = logits * 1.0 if inplace else logits  # inplace_grad overwrites its input: give it a copy
    out = fk.policy_loss(produced, c["targets"], c["old"], c["adv"], c["mask"], ref_logprobs=c["ref"],
                         kl_coef=0.05, entropy_coef=0.01, temperature=c["temperature"], softcap=c["softcap"],
                         loss_type=("clip", "gspo", "cispo")[c["seed"] % 3], backend=backend, inplace_grad=inplace)
    out.loss.backward()
    return [out.loss, out.logprobs, out.entropy, *out.metrics.values(), logits.grad]


def run_fused_dpo_loss(c: dict, backend: str) -> list:
    logits = _leaf(c["pair_logits"])
    mask = torch.cat([c["mask"], c["mask"].flip(0)])
    out = fk.fused_dpo_loss(logits, c["pair_targets"], mask, c["ref_chosen"], c["ref_rejected"],
                            loss_type=("sigmoid", "ipo", "hinge")[c["seed"] % 3], beta=0.1,
                            temperature=c["temperature"], backend=backend)
    out.loss.backward()
    return [*out, logits.grad]


def run_linear_policy_loss(c: dict, backend: str) -> list:
    hidden, weight = _leaf(c["hidden"]), _leaf(c["weight"])
    out = fk.linear_policy_loss(hidden, weight, c["targets"], c["old"], c["adv"], c["mask"], ref_logprobs=c["ref"],
                                kl_coef=0.05, temperature=c["temperature"], softcap=c["softcap"],
                                chunk_size=8 * (1 + c["seed"] % 3), backend=backend)
    out.loss.backward()
    return [out.loss, out.logprobs, out.entropy, *out.metrics.values(), hidden.grad, weight.grad]


OPS = {
    "token_logprobs": run_token_logprobs,
    "policy_loss": run_policy_loss,
    "fused_dpo_loss": run_fused_dpo_loss,
    "linear_policy_loss": run_linear_policy_loss,
}


@pytest.fixture(scope="module")
def cases() -> list:
    return [_case(seed) for seed in range(INPUTS)]


def _assert_identical(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach(), b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}, output {i}"
        # Bitwise (NaN payloads aside): equal values, and NaN exactly where the serial result has NaN.
        same = torch.equal(a, b) or torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            a.nan_to_num(0.0), b.nan_to_num(0.0))
        assert same, f"{what}, output {i}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_threads_give_the_serial_results(op, backend, cases):
    run = OPS[op]
    serial = [run(c, backend) for c in cases]
    # Each input's repeats are adjacent: the threads run the same input and different ones at once.
    jobs = [i for i in range(len(cases)) for _ in range(ROUNDS)]
    start = threading.Barrier(THREADS)

    def job(k: int) -> list:
        if k < THREADS:  # the first jobs, one per thread, wait for each other: all threads start together
            start.wait(timeout=30)
        return run(cases[jobs[k]], backend)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(job, range(len(jobs))))
    for i, got in zip(jobs, results):
        _assert_identical(got, serial[i], f"{op} on {backend}, input {i}")


@pytest.mark.skipif("native" not in BACKENDS, reason="the native backend could not be built here")
@pytest.mark.parametrize("op", NATIVE_OPS)
def test_native_results_do_not_depend_on_the_thread_count(op, cases):
    # Documented in csrc/native.cpp: one row is one task, so the split into threads changes nothing.
    run = OPS[op]
    results = {}
    for threads in (1, 3):
        torch.set_num_threads(threads)
        results[threads] = [run(c, "native") for c in cases]
    for i, (one, three) in enumerate(zip(results[1], results[3])):
        _assert_identical(three, one, f"{op} on native, input {i}, 3 threads vs 1")


@pytest.mark.skipif("native" not in BACKENDS, reason="the native backend could not be built here")
def test_first_native_use_from_several_threads_builds_once(monkeypatch):
    # The extension is built (or loaded from disk) on first use: concurrent first calls must wait for
    # one build, not start their own, and all get the same module.
    module = native.load()
    builds = []

    def slow_build(verbose: bool = False):
        builds.append(threading.get_ident())
        time.sleep(0.2)  # long enough for every thread to arrive while the "build" runs
        return module

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setattr(native, "_build", slow_build)
    start = threading.Barrier(THREADS)

    def first_use(_):
        start.wait(timeout=30)
        return native.load()

    with ThreadPoolExecutor(THREADS) as pool:
        loaded = list(pool.map(first_use, range(THREADS)))
    assert len(builds) == 1 and all(m is module for m in loaded)
