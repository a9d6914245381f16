"""One attention layer of a sparse step with the incremental update, as plain torch traced into the graph.

The compact (CPU) path's form of `delta_attention` (same contract, same rule, see `delta_attention.py`) for
attentions without a fixed memory or a soft-cap. Inductor compiles it with the rest of the graph; the attention
itself is three flash-attention calls (`_attend`), so no score matrix is stored whatever the length and the
number of changed rows:
- columns: the rows whose K/V changed this step (`kv_rows`), per sequence (`select_rows_per_sequence`). Every
  query row attends to those columns' old keys/values and to their new ones (two calls, each `(context, lse)`),
  and its cached `(context, lse)` drops the first and adds the second, both channels, in fp32: `O(L |A| D)` per
  sequence.
- exact rows: the changed rows, rows whose update would cancel (`CANCELLATION_FLOOR`), and rows whose
  cached `(context, lse)` is stale, recomputed over every key (the third call): `O(|E| L D)`.
- a row outside `query_rows` keeps its context but misses this step's changes: its lse is marked stale
  (`+inf`, `stale_rows`), so the next step that queries it recomputes it exactly.
On a dense step every row is exact and no column is updated incrementally.

Query heads are grouped by KV head (`[B, Hk, g * rows, D]`), so GQA/MQA attend without repeating K/V.
`k`, `v` are the complete K/V (the cache points, fresh on `kv_rows`); `k_prev`, `v_prev` hold the K/V of the
previous step (the old terms), refreshed here. Returns the context in `q`'s dtype with SDPA's `[B, L, H, D]`
memory layout, and the salient rows `[B, L]`; `stats` (this attention's row of the stats buffer) receives
`[salient, exact, incremental, query]`.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .compact_rows import select_rows_per_sequence
from .delta_attention import CANCELLATION_FLOOR, _additive, stale_rows
from .saliency import saliency_reference


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """`t [B, G, L, D]` at the rows `index [B, r]` of each sequence, fp32: `[B, G, r, D]` (one `index_select`).
    Operands are built from such 2-D gathers: Inductor cannot order the strides of a buffer whose data-dependent
    axis sits next to a size-1 one (a single KV head, one query per KV head)."""
    B, G, L, D = t.shape
    base = (torch.arange(B, device=t.device)[:, None, None] * G + torch.arange(G, device=t.device)[:, None]) * L
    flat = t.to(torch.float32).reshape(B * G * L, D).index_select(0, (base + index[:, None, :]).reshape(-1))
    return flat.view(B, G, index.shape[1], D)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """`(context, lse)` of `q [B, G, M, D]` over `k`, `v` `[B, G, N, D]` with the additive `bias [B, G, M, N]` (or
    None), fp32. A row that attends to no column (bias `-inf` everywhere) gets context 0 and lse 0, as from the CPU
    kernel: callers mask such rows themselves. On CPU, the flash kernel SDPA itself lowers to (it returns the lse,
    and stores no score matrix); elsewhere (the compact path forced onto a GPU) `attend_math`."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                           scale=scale)
    return attend_math(q, k, v, bias, scale)


def attend_math(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """`_attend` as a plain product (scores stored)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1)
    lse = torch.where(lse == -math.inf, 0.0, lse)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def incremental_attention_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Tensor,
                               query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_prev: Tensor,
                               v_prev: Tensor, ctx_cache: Tensor, lse_cache: Tensor, stats: Tensor, scale: float,
                               tau: float) -> tuple[Tensor, Tensor]:
    B, H, L, D = q.shape
    Hk, g = k.shape[1], H // k.shape[1]
    qf, kf, vf = q.to(torch.float32), k.to(torch.float32), v.to(torch.float32)
    bias = None if attn_mask is None else _additive(attn_mask, B, L, L).expand(B, H, L, L)  # fp32 additive
    stale = stale_rows(lse_cache)

    # incremental: every row over the changed columns, old and new terms, each an attention over those columns
    changed = kv_rows & ~dense
    cols = select_rows_per_sequence(changed)  # [B, n]
    n = cols.shape[1]
    col_bias = torch.where(changed.gather(1, cols), 0.0, -math.inf)[:, None, None, :]  # [B, 1, 1, n]
    if bias is not None:
        col_bias = col_bias + bias.gather(3, cols[:, None, None, :].expand(B, H, L, n))
    col_bias = col_bias.expand(B, H, L, n)
    reached = (col_bias > -math.inf).any(-1)  # [B, H, L]: rows with a changed column they attend to
    gq = qf.reshape(B, Hk, g * L, D)  # query heads grouped by KV head
    gb = col_bias.reshape(B, Hk, g * L, n)
    ctx_old, lse_old = _attend(gq, _rows(k_prev, cols), _rows(v_prev, cols), gb, scale)
    ctx_new, lse_new = _attend(gq, _rows(kf, cols), _rows(vf, cols), gb, scale)
    lse_old, lse_new = (torch.where(reached, t.reshape(B, H, L), -math.inf) for t in (lse_old, lse_new))
    lse_known = torch.where(lse_cache == math.inf, 0.0, lse_cache)
    m = torch.maximum(lse_known, lse_new)
    base, w_old, w_new = torch.exp(lse_known - m), torch.exp(lse_old - m), torch.exp(lse_new - m)
    rest = base - w_old
    den = rest + w_new
    ctx = (ctx_cache * base[..., None] - ctx_old.reshape(B, H, L, D) * w_old[..., None]
           + ctx_new.reshape(B, H, L, D) * w_new[..., None]) / den[..., None]
    lse = m + torch.log(den)
    cancelled = (rest < CANCELLATION_FLOOR * base).any(1)

    # exact: the changed, cancelling and stale rows, over every key
    exact = (kv_rows | dense | cancelled | stale) & query_rows
    incremental = query_rows & ~exact & changed.any(1, keepdim=True)
    rows = select_rows_per_sequence(exact)  # [B, r]
    r = rows.shape[1]
    rq = _rows(qf, rows).view(B, Hk, g * r, D)  # query heads grouped by KV head
    rb = None if bias is None else bias.gather(2, rows[:, None, :, None].expand(B, H, r, L)).reshape(B, Hk, g * r, L)
    ctx_rows, lse_rows = _attend(rq, kf, vf, rb, scale)
    ctx = ctx.scatter(2, rows[:, None, :, None].expand(B, H, r, D), ctx_rows.reshape(B, H, r, D))
    lse = lse.scatter(2, rows[:, None, :].expand(B, H, r), lse_rows.reshape(B, H, r))

    new = (exact | incremental)[:, None, :]
    new_ctx = torch.where(new[..., None], ctx, ctx_cache)
    new_lse = torch.where(new, lse, torch.where(query_rows[:, None, :], lse_cache, math.inf))
    salient = saliency_reference(new_ctx, ctx_cache, query_rows, always_rows, tau)
    ctx_cache.copy_(new_ctx)
    lse_cache.copy_(new_lse)
    k_prev.copy_(k)
    v_prev.copy_(v)
    stats.copy_(torch.stack([salient.sum(), exact.sum(), incremental.sum(), query_rows.sum()]))
    return new_ctx.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2), salient
