"""Every code path of the Triton kernels, against the float64 reference.

With one row per program the kernels walk a row as an aligned head (rows of V % 16 != 0 start
anywhere), full blocks with unmasked vector loads (the hot loop) and a masked tail; the gradient's
target element is written once more after the row. The launch table picks one row per program only
for vocabularies above half a tile, so these tests force it with small blocks (the interpreter runs
them on CPU) and cross it with strides, in-place writes, ignored rows, dead (-inf) lanes and every
transform. ``python -m fastrl_kernels.triton.inspect`` compiles the same paths for a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed")
pytestmark = pytest.mark.triton

import fastrl_kernels.triton as ft  # noqa: E402
from fastrl_kernels.core import CoreParams  # noqa: E402
from tests.test_backend_contract import check  # noqa: E402
from tests.test_triton_primitives import DEVICE  # noqa: E402

ONE_ROW = ft.LaunchConfig(block_v=64, rows=1, num_warps=2)
PARAMS = {
    "plain": CoreParams(),
    "temperature": CoreParams(temperature=0.6),
    "negative_scale": CoreParams(logit_scale=-0.7, temperature=1.2),
    "softcap": CoreParams(softcap=4.0, logit_scale=1.5),
}


def _inputs(n_rows, vocab, seed, dtype=torch.float32, stride=None):
    g = torch.Generator().manual_seed(seed)
    width = stride or vocab
    storage = (3.0 * torch.randn(n_rows, width, generator=g)).to(DEVICE)  # moved whole: a slice keeps its stride
    logits = storage[:, :vocab].to(dtype) if stride is None else storage.to(dtype)[:, :vocab]
    targets = torch.randint(0, vocab, (n_rows,), generator=g)
    targets[1::4] = -100
    return logits, targets


def _check(logits, targets, params, out=None):
    """stats and grad with one row per program against the reference (tests/test_backend_contract.py)."""
    return check("triton", logits, targets, params, out=out, launch=ONE_ROW)[1]


@pytest.mark.parametrize("transform", sorted(PARAMS))
@pytest.mark.parametrize("vocab", [64 * 5, 64 * 5 + 7, 13, 64 + 3])
def test_one_row_per_program_head_blocks_and_tail(vocab, transform):
    """V = 320: full blocks only; 327: head, blocks and a tail; 13: a head that is the whole row;
    67: a row shorter than head + one block."""
    logits, targets = _inputs(9, vocab, seed=vocab)
    _check(logits, targets, PARAMS[transform])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_per_program_in_place(dtype):
    logits, targets = _inputs(7, 64 * 3 + 5, seed=1, dtype=dtype)
    expected = _check(logits.clone(), targets, PARAMS["temperature"])
    buffer = logits.clone()
    grad = _check(buffer, targets, PARAMS["temperature"], out=buffer)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_row_stride_wider_than_the_vocabulary():
    """Rows 40 elements apart: every row's head differs, and out (contiguous) is aligned unlike the
    logits, so the gradient takes the masked path while the statistics take the peeled one."""
    logits, targets = _inputs(6, 64 + 29, seed=2, stride=64 + 29 + 40)
    assert logits.stride(0) == 64 + 29 + 40
    _check(logits, targets, PARAMS["plain"])


def test_dead_lanes_in_every_part_of_the_row():
    logits, targets = _inputs(5, 64 * 2 + 9, seed=3)
    targets[:] = torch.tensor([0, -100, 70, 136, 5])
    logits[:, [1, 4, 70 - 1, 100, 135]] = float("-inf")  # head, blocks and tail
    logits[4, :] = float("-inf")
    logits[4, 5] = 2.0  # a row with one live lane
    grad = _check(logits, targets, PARAMS["temperature"])
    assert bool((grad[:, [1, 4, 69, 100, 135]] == 0).all())
    assert torch.isfinite(grad).all()


def test_huge_logits_keep_float32_accuracy_on_the_one_row_path():
    logits, targets = _inputs(6, 64 * 4 + 1, seed=4)
    _check(logits * 3e3, targets, PARAMS["temperature"])  # |z| ~ 1e4


def test_launch_table_takes_the_one_row_path_for_large_vocabularies():
    """The stats tile (8192 bf16 lanes) takes one row per program from V = 4097 on; the grad tile is
    half as long (registers grow with lanes per thread), a quarter under softcap. The long stats tile
    takes 4 warps (faster on an H200 than 8)."""
    assert ft.launch_config(4096, torch.bfloat16).rows == 2
    assert ft.launch_config(4097, torch.bfloat16).rows == 1
    assert ft.launch_config(151936, torch.bfloat16) == ft.LaunchConfig(block_v=8192, rows=1, num_warps=4)
    assert ft.launch_config(151936, torch.bfloat16, "grad") == ft.LaunchConfig(block_v=4096, rows=1, num_warps=8)
    assert ft.launch_config(151936, torch.bfloat16, "grad", softcap=True).block_v == 2048
    assert ft.launch_config(151936, torch.float32, "grad").block_v == 2048
    assert ft.launch_config(2049, torch.bfloat16, "grad").rows == 1
