"""A zoo of tiny bidirectional transformer LMs written in plain PyTorch, built from drawn architecture choices.

`architectures()` is a hypothesis strategy of `Arch` (a frozen dataclass: hypothesis prints it, shrinking
moves every choice towards the first, plainest option); `ZooLM(arch)` builds the model, deterministic in
`arch.seed`. Token ids `[B, L]` (and an optional `[B, L]` padding mask, 1 = token, 0 = padding) -> logits
`[B, L, V]` or an object with `.logits`. `model.config` carries `mask_token_id` (= vocab - 1) and
`shift_logits` like the models of `dyllm_fx.models`. Every attention is bidirectional (no causal mask).

Choices: norm (RMSNorm module, hand-written RMSNorm, LayerNorm; pre-, post- or sandwich norm), attention
(MHA, GQA, MQA; SDPA or matmul + softmax + matmul; QK-norm; q/k/v bias; full, partial or no rotary; additive
or boolean padding mask built inside the model from an all-ones or padded `[B, L]` mask, or no mask; K/V
heads repeated HF-style, by repeat_interleave or by SDPA's enable_gqa), MLP (GELU, SiLU, ReLU^2; plain or
gated: SwiGLU, GeGLU; or a top-k mixture of experts computed densely: router linear, topk, softmax over
the top-k, every expert computed and combined by the routing weights), block shape (sequential, or attention
and MLP in parallel on the same input), tied or untied LM head, logits shifted by the caller (Dream:
`config.shift_logits`), inside the forward, or not at all.
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

VOCAB = 61
MAX_LEN = 64


@dataclass(frozen=True)
class Arch:
    layers: int = 1
    dim: int = 16
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    norm: str = "rms"            # rms (nn.RMSNorm) | rms_manual (pow, mean, rsqrt) | layer (nn.LayerNorm)
    norm_place: str = "pre"      # pre | post | sandwich
    attn_impl: str = "sdpa"      # sdpa | matmul (matmul + softmax + matmul written by hand)
    kv_repeat: str = "expand"    # GQA/MQA: expand (HF repeat_kv) | repeat_interleave | enable_gqa (SDPA only)
    qk_norm: bool = False
    qkv_bias: bool = False
    rotary: str = "none"         # none | full | partial (half of head_dim)
    abs_pos: bool = False        # learned absolute positions (drawn only without rotary)
    mask: str = "none"           # none | additive | bool: padding mask built in the model from a [B, L] mask
    mlp_act: str = "gelu"        # gelu | silu | relu2
    mlp_gated: bool = False      # act(gate(x)) * up(x): SwiGLU with silu, GeGLU with gelu
    experts: int = 0             # 0: one MLP; n: top-k mixture of n experts (dense compute)
    top_k: int = 1
    moe_combine: str = "one_hot"  # routing weights onto the expert axis: one_hot | scatter
    parallel: bool = False       # x + attn(norm(x)) + mlp(norm(x)) (GPT-J / PaLM)
    tied: bool = False
    shift: str = "none"          # none | caller (config.shift_logits, Dream) | forward (the model shifts)
    output: str = "tensor"       # tensor | object (a NamedTuple with .logits)
    seed: int = 0

    @property
    def attention(self) -> str:
        return "mha" if self.kv_heads == self.heads else "mqa" if self.kv_heads == 1 else "gqa"


@st.composite
def architectures(draw, max_layers: int = 2) -> Arch:
    head_dim = draw(st.sampled_from([8, 4]))
    attention = draw(st.sampled_from(["mha", "gqa", "mqa"]))
    max_heads = 32 // head_dim
    if attention == "mha":
        heads = draw(st.sampled_from([h for h in (2, 1, 4) if h <= max_heads]))
        kv_heads = heads
    elif attention == "gqa":
        kv_heads, group = draw(st.sampled_from([(kv, g) for kv, g in ((2, 2), (2, 3), (3, 2)) if kv * g <= max_heads]))
        heads = kv_heads * group
    else:
        heads, kv_heads = draw(st.sampled_from([h for h in (2, 4) if h <= max_heads])), 1
    attn_impl = draw(st.sampled_from(["sdpa", "matmul"]))
    repeats = ["expand", "repeat_interleave"] + (["enable_gqa"] if attn_impl == "sdpa" else [])
    rotary = draw(st.sampled_from(["none", "full", "partial"]))
    experts = draw(st.sampled_from([0, 2, 4]))
    return Arch(
        layers=draw(st.integers(1, max_layers)),
        dim=draw(st.sampled_from([16, 24, 32])),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        norm=draw(st.sampled_from(["rms", "rms_manual", "layer"])),
        norm_place=draw(st.sampled_from(["pre", "post", "sandwich"])),
        attn_impl=attn_impl,
        kv_repeat=draw(st.sampled_from(repeats)) if heads != kv_heads else "expand",
        qk_norm=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        rotary=rotary,
        abs_pos=draw(st.booleans()) if rotary == "none" else False,
        mask=draw(st.sampled_from(["none", "additive", "bool"])),
        mlp_act=draw(st.sampled_from(["gelu", "silu", "relu2"])),
        mlp_gated=draw(st.booleans()),
        experts=experts,
        top_k=draw(st.integers(1, 2)) if experts else 1,
        moe_combine=draw(st.sampled_from(["one_hot", "scatter"])) if experts else "one_hot",
        parallel=draw(st.booleans()),
        tied=draw(st.booleans()),
        shift=draw(st.sampled_from(["none", "caller", "forward"])),
        output=draw(st.sampled_from(["tensor", "object"])),
        seed=draw(st.integers(0, 9)),
    )


class LMOutput(NamedTuple):
    logits: torch.Tensor


class RMSNormManual(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6)
    return RMSNormManual(dim)


def rotary_tables(length: int, rot_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style cos/sin `[L, rot_dim]` (computed from the sequence length only)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """Rotates the first `cos.shape[-1]` features of `x [B, H, L, D]` (rotate_half); the rest pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1) if r < x.shape[-1] else rotated


