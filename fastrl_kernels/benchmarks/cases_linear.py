"""Cases on the lm_head path: ``linear_policy_loss`` fwd + bwd from hidden states and the lm_head weight.

Shapes are ``NxVxH`` (N tokens, V vocabulary, H hidden). Inputs (seeded, identical for every
implementation): hidden ``[N, H]`` ~ N(0, 1) and weight ``[V, H]`` ~ N(0, 1 / H), both requiring grad;
uniform targets; old log-probs near the model's (-10 to -13); per-token advantages; ~30 % of the tokens
masked. Every implementation runs the PPO clip loss (0.2 / 0.2), token-mean, without KL or entropy.
Naive (``naive.naive_linear_policy_loss``) holds the whole N x V logits, their fp32 log-probs and
gradients at once; ours goes through the vocabulary in token chunks. ``grad_bytes`` is the gradients
a step must produce (dL/dhidden and dL/dweight, the same for every implementation).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import naive
from .cases import NAIVE, BenchCase, OpFamily, Step, Unavailable, ours, ours_backends, parse_ours

SHAPE_KEYS = ("N", "V", "H")
LINEAR_PARAMS = {"loss_type": "clip", "clip_eps_low": 0.2, "clip_eps_high": 0.2, "loss_agg": "token-mean"}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """hidden [N, H], weight [V, H] (both requiring grad), targets, old log-probs, advantages, mask."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": torch.randint(0, v, (n,), generator=g).to(device),
        "old_logprobs": (-torch.rand(n, generator=g) * 3.0 - 10.0).to(device),
        "advantages": torch.randn(n, generator=g).to(device),
        "mask": (torch.rand(n, generator=g) > 0.3).to(device),
    }


def _setup(case: BenchCase, impl: str) -> Step:
    p = case.params
    clip = dict(clip_eps_low=p["clip_eps_low"], clip_eps_high=p["clip_eps_high"])
    parsed = parse_ours(impl)
    if impl == NAIVE:
        def loss(x: dict) -> torch.Tensor:
            return naive.naive_linear_policy_loss(x["hidden"], x["weight"], x["targets"], x["old_logprobs"],
                                                  x["advantages"], x["mask"], **clip)
    elif parsed is not None and not parsed[1]:
        from ..ops.linear import linear_policy_loss

        def loss(x: dict) -> torch.Tensor:
            return linear_policy_loss(x["hidden"], x["weight"], x["targets"], x["old_logprobs"], x["advantages"],
                                      x["mask"], backend=parsed[0], loss_type=p["loss_type"],
                                      loss_agg=p["loss_agg"], **clip).loss
    else:
        raise Unavailable(f"{impl}: not an implementation of {case.op}")
    shape = case.shape
    inputs = make_inputs(shape["N"], shape["H"], shape["V"], case.torch_dtype, case.device)

    def step():
        loss(inputs).backward()
        inputs["hidden"].grad = inputs["weight"].grad = None

    return step


def _cases(shape: Mapping[str, int], dtype: str, device: str) -> list[BenchCase]:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    impls = (NAIVE,) + tuple(ours(b) for b in ours_backends(device))
    return [BenchCase(name="linear_policy_loss/fwd+bwd", op="linear_policy_loss", shape=dict(shape), dtype=dtype,
                      device=device, impls=impls, setup=_setup, grad_bytes=(shape["N"] + shape["V"]) * shape["H"]
                      * itemsize, params=dict(LINEAR_PARAMS))]


def _default_shapes(device_type: str, quick: bool) -> list[dict[str, int]]:
    """Qwen2.5-0.5B's head (H = 896, V = 151936) on CPU; on CUDA also Llama-3-8B's and Qwen2.5-1.5B's."""
    if device_type == "cuda":
        shapes = [(4096, 151936, 896)] if quick else [(8192, 151936, 896), (8192, 128256, 4096), (16384, 151936, 1536)]
    else:
        shapes = [(256, 32000, 896)] if quick else [(2048, 151936, 896)]
    return [dict(zip(SHAPE_KEYS, shape)) for shape in shapes]


FAMILIES = [OpFamily("linear_policy_loss", _cases, _default_shapes, SHAPE_KEYS)]
