"""Correctness and timing checks that need a CUDA device, one section per process (bench/gpu_run.py).

    python -u bench/gpu_checks.py SECTION OUT.jsonl [--dry-run]

Sections (each appends one JSON record per check to OUT.jsonl the moment it is known):
  rows_past_2_31  the primitives at the production tile on rows whose element offset exceeds 2^31
                  (N = 16384, V = 151936 bf16), out of place and in place, vs a float64 evaluation;
  ops             every public op with backend="triton" vs backend="reference" on the same inputs,
                  forward and gradients (in place where the op has it);
  no_sync_step    a whole training step (model forward, policy loss, backward, optimizer step) under
                  torch.cuda.set_sync_debug_mode("error"): any host synchronisation raises;
  breakdown       CUDA-event times at N = 8192, V = 151936 bf16: stats, grad, stats + grad, the policy
                  loss forward and forward + backward (and in place), peak extra memory, and the kernels
                  a step launches;
  lm_head         linear_policy_loss at H = 4096, V = 128256, N = 8192 bf16 against the three bare GEMMs
                  and naive PyTorch's time and peak memory.
``--dry-run`` runs the first three on CPU under TRITON_INTERPRET=1 at tiny shapes, so the script is
exercised by the CPU test suite (tests/test_gpu_run.py) and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Recorder:
    """Appends one JSON line per record and flushes, so a killed process loses nothing written."""

    def __init__(self, path: Path, section: str):
        self.path, self.section = path, section

    def __call__(self, **record) -> None:
        record = {"section": self.section, "t": round(time.time(), 1), **record}
        line = json.dumps(record, default=str)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def compare(self, check: str, actual, expected, *, dtype, kind: str = "forward", row_scale=None) -> None:
        """One comparison with the package's tolerances (fastrl_kernels.testing), recorded pass or fail."""
        from fastrl_kernels.testing import assert_close_to_reference

        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        diff = (a - e).abs()
        stats = {"max_abs": float(diff.max()) if diff.numel() else 0.0,
                 "ref_max": float(e.abs().max()) if e.numel() else 0.0}
        try:
            assert_close_to_reference(a, e, dtype=dtype, kind=kind, name=check, row_scale=row_scale)
            self(check=check, ok=True, **stats)
        except AssertionError as error:
            self(check=check, ok=False, error=str(error)[:400], **stats)


def rows_past_2_31(rec: Recorder, device: str, dry: bool) -> None:
    import fastrl_kernels.triton as ft
    from fastrl_kernels.core import CoreParams
    from fastrl_kernels.reference import token_stats

    n, v = (40, 3001) if dry else (16384, 151936)
    params = CoreParams(temperature=0.7)
    g = torch.Generator(device=device).manual_seed(0)
    z = (2.0 * torch.randn(n, v, device=device, generator=g)).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[::7] = -100
    g_lp, g_h = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    # 2^31 / V = 14134.3: rows from 14135 on start past 2^31 elements.
    picks = [0, 1, 7, 20, n - 1] if dry else [0, 1, 7068, 14134, 14135, 14136, n - 2, n - 1]
    rows = torch.tensor(picks, device=device)
    zr = z[rows].detach().cpu().double().requires_grad_(True)
    ref = token_stats(zr, y[rows].cpu(), temperature=params.temperature)
    (ref.logp * g_lp[rows].cpu().double() + ref.entropy * g_h[rows].cpu().double()).sum().backward()
    st = ft.stats(z, y, params)
    valid = (y[rows] != -100).cpu()
    for name in ("logp", "entropy", "lse", "mean_x"):
        # Ignored rows are not read: their lse and mean_x are 0, not the row's.
        keep = valid if name in ("lse", "mean_x") else torch.ones_like(valid)
        rec.compare(f"stats.{name} rows past 2^31", getattr(st, name)[rows].cpu()[keep], getattr(ref, name)[keep],
                    dtype=torch.bfloat16)
    scale = (g_lp[rows].abs() + g_h[rows].abs()).cpu().double()
    out = ft.grad(z, y, st, g_lp, g_h, params)
    rec.compare("grad rows past 2^31", out[rows], zr.grad, dtype=torch.bfloat16, kind="grad", row_scale=scale)
    rec(check="grad finite everywhere", ok=bool(torch.isfinite(out).all()))
    del out
    ft.grad(z, y, st, g_lp, g_h, params, out=z)
    rec.compare("grad in place rows past 2^31", z[rows], zr.grad, dtype=torch.bfloat16, kind="grad", row_scale=scale)


