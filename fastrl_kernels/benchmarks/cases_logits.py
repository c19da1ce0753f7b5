"""Cases on the logits path: ``token_logprobs`` (fwd, fwd+bwd) and ``policy_loss`` (fwd+bwd).

Inputs (seeded, identical for every implementation): logits ``[B, T, V]`` ~ 2 * N(0, 1) (a moderately
peaked softmax), T = the largest power of two <= 512 dividing N; targets uniform; 40 % of the tokens
masked; old / ref log-probs = the true log-probs + N(0, 0.1^2) / N(0, 0.2^2) (so some ratios clip);
per-sequence advantages (GRPO). ``policy_loss`` runs a GRPO step: clip 0.2 / 0.2, k3 KL with
kl_coef 0.04, token-mean, temperature 0.7.

Traffic for GB/s counts the logits' essential bytes: a forward reads them once (N V itemsize); a
forward + backward reads them twice and writes the gradient once (3 N V itemsize), whatever an
implementation actually moves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import naive, peers
from .cases import (
    NAIVE,
    NAIVE_COMPILE,
    BenchCase,
    OpFamily,
    Step,
    Unavailable,
    ours,
    ours_backends,
    parse_ours,
    seeded_generator,
)

POLICY_PARAMS = {"temperature": 0.7, "clip_eps_low": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.04}
LOGPROBS_PARAMS = {"temperature": 1.0}
MASKED_FRACTION = 0.4


def batch_layout(n_tokens: int) -> tuple[int, int]:
    """``(B, T)`` with B T = N and T the largest power of two <= 512 dividing N."""
    seq = 1
    while seq < 512 and n_tokens % (seq * 2) == 0:
        seq *= 2
    return n_tokens // seq, seq


def _true_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = logits.reshape(-1, logits.shape[-1])
    flat = targets.reshape(-1)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    step = 256
    for start in range(0, rows.shape[0], step):
        x = rows[start:start + step].float() / temperature
        out[start:start + step] = x.gather(1, flat[start:start + step, None]).squeeze(1) - torch.logsumexp(x, 1)
    return out.view(targets.shape)


# The last inputs made on CPU, reused by the next implementation at the same shape: a fresh copy of
# the logits costs one memory copy, where drawing them again costs a random-number pass and a softmax
# (seconds on 2 cores). Not on CUDA, where drawing is fast and a second copy could not fit.
_last_inputs: dict[tuple, dict[str, torch.Tensor]] = {}


def make_logits_inputs(case: BenchCase, temperature: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Logits ``[B, T, V]`` (case dtype, a fresh leaf requiring grad), targets, mask, old / ref
    log-probs, advantages, and weights ``w_lp``, ``w_h`` for a token_logprobs loss. Same values for
    the same (shape, dtype, device, temperature, seed); only the logits are a new tensor each call."""
    if torch.device(case.device).type != "cpu":
        inputs = _draw_inputs(case, temperature, seed)
        inputs["logits"].requires_grad_(True)
        return inputs
    key = (tuple(case.shape.items()), case.dtype, case.device, temperature, seed)
    if key not in _last_inputs:
        _last_inputs.clear()
        _last_inputs[key] = _draw_inputs(case, temperature, seed)
    inputs = dict(_last_inputs[key])
    inputs["logits"] = inputs["logits"].clone().requires_grad_(True)
    return inputs