def repeat_kv(x, n_rep: int, how: str):
    if n_rep == 1 or how == "enable_gqa":
        return x
    if how == "repeat_interleave":
        return x.repeat_interleave(n_rep, dim=1)
    B, Hk, L, D = x.shape  # transformers' repeat_kv
    return x[:, :, None, :, :].expand(B, Hk, n_rep, L, D).reshape(B, Hk * n_rep, L, D)


class Attention(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.q = nn.Linear(a.dim, a.heads * a.head_dim, bias=a.qkv_bias)
        self.k = nn.Linear(a.dim, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v = nn.Linear(a.dim, a.kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o = nn.Linear(a.heads * a.head_dim, a.dim, bias=False)
        if a.qk_norm:
            self.q_norm = make_norm(a.norm, a.head_dim)
            self.k_norm = make_norm(a.norm, a.head_dim)

    def forward(self, x, rope: Optional[tuple], mask: Optional[torch.Tensor]):
        a = self.a
        B, L, _ = x.shape
        q = self.q(x).view(B, L, a.heads, a.head_dim)
        k = self.k(x).view(B, L, a.kv_heads, a.head_dim)
        v = self.v(x).view(B, L, a.kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        n_rep = a.heads // a.kv_heads
        k, v = repeat_kv(k, n_rep, a.kv_repeat), repeat_kv(v, n_rep, a.kv_repeat)
        if a.attn_impl == "sdpa":
            gqa = dict(enable_gqa=True) if n_rep > 1 and a.kv_repeat == "enable_gqa" else {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)
            if mask is not None:
                scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(B, L, a.heads * a.head_dim))


def _act(name: str, x):
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, a: Arch, hidden: int):
        super().__init__()
        self.a = a
        self.up = nn.Linear(a.dim, hidden, bias=not a.mlp_gated)
        if a.mlp_gated:
            self.gate = nn.Linear(a.dim, hidden, bias=False)
        self.down = nn.Linear(hidden, a.dim, bias=not a.mlp_gated)

    def forward(self, x):
        h = _act(self.a.mlp_act, self.gate(x)) * self.up(x) if self.a.mlp_gated else _act(self.a.mlp_act, self.up(x))
        return self.down(h)


class MoE(nn.Module):
    """Top-k routing computed densely: every expert runs on every token, weighted by its routing weight (0 when
    not in the token's top-k). No data-dependent indexing."""

    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.router = nn.Linear(a.dim, a.experts, bias=False)
        self.experts = nn.ModuleList(MLP(a, 2 * a.dim) for _ in range(a.experts))

    def forward(self, x):
        logits = self.router(x)
        top_w, top_i = torch.topk(logits, self.a.top_k, dim=-1)
        top_w = torch.softmax(top_w, dim=-1)
        if self.a.moe_combine == "one_hot":
            gates = (F.one_hot(top_i, self.a.experts).to(x.dtype) * top_w.unsqueeze(-1)).sum(-2)
        else:
            gates = torch.zeros_like(logits).scatter(-1, top_i, top_w)
        out = None
        for e, expert in enumerate(self.experts):
            term = gates[..., e:e + 1] * expert(x)
            out = term if out is None else out + term
        return out


class Block(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.a = a
        self.attn = Attention(a)
        self.mlp = MoE(a) if a.experts else MLP(a, 3 * a.dim)
        self.norm1 = make_norm(a.norm, a.dim)
        if not (a.parallel and a.norm_place != "post"):
            self.norm2 = make_norm(a.norm, a.dim)
        if a.norm_place == "sandwich":
            self.post_attn = make_norm(a.norm, a.dim)
            self.post_mlp = make_norm(a.norm, a.dim)

    def forward(self, x, rope, mask):
        a = self.a
        if a.norm_place == "post":
            if a.parallel:
                return self.norm1(x + self.attn(x, rope, mask) + self.mlp(x))
            x = self.norm1(x + self.attn(x, rope, mask))
            return self.norm2(x + self.mlp(x))
        sandwich = a.norm_place == "sandwich"
        post_attn = self.post_attn if sandwich else (lambda t: t)
        post_mlp = self.post_mlp if sandwich else (lambda t: t)
        if a.parallel:
            h = self.norm1(x)
            return x + post_attn(self.attn(h, rope, mask)) + post_mlp(self.mlp(h))
        x = x + post_attn(self.attn(self.norm1(x), rope, mask))
        return x + post_mlp(self.mlp(self.norm2(x)))


class ZooLM(nn.Module):
    """`init_std`: None keeps PyTorch's default initialisation (Linear: uniform(+-1/sqrt(fan_in)), Embedding:
    N(0, 1)); a float draws every Linear and Embedding weight and bias from N(0, init_std) instead, as
    transformers does (0.02), which makes attention flatter and contexts move less per committed token."""

    def __init__(self, arch: Arch, init_std: Optional[float] = None):
        super().__init__()
        self.arch = a = arch
        self.config = SimpleNamespace(vocab_size=VOCAB, mask_token_id=VOCAB - 1, shift_logits=a.shift == "caller",
                                      is_causal=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            self.embed = nn.Embedding(VOCAB, a.dim)
            self.pos = nn.Embedding(MAX_LEN, a.dim) if a.abs_pos else None
            self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
            self.final_norm = make_norm(a.norm, a.dim) if a.norm_place != "post" else None
            self.lm_head = nn.Linear(a.dim, VOCAB, bias=False)
            if init_std is not None:
                for m in self.modules():
                    if isinstance(m, (nn.Linear, nn.Embedding)):
                        nn.init.normal_(m.weight, std=init_std)
                        if getattr(m, "bias", None) is not None:
                            nn.init.normal_(m.bias, std=init_std)
            if a.tied:
                self.lm_head.weight = self.embed.weight
            for m in self.modules():  # norms away from the identity, so they matter
                if isinstance(m, (nn.LayerNorm, nn.RMSNorm, RMSNormManual)):
                    with torch.no_grad():
                        m.weight.add_(0.1 * torch.randn_like(m.weight))
        self.eval()

    def forward(self, input_ids, attention_mask=None):
        a = self.arch
        B, L = input_ids.shape
        x = self.embed(input_ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(L, device=input_ids.device))
        rope = None
        if a.rotary != "none":
            rope = rotary_tables(L, a.head_dim if a.rotary == "full" else a.head_dim // 2, input_ids.device)
        mask = None
        if a.mask != "none":
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            keep = attention_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, L]: which keys exist
            if a.mask == "bool":
                mask = keep
            else:
                mask = (1.0 - keep.to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, rope, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x)
        if a.shift == "forward":  # position i predicted from hidden state i - 1 (0 from itself)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return LMOutput(logits) if a.output == "object" else logits
