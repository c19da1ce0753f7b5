"""Verifiable tasks generated in code: a character tokenizer, problems, rewards, SFT and DPO batches.

Every problem is ``<op><n digits>=`` followed by the answer and the end token ``.``:
``C`` copy the digits, ``R`` reverse them, ``S`` sort them ascending, ``D`` write their digit sum.
Prompts of one run all have the same length ``n + 2``, so responses start at one position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD, EOS = "_", "."
ALPHABET = PAD + EOS + "0123456789=CRSD"
TASK_OPS = {"copy": "C", "reverse": "R", "sort": "S", "sum": "D"}
TASKS = tuple(TASK_OPS) + ("mix",)
REWARDS = ("exact", "partial")


class CharTokenizer:
    """One id per character of ``ALPHABET``; ids at or past ``len(ALPHABET)`` (a padded vocabulary)
    decode to ``?``."""

    def __init__(self, alphabet: str = ALPHABET):
        self.alphabet = alphabet
        self.index = {c: i for i, c in enumerate(alphabet)}
        self.pad_id = self.index[PAD]
        self.eos_id = self.index[EOS]

    def __len__(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] if 0 <= i < len(self.alphabet) else "?" for i in ids)

    def decode_response(self, ids: Sequence[int]) -> str:
        """Text before the first end token (the whole text when none was emitted)."""
        text = self.decode(ids)
        return text.split(EOS, 1)[0]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def answer_length(n_digits: int) -> int:
    """Most response tokens a problem needs, end token included (a digit sum of <= 11 digits has 2)."""
    return max(n_digits, 2) + 1


def make_problem(op: str, digits: str) -> Problem:
    if op == "C":
        answer = digits
    elif op == "R":
        answer = digits[::-1]
    elif op == "S":
        answer = "".join(sorted(digits))
    elif op == "D":
        answer = str(sum(int(c) for c in digits))
    else:
        raise ValueError(f"op: expected one of {tuple(TASK_OPS.values())}, got {op!r}")
    return Problem(f"{op}{digits}=", answer)


def sample_problems(task: str, n_digits: int, count: int, rng: random.Random) -> list[Problem]:
    """``count`` random problems of ``task`` ("mix" draws the operation per problem)."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    ops = list(TASK_OPS.values())
    out = []
    for _ in range(count):
        op = rng.choice(ops) if task == "mix" else TASK_OPS[task]
        out.append(make_problem(op, "".join(rng.choice("0123456789") for _ in range(n_digits))))
    return out


def score(response: str, answer: str, kind: str = "exact") -> float:
    """1.0 for an exact answer; "partial" gives the fraction of positions right, over the longer length."""
    if kind not in REWARDS:
        raise ValueError(f"reward: expected one of {REWARDS}, got {kind!r}")
    if response == answer:
        return 1.0
    if kind == "exact":
        return 0.0
    hits = sum(a == b for a, b in zip(response, answer))
    return hits / max(len(response), len(answer), 1)


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer close to the right one: one digit changed (for DPO's rejected response)."""
    pos = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[pos]])
    return answer[:pos] + digit + answer[pos + 1 :]


def prompt_tensor(tok: CharTokenizer, problems: Sequence[Problem], device) -> torch.Tensor:
    """``[B, P]`` int64 prompt ids (all prompts have one length)."""
    return torch.tensor([tok.encode(p.prompt) for p in problems], dtype=torch.long, device=device)


def response_batch(
    tok: CharTokenizer, problems: Sequence[Problem], answers: Sequence[str], n_digits: int, device
) -> torch.Tensor:
    """``[B, P + A]`` ids of prompt + answer + end token, right-padded to ``A = answer_length``."""
    width = answer_length(n_digits)
    rows = []
    for p, a in zip(problems, answers):
        resp = tok.encode(a + EOS)[:width]
        rows.append(tok.encode(p.prompt) + resp + [tok.pad_id] * (width - len(resp)))
    return torch.tensor(rows, dtype=torch.long, device=device)


def split_response(tok: CharTokenizer, seq: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, A]`` (the response ids) and mask ``[B, A]`` bool: tokens up to and including the
    first end token; what follows it is padding."""
    targets = seq[:, prompt_len:]
    is_eos = (targets == tok.eos_id).long()
    mask = (is_eos.cumsum(1) - is_eos) == 0
    return targets, mask


def rewards_for(
    tok: CharTokenizer, seq: torch.Tensor, prompt_len: int, problems: Sequence[Problem], kind: str
) -> torch.Tensor:
    """``[B]`` float32 rewards of sampled sequences; an answer without an end token scores as written."""
    rows = seq[:, prompt_len:].tolist()
    vals = [score(tok.decode_response(r), p.answer, kind) for r, p in zip(rows, problems)]
    return torch.tensor(vals, dtype=torch.float32, device=seq.device)
