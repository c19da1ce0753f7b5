"""A tiny causal transformer in plain PyTorch: pre-norm blocks, learned positions, optional value head.

``TinyGPT.hidden(tokens)`` returns the final (normed) hidden states ``[B, L, d_model]`` so a loss can
work from ``hidden`` and ``lm_head.weight`` (the lm_head path) or from the logits ``lm_head(hidden)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyGPTConfig:
    """Shape of the model. ``vocab_size`` may exceed the tokenizer's alphabet (padded vocabulary, as
    real models pad to a multiple of 64/128); the extra rows are never targets."""

    vocab_size: int = 24
    context: int = 16
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    tied_lm_head: bool = True
    value_head: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Decoder-only transformer. ``forward(tokens [B, L] int64) -> logits [B, L, vocab] fp32``."""

    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={cfg.n_heads}, got {cfg.d_model}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.value = nn.Linear(cfg.d_model, 1) if cfg.value_head else None
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2 scaling keeps the residual stream's variance independent of depth.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tied_lm_head:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, L, d_model]`` (after the last LayerNorm)."""
        n = tokens.shape[1]
        if n > self.cfg.context:
            raise ValueError(f"tokens: expected at most context={self.cfg.context} positions, got {n}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Value-head output ``[...]`` fp32 from hidden states ``[..., d_model]``."""
        if self.value is None:
            raise RuntimeError("this model was built without a value head (TinyGPTConfig.value_head=False)")
        return self.value(hidden).squeeze(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_id: int,
        pad_id: int,
        temperature: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample continuations of equal-length ``prompts [B, P]`` for all rows at once.

        Returns ``[B, P + max_new_tokens]``; after a row emits ``eos_id`` it is filled with ``pad_id``.
        ``temperature=0`` is greedy. The whole (possibly padded) vocabulary is sampled, so the
        sampling distribution is exactly the policy whose log-probs the loss uses. Sampling uses the
        inverse CDF of one uniform per row and step, so two runs with the same generator draw the same
        tokens from nearly equal distributions (fused and naive runs stay in step).
        """
        seq = prompts
        done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden(seq)[:, -1]).float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator)
                cdf = probs.cumsum(-1)
                nxt = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=probs.shape[1] - 1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done |= nxt == eos_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return seq
