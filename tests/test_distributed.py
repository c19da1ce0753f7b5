"""Global normalisers across 2 CPU processes (gloo) reproduce the single-process loss and gradients."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastrl_kernels as fk
from fastrl_kernels.integrations.distributed import global_normalizer
from tests.docs_examples import doc_example

WORLD, BATCH, LENGTH, HIDDEN, VOCAB = 2, 6, 5, 8, 37
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "dapo", "sum"]


def _batch():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH, LENGTH, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    targets = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    mask = torch.rand(BATCH, LENGTH, generator=gen) > 0.3
    mask[0, :] = False  # an empty sequence, and ranks with different token counts
    mask[3:, 1:] = False
    old = torch.randn(BATCH, LENGTH, generator=gen) * 0.2 - 3.5
    adv = torch.randn(BATCH, generator=gen)
    return hidden, weight, targets, mask, old, adv


def _loss(weight, hidden, targets, mask, old, adv, mode, normalizer):
    logits = hidden @ weight.T
    if logits.requires_grad:
        logits.retain_grad()
    out = fk.policy_loss(logits, targets, old, adv, mask, loss_agg=mode, normalizer=normalizer, backend="torch",
                         clip_eps_high=0.28)
    return out.loss, logits


def _rank_main(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        hidden, weight, targets, mask, old, adv = _batch()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for mode in MODES:
            for average in (False, True):
                shared = weight.clone().requires_grad_(True)  # a parameter every rank holds (lm_head)
                norm = global_normalizer(mask[rows], mode, average_grads=average)
                loss, logits = _loss(shared, hidden[rows], targets[rows], mask[rows], old[rows], adv[rows], mode, norm)
                loss.backward()
                total = loss.detach().clone()
                dist.all_reduce(total)
                grad = shared.grad.clone()
                dist.all_reduce(grad)
                if average:  # what DDP does to parameter gradients
                    grad /= WORLD
                    total /= WORLD
                logits_grads = [torch.empty_like(logits.grad) for _ in range(WORLD)]
                dist.all_gather(logits_grads, logits.grad.contiguous())
                if rank == 0:
                    results[(mode, average)] = (total, grad, torch.cat(logits_grads))
        # Neither rank tears gloo down while the other may still talk to it (an abort at exit otherwise).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(_free_port(), results), nprocs=WORLD, join=True)
        return dict(results)


@pytest.mark.parametrize("average", [False, True], ids=["sum-reduce", "ddp-average"])
@pytest.mark.parametrize("mode", MODES)
def test_split_batch_equals_whole_batch(two_rank_results, mode, average):
    hidden, weight, targets, mask, old, adv = _batch()
    shared = weight.clone().requires_grad_(True)
    # Single process: the default denominators, except Dr. GRPO's B * T, which is global already.
    loss, logits = _loss(shared, hidden, targets, mask, old, adv, mode, None)
    loss.backward()
    total, grad, logits_grad = two_rank_results[(mode, average)]
    # With average_grads each rank's loss and logits gradient are W times its share (total above is the
    # DDP-style mean); the averaged parameter gradient is the whole-batch one.
    scale = WORLD if average else 1
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, shared.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_grad / scale, logits.grad, rtol=1e-5, atol=1e-6)
    assert shared.grad.abs().max() > 0


def test_local_counts_would_be_wrong(two_rank_results):
    """The per-rank default (local count) differs from the global loss: the helper is needed."""
    hidden, weight, targets, mask, old, adv = _batch()
    full, _ = _loss(weight, hidden, targets, mask, old, adv, "token-mean", None)
    halves = [_loss(weight, hidden[r], targets[r], mask[r], old[r], adv[r], "token-mean", None)[0]
              for r in (slice(0, 3), slice(3, 6))]
    assert not torch.allclose(sum(halves), full, rtol=1e-3)


def test_not_initialised_is_local():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert global_normalizer(mask, "token-mean").item() == 2.0
    assert global_normalizer(torch.zeros(2, 3), "bnpo").item() == 1.0  # clamped: an empty batch gives loss 0
    assert global_normalizer(mask, "grpo").item() == 2.0
    assert global_normalizer(mask, "dr_grpo", horizon=8).item() == 16.0
    assert global_normalizer(mask, "sum", average_grads=True).item() == 1.0
    with pytest.raises(ValueError, match="loss_agg"):
        global_normalizer(mask, "mean")


def test_docs_example():
    namespace: dict = {}
    exec(compile(doc_example("distributed"), "docs/integrations.md:distributed", "exec"), namespace)
    mask = namespace["mask"]
    assert namespace["normalizer"].item() == mask.sum().item()  # one process: the local count
    assert namespace["logits"].grad.abs().max() > 0
