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
  (`+inf`, `stale_rows`), so the next step that queries it recomputes it exactly.
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
from .delta_attention import CANCELLATION_FLOOR, _additive, stale_rows
from .saliency import saliency_reference


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """`t [B, G, L, D]` at the rows `index [B, r]` of each sequence: `[B * G * r, D]` (one `index_select`).
    Matmul operands are built from such 2-D gathers: Inductor cannot order the strides of a buffer whose
    data-dependent axis sits next to a size-1 one (a single KV head, one query per KV head)."""
    B, G, L, D = t.shape
    base = (torch.arange(B, device=t.device)[:, None, None] * G + torch.arange(G, device=t.device)[:, None]) * L
    return t.reshape(B * G * L, D).index_select(0, (base + index[:, None, :]).reshape(-1))


def incremental_attention_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Tensor,
                               query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_prev: Tensor,
                               v_prev: Tensor, ctx_cache: Tensor, lse_cache: Tensor, stats: Tensor, layer: int,
                               scale: float, tau: float) -> tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    Hk, g = k.shape[1], H // k.shape[1]
    qf, kf, vf = q.to(torch.float32), k.to(torch.float32), v.to(torch.float32)
    bias = None if attn_mask is None else _additive(attn_mask, B, L, L).expand(B, H, L, L)  # fp32 additive
    stale = stale_rows(lse_cache)
    heads = lambda t: t.reshape(B * Hk, g * t.shape[2], *t.shape[3:])  # [B, H, x, ...] -> [B * Hk, g * x, ...]

    # incremental: every row, over the changed columns' old and new keys/values (`n` each, one bmm for both).
    # Scores are laid out columns-outer, `[B * Hk, 2n, g * L]`: the reductions over the few columns then run as
    # vector ops along the rows, where rows-inner `[.., g * L, 2n]` left Inductor's loops a data-dependent inner
    # axis of a few elements, with an integer division per element.
    changed = kv_rows & ~dense
    cols = select_rows_per_sequence(changed)  # [B, n]
    n = cols.shape[1]
    col_bias = torch.where(changed.gather(1, cols), 0.0, -math.inf)[:, None, :, None]  # [B, 1, n, 1]
    if bias is not None:  # [B, H, L, L] -> the columns' [B, H, n, L]
        col_bias = col_bias + bias.gather(3, cols[:, None, None, :].expand(B, H, L, n)).transpose(2, 3)
    col_bias = col_bias.expand(B, H, n, L).reshape(B, Hk, g, n, L).transpose(2, 3).reshape(B * Hk, n, g * L)
    k_cols = torch.cat([_rows(t.to(torch.float32), cols).view(B * Hk, n, D) for t in (k_prev, kf)], 1)
    v_cols = torch.cat([_rows(t.to(torch.float32), cols).view(B * Hk, n, D) for t in (v_prev, vf)], 1)
    s = torch.bmm(k_cols, heads(qf).transpose(1, 2)) * scale + torch.cat([col_bias, col_bias], 1)  # [B*Hk, 2n, gL]
    lse0 = heads(lse_cache)  # [B * Hk, g * L]
    lse_known = torch.where(lse0 == math.inf, 0.0, lse0)
    m = torch.maximum(lse_known, s.amax(1))
    w = torch.exp(s - m.unsqueeze(1))  # old columns first, then new
    base = torch.exp(lse_known - m)
    rest = base - w.narrow(1, 0, n).sum(1)
    den = rest + w.narrow(1, n, n).sum(1)
    sign = torch.cat([w.new_full((n,), -1.0), w.new_ones(n)])
    ctx = (heads(ctx_cache) * base.unsqueeze(-1) + torch.bmm((w * sign[:, None]).transpose(1, 2), v_cols)) \
        / den.unsqueeze(-1)
    ctx, lse = ctx.view(B, H, L, D), (m + torch.log(den)).view(B, H, L)
    cancelled = (rest < CANCELLATION_FLOOR * base).view(B, H, L).any(1)

    # exact: the changed, cancelling and stale rows, over every key
    exact = (kv_rows | dense | cancelled | stale) & query_rows
    incremental = query_rows & ~exact & changed.any(1, keepdim=True)
    rows = select_rows_per_sequence(exact)  # [B, r]
    r = rows.shape[1]
    s = torch.bmm(_rows(qf, rows).view(B * Hk, g * r, D),
                  kf.reshape(B * Hk, L, D).transpose(1, 2)) * scale  # [B * Hk, g * r, L]
    if bias is not None:
        s = s + heads(bias.gather(2, rows[:, None, :, None].expand(B, H, r, L)))
    lse_rows = torch.logsumexp(s, -1)
    p = torch.exp(s - lse_rows.unsqueeze(-1))
    ctx_rows = torch.bmm(p, vf.reshape(B * Hk, L, D)).view(B, H, r, D)
    ctx = ctx.scatter(2, rows[:, None, :, None].expand(B, H, r, D), ctx_rows)  # slots name distinct rows
    lse = lse.scatter(2, rows[:, None, :].expand(B, H, r), lse_rows.view(B, H, r))

    new = (exact | incremental)[:, None, :]
    new_ctx = torch.where(new[..., None], ctx, ctx_cache)
    new_lse = torch.where(new, lse, torch.where(query_rows[:, None, :], lse_cache, math.inf))
    salient = saliency_reference(new_ctx, ctx_cache, query_rows, always_rows, tau)
    ctx_cache.copy_(new_ctx)
    lse_cache.copy_(new_lse)
    k_prev.copy_(k)
    v_prev.copy_(v)
    stats[layer].copy_(torch.stack([salient.sum(), exact.sum(), incremental.sum(), query_rows.sum()]))
    return new_ctx.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2), salient
