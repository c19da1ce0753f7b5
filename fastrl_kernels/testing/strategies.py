"""Hypothesis strategies for the package's inputs.

Hypothesis draws only small choices (sizes, kinds, an integer seed); tensors are then built with a
seeded ``torch.Generator``, which is fast and shrinks well. Every strategy returns CPU tensors;
move them with ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st

from ..config import ENTROPY_MODES, KL_ESTIMATORS, LOSS_AGG_ALIASES, LOSS_AGG_MODES, POLICY_LOSS_TYPES, PolicyLossConfig
from ..reference.logprobs import token_logprobs

# 1, 2, 3 are degenerate vocabularies; the primes straddle block sizes (1024) and powers of two, 2047 and
# 2049 the native kernel's vocabulary block (2048).
SPECIAL_VOCABS = (1, 2, 3, 31, 997, 1009, 2047, 2049, 2999)
LOGIT_KINDS = ("normal", "peaked", "flat", "all_equal", "all_negative", "huge")
# The kinds whose rows have spread (p is not uniform); "flat" and "all_equal" make every row uniform,
# where a wrong gradient or a wrong logit transform can still give the right answer.
SPREAD_KINDS = ("normal", "peaked", "all_negative", "huge")
MASK_KINDS = ("ones", "zeros", "random", "single", "right_padded")
IGNORE_INDEX = -100


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator().manual_seed``."""
    return st.integers(0, 2**31 - 1)


def vocab_sizes(max_vocab: int = 3000, min_vocab: int = 1) -> st.SearchStrategy[int]:
    """Vocabulary sizes in [min_vocab, max_vocab], often one of ``SPECIAL_VOCABS``."""
    special = [v for v in SPECIAL_VOCABS if min_vocab <= v <= max_vocab]
    return st.one_of(st.sampled_from(special), st.integers(min_vocab, max_vocab))


def logit_kinds(kinds: Sequence[str] = LOGIT_KINDS) -> st.SearchStrategy[str]:
    """Names of logit distributions understood by ``make_logits``."""
    return st.sampled_from(tuple(kinds))


def make_logits(kind: str, shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of ``shape`` (last dim = vocabulary) drawn in float32 then cast to ``dtype``.

    "normal": N(0, 2^2); "peaked": N(0, 1) plus 30 at one random column per row; "flat": N(0, 1e-3^2);
    "all_equal": one constant per tensor; "all_negative": -1000 + N(0, 5^2); "huge": uniform in
    [-1e4, 1e4].
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if kind == "normal":
        z = 2.0 * torch.randn(shape, generator=g)
    elif kind == "peaked":
        z = torch.randn(shape, generator=g)
        spike = torch.randint(0, shape[-1], (*shape[:-1], 1), generator=g)
        z.scatter_add_(-1, spike, torch.full(spike.shape, 30.0))
    elif kind == "flat":
        z = 1e-3 * torch.randn(shape, generator=g)
    elif kind == "all_equal":
        z = torch.full(shape, float(3.0 * torch.randn((), generator=g)))
    elif kind == "all_negative":
        z = -1000.0 + 5.0 * torch.randn(shape, generator=g)
    elif kind == "huge":
        z = 1e4 * (2.0 * torch.rand(shape, generator=g) - 1.0)
    else:
        raise ValueError(f"kind: expected one of {LOGIT_KINDS}, got {kind!r}")
    return z.to(dtype)


@st.composite
def masks(draw: st.DrawFn, shape: Sequence[int]) -> torch.Tensor:
    """Bool masks of ``shape``: all ones, all zeros, random ~50%, a single token, or right padding."""
    shape = tuple(shape)
    kind = draw(st.sampled_from(MASK_KINDS))
    g = torch.Generator().manual_seed(draw(seeds()))
    numel = 1
    for size in shape:
        numel *= size
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bool)
    if kind == "zeros" or numel == 0:
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "random":
        return torch.rand(shape, generator=g) < 0.5
    if kind == "single":
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[int(torch.randint(0, numel, (1,), generator=g))] = True
        return flat.view(shape)
    lengths = torch.randint(0, shape[-1] + 1, (*shape[:-1], 1), generator=g)
    return torch.arange(shape[-1]) < lengths


