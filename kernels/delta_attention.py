"""`dyllm::delta_attention`: one attention layer of a sparse step, with its caches and saliency test.

Inputs are in SDPA layout: `q [B, H, L, D]`, `k, v [B, Hk, L, D]` (`H % Hk == 0`), an optional additive
or bool mask broadcastable to `[B, H, L, L]`. `k` and `v` are valid on the rows `kv_rows` only (the keys
that changed since the previous step); `q` is valid on every row.

Per query row in `query_rows`:
- rows in `kv_rows`: exact attention over the full (updated) K/V cache;
- other rows: incremental softmax over the changed columns only, both channels, in fp32. The row keeps
  `(context, lse)`; the old terms `exp(q.k_old_j) v_old_j` are removed and the new ones added, `O(|A| D)`.
  Exact when `q` did not change. When the changed columns held more than `1 - CANCELLATION_FLOOR` of
  the row's softmax mass, the subtraction would lose precision: that row is recomputed exactly.
Rows outside `query_rows` keep their cached context.

Saliency: a query row is salient when `cos(new context, cached context) < tau` over all heads; with
`tau >= 1` any change at all makes it salient (exactness). Rows in `always_rows` (the tokens that
changed at the model's input: their whole residual stream moved) are salient whatever their cosine. On a dense step (`dense` set) every row is
computed exactly and every row is salient (caches are refilled).

`stats[layer]` receives `[salient rows, exact rows, incremental rows, query rows]` of this call.
"""
import math
from typing import Optional

import torch
from torch import Tensor

CANCELLATION_FLOOR = 1e-2


def _additive(mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _mask_block(mask: Optional[Tensor], b: int, hk: int, g: int, qi: Tensor, kj: Optional[Tensor]):
    """Mask for batch b, query rows qi, key columns kj (None = all), shaped to broadcast with [Hk, g, n, m]."""
    if mask is None:
        return 0.0
    m = mask[b if mask.shape[0] > 1 else 0] if mask.dim() == 4 else mask
    while m.dim() < 3:
        m = m.unsqueeze(0)
    m = m[:, qi] if m.shape[1] > 1 else m
    if kj is not None:
        m = m[..., kj] if m.shape[-1] > 1 else m
    return m.unflatten(0, (hk, g)) if m.shape[0] > 1 else m.unsqueeze(0)


def _exact(qb, kb, vb, mask_b, scale):
    """qb [Hk, g, n, D], kb/vb [Hk, 1, L, D] -> context [Hk, g, n, D], lse [Hk, g, n] (fp32)."""
    s = (qb @ kb.transpose(-2, -1)) * scale + mask_b
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ vb, lse


def delta_attention_reference(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache,
                              ctx_cache, lse_cache, stats, layer, scale, tau):
    B, H, L, D = q.shape
    Hk = k.shape[1]
    g = H // Hk
    f32 = torch.float32
    mask = _additive(attn_mask, f32)
    old_ctx = ctx_cache.clone()
    counts = torch.zeros(3, dtype=torch.int64)
    if bool(dense):
        k_cache.copy_(k)
        v_cache.copy_(v)
    for b in range(B):
        qb = q[b].to(f32).unflatten(0, (Hk, g))
        all_rows = torch.arange(L, device=q.device)
        if bool(dense):
            exact_rows, incr_rows, cols = all_rows, all_rows[:0], all_rows[:0]
        else:
            changed = kv_rows[b] if kv_rows is not None else torch.ones(L, dtype=torch.bool, device=q.device)
            cols = changed.nonzero().squeeze(1)
            exact_rows = (changed & query_rows[b]).nonzero().squeeze(1)
            incr_rows = (~changed & query_rows[b]).nonzero().squeeze(1) if cols.numel() else all_rows[:0]
            k_old = k_cache[b][:, cols].to(f32).unsqueeze(1)
            v_old = v_cache[b][:, cols].to(f32).unsqueeze(1)
            k_cache[b][:, cols] = k[b][:, cols]
            v_cache[b][:, cols] = v[b][:, cols]
        kb = k_cache[b].to(f32).unsqueeze(1)
        vb = v_cache[b].to(f32).unsqueeze(1)
        if incr_rows.numel():
            qr = qb[:, :, incr_rows]
            s_old = (qr @ k_old.transpose(-2, -1)) * scale + _mask_block(mask, b, Hk, g, incr_rows, cols)
            s_new = (qr @ kb[:, :, cols].transpose(-2, -1)) * scale + _mask_block(mask, b, Hk, g, incr_rows, cols)
            lse0 = lse_cache[b][:, incr_rows].unflatten(0, (Hk, g))
            c0 = ctx_cache[b][:, incr_rows].unflatten(0, (Hk, g))
            m = torch.maximum(lse0, torch.maximum(s_old.amax(-1), s_new.amax(-1)))
            w_old = torch.exp(s_old - m.unsqueeze(-1))
            w_new = torch.exp(s_new - m.unsqueeze(-1))
            base = torch.exp(lse0 - m)
            rest = base - w_old.sum(-1)
            den = rest + w_new.sum(-1)
            ctx = (c0 * base.unsqueeze(-1) - w_old @ v_old + w_new @ vb[:, :, cols]) / den.unsqueeze(-1)
            lse = m + torch.log(den)
            ctx_cache[b][:, incr_rows] = ctx.flatten(0, 1)
            lse_cache[b][:, incr_rows] = lse.flatten(0, 1)
            cancelled = (rest < CANCELLATION_FLOOR * base).flatten(0, 1).any(0)
            exact_rows = torch.cat([exact_rows, incr_rows[cancelled]])
            incr_rows = incr_rows[~cancelled]
        if exact_rows.numel():
            ctx, lse = _exact(qb[:, :, exact_rows], kb, vb, _mask_block(mask, b, Hk, g, exact_rows, None), scale)
            ctx_cache[b][:, exact_rows] = ctx.flatten(0, 1)
            lse_cache[b][:, exact_rows] = lse.flatten(0, 1)
        counts += torch.tensor([exact_rows.numel(), incr_rows.numel(), int(query_rows[b].sum()) if not bool(dense) else L])
    if bool(dense):
        salient = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        new, old = ctx_cache.transpose(1, 2).flatten(2), old_ctx.transpose(1, 2).flatten(2)
        if tau >= 1.0:
            moved = (new != old).any(-1)
        else:
            cos = (new * old).sum(-1) / (new.norm(dim=-1) * old.norm(dim=-1)).clamp_min(1e-30)
            moved = cos < tau
        salient = (moved | always_rows) & query_rows
    stats[layer, 0] = salient.sum()
    stats[layer, 1:] = counts.to(stats.device)
    return ctx_cache.to(dtype=q.dtype, copy=True), salient


@torch.library.custom_op(
    "dyllm::delta_attention", mutates_args={"k_cache", "v_cache", "ctx_cache", "lse_cache", "stats"}
)
def delta_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Optional[Tensor],
    query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_cache: Tensor, v_cache: Tensor, ctx_cache: Tensor,
    lse_cache: Tensor, stats: Tensor, layer: int, scale: float, tau: float,
) -> tuple[Tensor, Tensor]:
    return delta_attention_reference(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache,
                                     ctx_cache, lse_cache, stats, layer, scale, tau)


@delta_attention.register_fake
def _(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache, ctx_cache, lse_cache, stats,
      layer, scale, tau):
    B, H, L, D = q.shape
    return q.new_empty(B, H, L, D), q.new_empty(B, L, dtype=torch.bool)
