"""A tiny masked-diffusion transformer in plain PyTorch: the kind of custom architecture a researcher brings.

Bidirectional pre-norm blocks, hand-written attention (no SDPA), learned absolute positions, GELU MLP,
untied LM head. Position i predicts token i (no logit shift); the last id of the vocabulary is [MASK].

    model = TinyDLLM(vocab_size=256).eval()
    logits = model(input_ids)                        # [B, L, vocab]
    logits = model(input_ids, attention_mask=mask4d, position_ids=positions)
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, attention_mask=None):
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) * self.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim, n_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x, attention_mask=None):
        x = x + self.attn(self.norm1(x), attention_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyDLLM(nn.Module):
    def __init__(self, vocab_size=256, dim=64, n_layers=2, n_heads=4, mlp_ratio=4, max_len=512, mask_token_id=None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of n_heads ({n_heads})")
        self.config = SimpleNamespace(vocab_size=vocab_size, shift_logits=False,
                                      mask_token_id=vocab_size - 1 if mask_token_id is None else mask_token_id)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """input_ids [B, L]; attention_mask: additive float [B, 1, L, L] (0 attends); position_ids [B, L]."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.lm_head(self.norm(x))
