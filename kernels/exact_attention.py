"""One attention layer of a sparse step with every query row exact, as plain torch traced into the graph.

The compact (CPU) path's form of `delta_attention` when the key length is at most `exact_below` and the
attention has neither a fixed memory nor a soft-cap: `k` and `v` are complete (the K/V cache points, fresh
on the changed rows), so one SDPA call gives every row's new context. Inductor compiles the saliency
test and the cache writes with the rest of the graph, where the custom op would pay its per-call Python
work in each layer. Same contract as `delta_attention`: contexts of rows outside `query_rows` are kept,
`stats` (this attention's row of the stats buffer) receives `[salient, exact, incremental, query rows]`, and the
context cache is updated in place.
On a dense step `query_rows` and `always_rows` are every row, so every row is recomputed and salient.
"""
from typing import Optional

import torch
from torch import Tensor

from .saliency import saliency_reference


def exact_attention_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], query_rows: Tensor,
                         always_rows: Tensor, ctx_cache: Tensor, stats: Tensor, scale: float,
                         tau: float) -> tuple[Tensor, Tensor]:
    new = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    ctx, salient = update_context(new.to(torch.float32), ctx_cache, query_rows, always_rows, stats, tau)
    return ctx.to(q.dtype), salient


def update_context(new: Tensor, ctx_cache: Tensor, query_rows: Tensor, always_rows: Tensor, stats: Tensor,
                   tau: float, test: bool = True) -> tuple[Tensor, Tensor]:
    """Every query row's new fp32 context `new` against the cache: the saliency test, the cache write and the
    stats of a step whose query rows were all computed exactly (also `delta_attention`'s one-SDPA path).
    `test=False` skips the cosines, for a caller that knows every query row is in `always_rows` (salient whatever
    its cosine: a dense step)."""
    ctx = torch.where(query_rows[:, None, :, None], new, ctx_cache)
    salient = saliency_reference(ctx, ctx_cache, query_rows, always_rows, tau) if test else always_rows & query_rows
    ctx_cache.copy_(ctx)
    n_query = query_rows.sum()
    stats.copy_(torch.stack([salient.sum(), n_query, torch.zeros_like(n_query), n_query]))
    return ctx, salient