def _policy_inputs(b, t, v, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (2.0 * torch.randn(b, t, v, device=device, generator=g)).to(dtype)
    targets = torch.randint(0, v, (b, t), device=device, generator=g)
    targets[:, -3:] = -100
    mask = torch.rand(b, t, device=device, generator=g) > 0.4  # 40% masked tokens
    true = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    old = true + 0.1 * torch.randn(b, t, device=device, generator=g)
    ref = true + 0.2 * torch.randn(b, t, device=device, generator=g)
    adv = torch.randn(b, device=device, generator=g)
    return logits, targets, mask, old, ref, adv


def _run_both(rec: Recorder, name: str, dtype, leaves: dict, call, outputs, expected_outputs=None) -> None:
    """Run ``call(backend, **tensors)`` on "triton" and "reference" (float64 copies), backward through
    the first of ``outputs(result)`` (all of them for per-token outputs: ``outputs`` returns them
    summed first), and compare the outputs and every leaf's gradient. ``expected_outputs()``, where
    given, is what the outputs are held to instead of the reference's (an lm_head op in half
    precision sees its logits rounded to that precision, so its values are held to the reference on
    those rounded logits, as the CPU tests do)."""
    got, want = {}, {}
    for backend, store in (("triton", got), ("reference", want)):
        wide = backend == "reference"
        tensors = {k: (t.detach().double() if wide and t.is_floating_point() else t.detach()).clone()
                   for k, t in leaves.items()}
        for t in tensors.values():
            if t.is_floating_point():
                t.requires_grad_(True)
        result = call(backend, **tensors)
        values = outputs(result)
        values[0].backward()
        store["values"] = [v.detach() for v in values if v is not None]
        store["grads"] = {k: t.grad for k, t in tensors.items() if t.is_floating_point() and t.grad is not None}
    if expected_outputs is not None:
        want["values"] = [v.detach() for v in expected_outputs() if v is not None]
    for i, (a, e) in enumerate(zip(got["values"], want["values"])):
        rec.compare(f"{name} output {i}", a, e, dtype=dtype)
    for key, e in want["grads"].items():
        rec.compare(f"{name} grad {key}", got["grads"][key], e, dtype=dtype, kind="grad")


def _per_token(result) -> list:
    """(logp, entropy) -> [an objective that weighs both, logp, entropy]."""
    logp, entropy = result
    weights = torch.linspace(-1.0, 1.0, logp.numel(), device=logp.device, dtype=torch.float64).view(logp.shape)
    return [(logp.double() * weights).sum() + 0.3 * (entropy.double() * weights.flip(-1)).sum(), logp, entropy]


def ops(rec: Recorder, device: str, dry: bool) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        _ops_in(rec, device, dry, dtype)


def _ops_in(rec: Recorder, device: str, dry: bool, dtype: torch.dtype) -> None:
    import fastrl_kernels as fk

    b, t, v = (2, 6, 301) if dry else (4, 64, 32003)
    kw = dict(temperature=0.7, kl_coef=0.04, kl_estimator="k3", entropy_coef=0.01, loss_agg="token-mean")
    logits, targets, mask, old, ref, adv = _policy_inputs(b, t, v, dtype, device)
    _run_both(rec, f"token_logprobs {dtype}", dtype, {"z": logits},
              lambda backend, z: fk.token_logprobs(z, targets, temperature=0.7, softcap=20.0, backend=backend),
              _per_token)
    for inplace in (False, True):
        def policy(backend, z, inplace=inplace):
            return fk.policy_loss(z * 1 if inplace else z, targets, old, adv, mask, ref_logprobs=ref,
                                  backend=backend, inplace_grad=inplace and backend != "reference", **kw)

        _run_both(rec, f"policy_loss {dtype} inplace={inplace}", dtype, {"z": logits}, policy,
                  lambda r: [r.loss, r.logprobs, r.entropy])
    half = b // 2
    ref_c, ref_r = torch.randn(half, device=device) - 20, torch.randn(half, device=device) - 20
    _run_both(rec, f"fused_dpo_loss {dtype}", dtype, {"z": logits},
              lambda backend, z: fk.fused_dpo_loss(z, targets, mask, ref_c, ref_r, backend=backend, beta=0.1),
              lambda r: [r.loss])
    h = 256 if dry else 1024
    g = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(b, t, h, device=device, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
    chunk = 5 if dry else 96
    half = dtype != torch.float32
    rounded = (hidden @ weight.t()).double()  # the logits a half-precision lm_head op sees

    def on_rounded(fn):
        return (lambda: fn(rounded)) if half else None

    _run_both(rec, f"linear_token_logprobs {dtype}", dtype, {"h": hidden, "w": weight},
              lambda backend, h, w: fk.linear_token_logprobs(h, w, targets, backend=backend, chunk_size=chunk),
              _per_token, on_rounded(lambda z: _per_token(fk.token_logprobs(z, targets, backend="reference"))))
    _run_both(rec, f"linear_policy_loss {dtype}", dtype, {"h": hidden, "w": weight},
              lambda backend, h, w: fk.linear_policy_loss(h, w, targets, old, adv, mask, ref_logprobs=ref,
                                                          backend=backend, chunk_size=chunk, **kw),
              lambda r: [r.loss, r.logprobs, r.entropy],
              on_rounded(lambda z: (lambda r: [r.loss, r.logprobs, r.entropy])(
                  fk.policy_loss(z, targets, old, adv, mask, ref_logprobs=ref, backend="reference", **kw))))
    _run_both(rec, f"linear_dpo_loss {dtype}", dtype, {"h": hidden, "w": weight},
              lambda backend, h, w: fk.linear_dpo_loss(h, w, targets, mask, ref_c, ref_r, backend=backend,
                                                       chunk_size=chunk, beta=0.1),
              lambda r: [r.loss],
              on_rounded(lambda z: [fk.fused_dpo_loss(z, targets, mask, ref_c, ref_r, backend="reference",
                                                      beta=0.1).loss]))


def no_sync_step(rec: Recorder, device: str, dry: bool) -> None:
    """A model step with the fused loss; on CUDA any host synchronisation inside it raises."""
    import fastrl_kernels as fk

    b, t, h, v = (2, 8, 32, 301) if dry else (8, 256, 1024, 32003)
    g = torch.Generator(device=device).manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Embedding(v, h), torch.nn.Linear(h, h), torch.nn.GELU(),
                                torch.nn.Linear(h, v)).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=device == "cuda")
    tokens = torch.randint(0, v, (b, t), device=device, generator=g)
    targets = torch.roll(tokens, -1, dims=1)
    old, adv = torch.randn(b, t, device=device, generator=g) - 8, torch.randn(b, device=device, generator=g)

    def step() -> None:
        out = fk.policy_loss(model(tokens), targets, old, adv, backend="triton", entropy_coef=0.01)
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # compiles the kernels and allocates the optimizer state outside the checked step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        rec(check="training step without host sync", ok=True, checked=device == "cuda")
    except Exception as error:
        rec(check="training step without host sync", ok=False, error=f"{type(error).__name__}: {error}"[:400])
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def _events_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` by CUDA events (the benchmarks' timer)."""
    from fastrl_kernels.benchmarks.measure import cuda_event_times

    return statistics.median(cuda_event_times(fn, warmup=warmup, repeats=repeats))


def breakdown(rec: Recorder, device: str, dry: bool) -> None:
    import fastrl_kernels as fk
    import fastrl_kernels.triton as ft
    from fastrl_kernels.core import CoreParams

    if device != "cuda":
        rec(check="breakdown", ok=True, skipped="times need CUDA events")
        return
    b, t, v = 16, 512, 151936
    logits, targets, mask, old, ref, adv = _policy_inputs(b, t, v, torch.bfloat16, device)
    rows, flat = logits.view(-1, v), targets.view(-1)
    params = CoreParams(temperature=0.7)
    g = torch.randn(2, b * t, device=device)
    st = ft.stats(rows, flat, params)
    buf = torch.empty_like(rows)
    gb = rows.numel() * rows.element_size() / 1e9
    times = {
        "stats_ms": _events_ms(lambda: ft.stats(rows, flat, params)),
        "grad_ms": _events_ms(lambda: ft.grad(rows, flat, st, g[0], g[1], params, out=buf)),
        "stats_plus_grad_ms": _events_ms(lambda: ft.grad(rows, flat, ft.stats(rows, flat, params), g[0], g[1], params,
                                                         out=buf)),
        "copy_ms": _events_ms(lambda: buf.copy_(rows)),
    }
    times["stats_GBps"] = gb / (times["stats_ms"] / 1e3)
    times["copy_GBps"] = 2 * gb / (times["copy_ms"] / 1e3)
    rec(check="primitives N=8192 V=151936 bf16", ok=True, device=torch.cuda.get_device_name(), **times)
    kw = dict(ref_logprobs=ref, backend="triton", temperature=0.7, kl_coef=0.04, kl_estimator="k3",
              loss_agg="token-mean")
    leaf = logits.detach().requires_grad_(True)

    def forward():
        return fk.policy_loss(leaf, targets, old, adv, mask, **kw).loss

    def step():
        forward().backward()
        leaf.grad = None

    fwd_bwd = _events_ms(step)
    rec(check="policy_loss N=8192 V=151936 bf16, 40% masked", ok=True, fwd_ms=_events_ms(forward),
        fwd_bwd_ms=fwd_bwd, three_pass_floor_GBps_equiv=3 * gb / (fwd_bwd / 1e3),
        peak_extra_gb=_peak_extra_gb(step), logits_gb=gb)
    work = logits.detach().clone().requires_grad_(True)  # overwritten by its gradient at every step

    def inplace_step():
        fk.policy_loss(work, targets, old, adv, mask, inplace_grad=True, **kw).loss.backward()
        work.grad = None

    rec(check="policy_loss inplace_grad N=8192 V=151936 bf16", ok=True, fwd_bwd_ms=_events_ms(inplace_step),
        peak_extra_gb=_peak_extra_gb(inplace_step))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sorted(((e.name, e.time_range.elapsed_us()) for e in prof.events() if "CUDA" in str(e.device_type)),
                     key=lambda k: -k[1])
    rec(check="kernels per policy_loss step", ok=True, kernels=len(kernels),
        top=[(name[:60], round(us / 1e3, 3)) for name, us in kernels[:6]],
        rest_ms=round(sum(us for _, us in kernels[6:]) / 1e3, 3))


def _peak_extra_gb(fn) -> float:
    """Peak bytes ``fn`` allocates beyond what is live when it starts, in GB."""
    from fastrl_kernels.benchmarks.measure import cuda_peak_extra

    return cuda_peak_extra(fn) / 1e9


def _three_gemms_ms(hidden, weight) -> float:
    """logits = h W^T, dL/dh = G W, dL/dW = G^T h: the matrix work any lm_head step does."""
    upstream = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device).to(hidden.dtype)
    return _events_ms(lambda: (hidden @ weight.T, upstream @ weight, upstream.T @ hidden), repeats=5)


def lm_head(rec: Recorder, device: str, dry: bool) -> None:
    """The lm_head path at the Llama-3-8B head (H = 4096, V = 128256, N = 8192 bf16) against the three
    bare GEMMs a step needs (logits, dL/dh, dL/dW) and against naive PyTorch's peak memory."""
    import fastrl_kernels as fk
    from fastrl_kernels.benchmarks.naive import naive_linear_policy_loss

    if device != "cuda":
        rec(check="lm_head", ok=True, skipped="times need CUDA events")
        return
    b, t, h, v = 16, 512, 4096, 128256
    g = torch.Generator(device=device).manual_seed(2)
    hidden = torch.randn(b * t, h, device=device, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (b, t), device=device, generator=g)
    mask = torch.rand(b, t, device=device, generator=g) > 0.4
    old = -torch.rand(b, t, device=device, generator=g) * 12
    adv = torch.randn(b, device=device, generator=g)
    gemms = _three_gemms_ms(hidden, weight)
    hl, wl = hidden.view(b, t, h).detach().requires_grad_(True), weight.detach().requires_grad_(True)

    def ours():
        fk.linear_policy_loss(hl, wl, targets, old, adv, mask, backend="triton").loss.backward()
        hl.grad = wl.grad = None

    def naive():
        naive_linear_policy_loss(hl, wl, targets, old, adv, mask).backward()  # clip 0.2 / 0.2, token-mean
        hl.grad = wl.grad = None

    ours_ms = _events_ms(ours, warmup=2, repeats=5)
    rec(check="lm_head H=4096 V=128256 N=8192 bf16, 40% masked", ok=True, device=torch.cuda.get_device_name(),
        three_gemms_ms=gemms, linear_policy_loss_fwd_bwd_ms=ours_ms, ratio_to_gemms=ours_ms / gemms,
        peak_extra_gb_ours=_peak_extra_gb(ours), peak_extra_gb_naive=_peak_extra_gb(naive),
        naive_fwd_bwd_ms=_events_ms(naive, warmup=1, repeats=3))


def kernels_for_profiler(rec: Recorder, device: str, dry: bool) -> None:
    """The stats and grad kernels at N = 8192, V = 151936 bf16, twice each (stats, grad, stats, grad):
    the workload ``ncu`` profiles in bench/gpu_run.py (it skips the first pair, which compiles)."""
    import fastrl_kernels.triton as ft
    from fastrl_kernels.core import CoreParams

    if device != "cuda":
        rec(check="kernels_for_profiler", ok=True, skipped="ncu needs CUDA")
        return
    logits, targets, *_ = _policy_inputs(16, 512, 151936, torch.bfloat16, device)
    rows, flat = logits.view(-1, logits.shape[-1]), targets.view(-1)
    params = CoreParams(temperature=0.7)
    g = torch.randn(2, rows.shape[0], device=device)
    out = torch.empty_like(rows)
    for _ in range(2):
        st = ft.stats(rows, flat, params)
        ft.grad(rows, flat, st, g[0], g[1], params, out=out)
    torch.cuda.synchronize()
    rec(check="kernels_for_profiler", ok=True)


SECTIONS = {"rows_past_2_31": rows_past_2_31, "ops": ops, "no_sync_step": no_sync_step, "breakdown": breakdown,
            "lm_head": lm_head, "kernels_for_profiler": kernels_for_profiler}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("out", type=Path, help="JSONL file the records are appended to")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_checks: needs CUDA (or --dry-run)", file=sys.stderr)
        return 2
    rec = Recorder(args.out, args.section)
    start = time.time()
    SECTIONS[args.section](rec, device, args.dry_run)
    rec(check="section done", ok=True, seconds=round(time.time() - start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
