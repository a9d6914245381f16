"""One attention layer of a sparse step with the incremental update, as plain torch traced into the graph.

The compact (CPU) path's form of `delta_attention` (same contract, same rule, see `delta_attention.py`) for
attentions without a fixed memory or a soft-cap. Inductor compiles it with the rest of the graph, so a
layer costs a few small GEMMs and fused loops instead of one SDPA over every row:
- columns: the rows whose K/V changed this step (`kv_rows`), per sequence (`select_rows_per_sequence`);
  every query row's `(context, lse)` drops the old terms of those columns and adds the new ones, both
  channels, in fp32: `O(L |A| D)` per sequence.
- exact rows: the changed rows, rows whose update would cancel (`CANCELLATION_FLOOR`), and rows whose
  cached `(context, lse)` is stale, recomputed over every key: `O(|E| L D)`.
- a row outside `query_rows` keeps its context but misses this step's changes: its lse is marked stale
  (`+inf`), so the next step that queries it recomputes it exactly.
On a dense step every row is exact and no column is updated incrementally.

`k`, `v` are the complete K/V (the cache points, fresh on `kv_rows`); `k_prev`, `v_prev` hold the K/V of the
previous step (the old terms), refreshed here. Returns the context in `q`'s dtype with SDPA's `[B, L, H, D]`
memory layout, and the salient rows `[B, L]`; `stats[layer]` receives `[salient, exact, incremental, query]`.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .compact_rows import select_rows_per_sequence
from .delta_attention import CANCELLATION_FLOOR
from .saliency import saliency_reference


def _per_sequence(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """`t[b, ..., index[b, j], ...]` along `dim` (`t`'s leading axis is the sequence, `index` is `[B, n]`)."""
    shape = [index.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = index.shape[1]
    size = list(t.shape)
    size[0], size[dim] = index.shape[0], index.shape[1]
    return t.expand(index.shape[0], *t.shape[1:]).gather(dim, index.view(shape).expand(size))


def _mask_bias(attn_mask: Optional[Tensor], B: int, L: int) -> Optional[Tensor]:
    """The mask as fp32 additive `[B, 1 or H, L, L]` (a view when it broadcasts over the sequences)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.where(attn_mask, 0.0, -math.inf)
    attn_mask = attn_mask.to(torch.float32)
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask.expand(B, attn_mask.shape[1], L, L)


def _heads(t: Tensor, hk: int) -> Tensor:
    """[B, H or 1, ...] -> [B, Hk or 1, g or 1, ...], to broadcast against grouped queries."""
    return t.unflatten(1, (hk, t.shape[1] // hk)) if t.shape[1] > 1 else t.unsqueeze(1)


def incremental_attention_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Tensor,
                               query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_prev: Tensor,
                               v_prev: Tensor, ctx_cache: Tensor, lse_cache: Tensor, stats: Tensor, layer: int,
                               scale: float, tau: float) -> tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    Hk = k.shape[1]
    qf = q.to(torch.float32).unflatten(1, (Hk, H // Hk))  # [B, Hk, g, L, D]
    kf, vf = k.to(torch.float32).unsqueeze(2), v.to(torch.float32).unsqueeze(2)  # [B, Hk, 1, L, D]
    bias = _mask_bias(attn_mask, B, L)
    lse0, c0 = lse_cache.unflatten(1, (Hk, H // Hk)), ctx_cache.unflatten(1, (Hk, H // Hk))
    stale = (lse_cache == math.inf).any(1)

    # incremental: every row, over the changed columns
    changed = kv_rows & ~dense
    cols = select_rows_per_sequence(changed)  # [B, n]
    col_bias = torch.where(changed.gather(1, cols), 0.0, -math.inf)[:, None, None, None, :]
    if bias is not None:
        col_bias = col_bias + _heads(_per_sequence(bias, cols, 3), Hk)
    k_old, v_old = (_per_sequence(t.to(torch.float32), cols, 2).unsqueeze(2) for t in (k_prev, v_prev))
    k_new, v_new = (_per_sequence(t, cols, 3) for t in (kf, vf))
    s_old = (qf @ k_old.transpose(-2, -1)) * scale + col_bias  # [B, Hk, g, L, n]
    s_new = (qf @ k_new.transpose(-2, -1)) * scale + col_bias
    lse_known = torch.where(lse0 == math.inf, 0.0, lse0)
    m = torch.maximum(lse_known, torch.maximum(s_old.amax(-1), s_new.amax(-1)))
    w_old, w_new = torch.exp(s_old - m.unsqueeze(-1)), torch.exp(s_new - m.unsqueeze(-1))
    base = torch.exp(lse_known - m)
    rest = base - w_old.sum(-1)
    den = rest + w_new.sum(-1)
    ctx = (c0 * base.unsqueeze(-1) - w_old @ v_old + w_new @ v_new) / den.unsqueeze(-1)
    lse = m + torch.log(den)
    cancelled = (rest < CANCELLATION_FLOOR * base).flatten(1, 2).any(1)

    # exact: the changed, cancelling and stale rows, over every key
    exact = (kv_rows | dense | cancelled | stale) & query_rows
    incremental = query_rows & ~exact & changed.any(1, keepdim=True)
    rows = select_rows_per_sequence(exact)  # [B, m]
    s = (_per_sequence(qf, rows, 3) @ kf.transpose(-2, -1)) * scale  # [B, Hk, g, m, L]
    if bias is not None:
        s = s + _heads(_per_sequence(bias, rows, 2), Hk)
    lse_rows = torch.logsumexp(s, -1)
    ctx_rows = torch.exp(s - lse_rows.unsqueeze(-1)) @ vf
    slots = rows[:, None, None, :]
    ctx = ctx.scatter(3, slots.unsqueeze(-1).expand(ctx_rows.shape), ctx_rows)  # slots name distinct rows
    lse = lse.scatter(3, slots.expand(lse_rows.shape), lse_rows)

    new = (exact | incremental)[:, None, :]
    new_ctx = torch.where(new[..., None], ctx.flatten(1, 2), ctx_cache)
    new_lse = torch.where(new, lse.flatten(1, 2), torch.where(query_rows[:, None, :], lse_cache, math.inf))
    salient = saliency_reference(new_ctx, ctx_cache, query_rows, always_rows, tau)
    ctx_cache.copy_(new_ctx)
    lse_cache.copy_(new_lse)
    k_prev.copy_(k)
    v_prev.copy_(v)
    stats[layer].copy_(torch.stack([salient.sum(), exact.sum(), incremental.sum(), query_rows.sum()]))
    return new_ctx.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2), salient
