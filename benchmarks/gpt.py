"""A minimal GPT-2-style language model in plain torch, for the ``gpt-step`` benchmark group.

Token and learned position embeddings, ``layers`` pre-LayerNorm blocks (causal self-attention
through ``F.scaled_dot_product_attention(is_causal=True)``, then a 4x GELU MLP, each added to the
residual stream), a final LayerNorm and a linear head to the vocabulary. No dropout (the step is
deterministic) and no weight tying (every entry then sees the same parameter list; torch.func and
``nn.Module.parameters()`` would otherwise have to agree on the shared tensor).

The full-size config (:data:`FULL`) is vocabulary 10240, width 256, 6 blocks of 4 heads, context
64: 9,998,336 parameters in 77 tensors. The token embedding and the head are 2,621,440 each, the
position embedding 16,384, each block 789,760 (attention 263,168, MLP 525,568, two LayerNorms
1,024) and the final LayerNorm 512. A batch is 4 sequences of 65 random tokens: the model reads
the first 64 and predicts the next 64 (next-token cross-entropy over 256 tokens per step). One
eager step (forward, backward, AdamW) takes ~0.1 s on a 2-core CPU. The smoke config
(:data:`SMOKE`: vocabulary 64, width 16, 2 blocks, context 8, batch 2) has 8,768 parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    width: int
    layers: int
    heads: int
    context: int
    batch: int  # sequences per step


FULL = GPTConfig(vocab=10240, width=256, layers=6, heads=4, context=64, batch=4)
SMOKE = GPTConfig(vocab=64, width=16, layers=2, heads=2, context=8, batch=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        # (b, t, 3c) -> three (b, heads, t, c / heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.positions = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        # GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``(batch, t)`` -> next-token logits ``(batch, t, vocab)``."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross-entropy: ``batch = (inputs, targets)``, both ``(batch, t)`` token ids."""
    idx, targets = batch
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def token_batches(cfg: GPTConfig, device: torch.device, n: int = 4, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches of random tokens: ``cfg.batch`` sequences of ``cfg.context + 1`` tokens, split
    into inputs (all but the last) and targets (all but the first)."""
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same tokens on every device
    out = []
    for _ in range(n):
        seq = torch.randint(0, cfg.vocab, (cfg.batch, cfg.context + 1), generator=gen)
        out.append((seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)))
    return out