@st.composite
def core_inputs(
    draw: st.DrawFn,
    max_rows: int = 64,
    max_vocab: int = 3000,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    with_ignore: bool = True,
    kinds: Sequence[str] = SPREAD_KINDS,
    min_vocab: int = 2,
    ignore_indices: Sequence[int] = (IGNORE_INDEX,),
) -> dict:
    """Keyword arguments of the core op: ``dict(logits [N, V], targets [N] int64, temperature,
    logit_scale, softcap, ignore_index)``.

    Logits of the ``kinds`` (default: only rows with spread; the uniform "flat" / "all_equal" rows and
    V = 1 belong in deterministic tests) and V in [min_vocab, max_vocab]. ``ignore_index`` is drawn from
    ``ignore_indices``; with ``with_ignore`` some draws set ~25% of the targets to it.

    ``reference.token_logprobs(**inputs)`` and the backends' ``token_logprobs(**inputs)`` accept it as is.
    """
    rows = draw(st.integers(1, max_rows))
    vocab = draw(vocab_sizes(max_vocab, min_vocab))
    kind = draw(logit_kinds(kinds))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    seed = draw(seeds())
    ignore_index = draw(st.sampled_from(tuple(ignore_indices)))
    logits = make_logits(kind, (rows, vocab), seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    if with_ignore and draw(st.booleans()):
        targets = targets.masked_fill(torch.rand(rows, generator=g) < 0.25, ignore_index)
    return {
        "logits": logits,
        "targets": targets,
        "temperature": draw(st.sampled_from((1.0, 0.7, 0.5, 1.5)) | st.floats(0.25, 4.0)),
        "logit_scale": draw(st.sampled_from((1.0, 1.0, 0.5, 2.0))),
        "softcap": draw(st.sampled_from((None, None, 30.0, 5.0))),
        "ignore_index": ignore_index,
    }


@st.composite
def policy_inputs(
    draw: st.DrawFn,
    max_batch: int = 4,
    max_len: int = 16,
    max_vocab: int = 64,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    allow_flat: bool = True,
    kinds: Sequence[str] = ("normal", "peaked", "flat", "all_equal"),
    min_vocab: int = 1,
    nonempty_mask: bool = False,
    with_ignore: bool = False,
    old_noise: Sequence[float] = (0.2,),
) -> dict:
    """Arguments of ``policy_loss``: ``dict(logits, targets, old_logprobs, advantages, mask, ref_logprobs)``.

    Leading shape ``[B, T]``, or ``[N]`` (one sequence) in some draws when ``allow_flat``; vocabulary in
    [min_vocab, max_vocab]. old and ref log-probs are the float64 reference logp (temperature 1) plus
    N(0, s^2) noise with s drawn from ``old_noise`` / N(0, 0.3^2) noise, as float32, so ratios sit near 1
    and some clip (s = 1 gives ratios of e^+-2, past a dual clip or a delta cap). advantages ``[B, T]``,
    per sequence ``[B]``, or ``[N]``; mask from ``masks`` (bool, may be all False unless
    ``nonempty_mask``, which then unmasks one random token). ``with_ignore``: some draws set ~20% of
    the targets to -100 (masked by ``policy_loss``).
    """
    flat = allow_flat and draw(st.booleans())
    batch = 1 if flat else draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    leading = (length,) if flat else (batch, length)
    vocab = draw(st.integers(min_vocab, max_vocab))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    seed = draw(seeds())
    logits = make_logits(draw(logit_kinds(kinds)), (*leading, vocab), seed, dtype)
    noise = draw(st.sampled_from(tuple(old_noise)))
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, vocab, leading, generator=g)
    if with_ignore and draw(st.booleans()):
        targets = targets.masked_fill(torch.rand(leading, generator=g) < 0.2, IGNORE_INDEX)
    logp, _ = token_logprobs(logits, targets)
    old = (logp + noise * torch.randn(leading, generator=g, dtype=torch.float64)).to(torch.float32)
    ref = (logp + 0.3 * torch.randn(leading, generator=g, dtype=torch.float64)).to(torch.float32)
    per_sequence = not flat and draw(st.booleans())
    advantages = torch.randn((batch,) if per_sequence else leading, generator=g)
    mask = draw(masks(leading))
    if nonempty_mask and not bool(mask.any()):
        mask.view(-1)[int(torch.randint(0, mask.numel(), (1,), generator=g))] = True
    return {
        "logits": logits,
        "targets": targets,
        "old_logprobs": old,
        "advantages": advantages,
        "mask": mask,
        "ref_logprobs": ref,
    }


@st.composite
def policy_configs(
    draw: st.DrawFn,
    loss_types: Sequence[str] = POLICY_LOSS_TYPES,
    with_kl: bool = True,
    with_entropy: bool = True,
    temperatures: Sequence[float] = (1.0, 1.0, 0.7, 1.3),
) -> PolicyLossConfig:
    """``PolicyLossConfig`` over every loss type, KL estimator, entropy mode and aggregation (TRL aliases
    included; the KL and entropy terms' own aggregations too), with eps in [0, 0.5], optional delta / dual
    clip / KL clamp / KL value cap, and small coefficients.

    A nonzero ``kl_coef`` needs ``ref_logprobs`` (``policy_inputs`` always provides them).
    """
    agg_names = LOSS_AGG_MODES + tuple(LOSS_AGG_ALIASES)
    return PolicyLossConfig(
        loss_type=draw(st.sampled_from(tuple(loss_types))),
        clip_eps_low=draw(st.sampled_from((0.2, 0.1)) | st.floats(0.0, 0.5)),
        clip_eps_high=draw(st.sampled_from((0.2, 0.28)) | st.floats(0.0, 0.5)),
        delta=draw(st.none() | st.floats(1.05, 3.0)),
        dual_clip=draw(st.none() | st.floats(1.5, 5.0)),
        sapo_temp_pos=draw(st.sampled_from((1.0,)) | st.floats(0.1, 5.0)),
        sapo_temp_neg=draw(st.sampled_from((1.05,)) | st.floats(0.1, 5.0)),
        kl_coef=draw(st.sampled_from((0.0, 0.01, 0.1, 1.0))) if with_kl else 0.0,
        kl_estimator=draw(st.sampled_from(KL_ESTIMATORS)),
        kl_clamp=draw(st.sampled_from((None, None, 0.5, 10.0, 20.0))),
        kl_value_cap=draw(st.sampled_from((None, None, 0.05, 10.0))),
        kl_agg=draw(st.none() | st.sampled_from(agg_names)),
        entropy_coef=draw(st.sampled_from((0.0, 0.01, 0.1))) if with_entropy else 0.0,
        entropy_mode=draw(st.sampled_from(ENTROPY_MODES)),
        entropy_agg=draw(st.none() | st.sampled_from(agg_names)),
        loss_agg=draw(st.sampled_from(agg_names)),
        temperature=draw(st.sampled_from(tuple(temperatures))),
    )