def _draw_inputs(case: BenchCase, temperature: float, seed: int) -> dict[str, torch.Tensor]:
    n_tokens, vocab = case.shape["N"], case.shape["V"]
    batch, seq = batch_layout(n_tokens)
    device = torch.device(case.device)
    gen = seeded_generator(case.device, seed)
    logits = torch.randn(batch, seq, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2.0)
    logits = logits.to(case.torch_dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
    mask = torch.rand(batch, seq, generator=gen, device=device) >= MASKED_FRACTION
    true_logp = _true_logprobs(logits, targets, temperature)
    noise = torch.randn(2, batch, seq, generator=gen, device=device)
    return {
        "logits": logits,
        "targets": targets,
        "mask": mask,
        "old": true_logp + 0.1 * noise[0],
        "ref": true_logp + 0.2 * noise[1],
        "adv": torch.randn(batch, generator=gen, device=device),
        "w_lp": torch.randn(batch, seq, generator=gen, device=device) * mask,
        "w_h": 0.01 * torch.randn(batch, seq, generator=gen, device=device) * mask,
    }


def _compiled(fn, device: str):
    reason = naive.compile_available(device)
    if reason is not None:
        raise Unavailable(f"naive-compile: {reason}")
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------
# token_logprobs


def _logprobs_fn(impl: str, temperature: float, device: str):
    """``fn(logits, targets) -> (logp, entropy)`` for one implementation."""
    if impl in (NAIVE, NAIVE_COMPILE):
        fn = lambda z, t: naive.naive_token_logprobs(z, t, temperature)
        return _compiled(fn, device) if impl == NAIVE_COMPILE else fn
    if impl == "trl":
        trl = peers.trl_logprobs()

        def trl_fn(z, t):
            x = z / temperature
            # TRL's trainers take the entropy without grad (a logged metric).
            with torch.no_grad():
                entropy = trl.entropy_from_logits(x)
            return trl.selective_log_softmax(x, t), entropy

        return trl_fn
    parsed = parse_ours(impl)
    if parsed is None or parsed[1]:
        raise Unavailable(f"{impl}: not an implementation of token_logprobs")
    import fastrl_kernels as fk

    return lambda z, t: fk.token_logprobs(z, t, temperature=temperature, backend=parsed[0])


def _setup_logprobs(case: BenchCase, impl: str) -> Step:
    temperature = case.params["temperature"]
    fn = _logprobs_fn(impl, temperature, case.device)
    inputs = make_logits_inputs(case, temperature)
    logits, targets, w_lp, w_h = inputs["logits"], inputs["targets"], inputs["w_lp"], inputs["w_h"]
    if case.name.endswith("/fwd"):
        def step():
            with torch.no_grad():
                fn(logits, targets)
        return step

    def step():
        logp, entropy = fn(logits, targets)
        (logp * w_lp + entropy * w_h).sum().backward()
        logits.grad = None

    return step


def _logprobs_cases(shape: Mapping[str, int], dtype: str, device: str) -> list[BenchCase]:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    elements = shape["N"] * shape["V"]
    impls = (NAIVE, NAIVE_COMPILE, "trl") + tuple(ours(b) for b in ours_backends(device))
    common = dict(op="token_logprobs", shape=dict(shape), dtype=dtype, device=device, impls=impls,
                  setup=_setup_logprobs, params=dict(LOGPROBS_PARAMS))
    return [
        BenchCase(name="token_logprobs/fwd", traffic_bytes=elements * itemsize, **common),
        BenchCase(name="token_logprobs/fwd+bwd", traffic_bytes=3 * elements * itemsize,
                  grad_bytes=elements * itemsize, **common),
    ]


# ---------------------------------------------------------------------------------------------
# policy_loss


def _setup_policy(case: BenchCase, impl: str) -> Step:
    p = case.params
    clip = dict(clip_eps_low=p["clip_eps_low"], clip_eps_high=p["clip_eps_high"], kl_coef=p["kl_coef"])
    if impl == "liger":
        return _setup_liger_policy(case)
    parsed = parse_ours(impl)
    if parsed is not None:
        import fastrl_kernels as fk

        backend, inplace = parsed
        run = lambda z, t, old, adv, mask, ref: fk.policy_loss(
            z, t, old, adv, mask, ref_logprobs=ref, backend=backend, inplace_grad=inplace,
            temperature=p["temperature"], loss_agg="token-mean", kl_estimator="k3", **clip,
        ).loss
    elif impl in (NAIVE, NAIVE_COMPILE):
        fn = lambda z, t, old, adv, mask, ref: naive.naive_policy_loss(
            z, t, old, adv, mask, ref, temperature=p["temperature"], **clip
        )[0]
        run = _compiled(fn, case.device) if impl == NAIVE_COMPILE else fn
    elif impl == "trl":
        trl = peers.trl_logprobs()

        def run(z, t, old, adv, mask, ref):
            x = z / p["temperature"]
            with torch.no_grad():
                trl.entropy_from_logits(x)
            return naive.clipped_policy_terms(trl.selective_log_softmax(x, t), old, adv, mask, ref, **clip)
    else:
        raise Unavailable(f"{impl}: not an implementation of policy_loss")
    inputs = make_logits_inputs(case, p["temperature"])
    logits = inputs["logits"]
    args = (inputs["targets"], inputs["old"], inputs["adv"], inputs["mask"], inputs["ref"])

    def step():
        run(logits, *args).backward()
        logits.grad = None

    return step


def _setup_liger_policy(case: BenchCase) -> Step:
    """Liger's Triton GRPO loss reads logits ``[B, T + 1, V]`` (it drops the last position)."""
    grpo = peers.liger_grpo_loss()
    p = case.params
    inputs = make_logits_inputs(case, p["temperature"])
    base = inputs["logits"].detach()
    logits = torch.cat([base, base[:, -1:]], dim=1).requires_grad_(True)
    del base, inputs["logits"]
    mask = inputs["mask"]
    int_mask = mask.int()

    def step():
        out = grpo(
            logits, inputs["old"], inputs["ref"], inputs["targets"], inputs["adv"], int_mask,
            temperature=p["temperature"], beta=p["kl_coef"], eps_low=p["clip_eps_low"],
            eps_high=p["clip_eps_high"], inplace=True,
        )
        per_token = out[0] if isinstance(out, (tuple, list)) else out
        loss = per_token if per_token.dim() == 0 else (per_token * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        logits.grad = None

    return step


def _policy_cases(shape: Mapping[str, int], dtype: str, device: str) -> list[BenchCase]:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    elements = shape["N"] * shape["V"]
    backends = ours_backends(device)
    impls = (NAIVE, NAIVE_COMPILE, "trl", "liger") + tuple(ours(b) for b in backends)
    impls += tuple(ours(b, inplace=True) for b in backends)
    return [
        BenchCase(
            name="policy_loss/fwd+bwd", op="policy_loss", shape=dict(shape), dtype=dtype, device=device,
            impls=impls, setup=_setup_policy, traffic_bytes=3 * elements * itemsize,
            grad_bytes=elements * itemsize, params=dict(POLICY_PARAMS),
        )
    ]


def _default_shapes(device_type: str, quick: bool) -> list[dict[str, int]]:
    """Quick CPU: an N sweep at V=32000 and a V sweep at N=256 (memory flat in V shows there)."""
    if device_type == "cuda":
        n_values = (4096, 16384) if quick else (4096, 8192, 16384, 32768, 65536)
        v_values = (32000, 151936) if quick else (32000, 128256, 151936)
        return [{"N": n, "V": v} for v in v_values for n in n_values]
    if quick:
        n_sweep = [{"N": n, "V": 32000} for n in (256, 1024, 2048)]
        v_sweep = [{"N": 256, "V": v} for v in (8000, 128256)]
        return n_sweep + v_sweep
    return [{"N": n, "V": 32000} for n in (1024, 2048, 4096)] + [{"N": 1024, "V": v} for v in (128256, 151936)]


FAMILIES = [
    OpFamily("token_logprobs", _logprobs_cases, _default_shapes),
    OpFamily("policy_loss", _policy_cases, _default_shapes),
]
