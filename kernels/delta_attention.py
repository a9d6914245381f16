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
Rows outside `query_rows` keep their cached context; it misses this step's changes, so their lse is marked stale
(`+inf`) and the next step that queries them recomputes them exactly.

`k_memory, v_memory [B, Hk, P, D]` (optional): a fixed memory the queries also attend to, before the `L`
sequence keys (an encoder's KV cache, as DiffusionGemma's decoder reads it). The mask then covers `L x (P + L)`.
The memory is constant within a sequence (it is computed from other graph inputs, whose change starts a new
one), so its terms are part of the cached `(context, lse)` and only sequence columns are updated.
`softcap` (0: none): scores become `softcap * tanh(scores / softcap)` before the mask (Gemma 2).
Both run on both paths.

When the key length is at most `exact_below`, every query row is recomputed exactly by one SDPA call
instead: at short lengths that costs less than the incremental update's many small ops (CPU), and it
is exact. The backend sets it per device (`Options.exact_attention_below`). On the compact (CPU) path the
backend calls this op only for attentions with a memory or a soft-cap; the others trace `exact_attention.py` or
`incremental_attention.py` (the same rules) into the graph.

Saliency: a query row is salient when `cos(new context, cached context) < tau` over all heads; with
`tau >= 1` any change at all makes it salient (exactness). Rows in `always_rows` (the tokens that
changed at the model's input: their whole residual stream moved) are salient whatever their cosine. On a dense step (`dense` set) every row is
computed exactly and every row is salient (caches are refilled).

`stats` (this attention's row of the stats buffer, `[4]`) receives `[salient rows, exact rows, incremental rows,
query rows]` of this call.

Lowering: a `triton_op` (see `sparse_rows_linear.py`): on CUDA, beyond `exact_below`, Inductor sees the step's
Triton kernels (`delta_attention_triton.py`) and the torch ops between them; otherwise the opaque reference op
`dyllm::delta_attention_reference`.
"""
import math
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from .dispatch import use_triton
from .exact_attention import update_context
from .saliency import saliency_reference

CANCELLATION_FLOOR = 1e-2  # the Triton path (delta_attention_triton.py) uses the same rule


def stale_rows(lse_cache: Tensor) -> Tensor:
    """`[B, L]`: rows whose cached `(context, lse)` missed a step's changes (lse `+inf`, set while they were
    outside the query rows): they are recomputed exactly, never updated incrementally."""
    return (lse_cache == math.inf).any(1)


def _additive(mask: Optional[Tensor], B: int, L: int, Lk: int) -> Optional[Tensor]:
    """The mask as fp32 additive `[B, 1 or H, L, Lk]`."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        dropped = mask.logical_not()
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(dropped, -math.inf)
    mask = mask.to(torch.float32)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(B, mask.shape[1], L, Lk)


def _cap(scores: Tensor, softcap: float) -> Tensor:
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def _keys(memory: Optional[Tensor], cache: Tensor) -> Tensor:
    return cache if memory is None else torch.cat([memory.to(cache.dtype), cache], dim=2)


def _select(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per batch, the selected row indices padded to the largest count: `(index [B, n], valid [B, n])`."""
    n = max(int(rows.sum(1).max()), 1)
    order = torch.sort(rows.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]
    return order, rows.gather(1, order)


def _take(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """`t` indexed along `dim` by a per-batch `index [B, n]` (dims before `dim` other than 0 broadcast)."""
    shape = [index.shape[0]] + [1] * (dim - 1) + [index.shape[1]] + [1] * (t.dim() - dim - 1)
    expand = list(t.shape)
    expand[dim] = index.shape[1]
    return t.gather(dim, index.view(shape).expand(expand))


def _grouped(t: Tensor, hk: int) -> Tensor:
    """[B, H or 1, ...] -> [B, Hk, g or 1, ...] for broadcasting against grouped queries."""
    return t.unflatten(1, (hk, t.shape[1] // hk)) if t.shape[1] > 1 else t.unsqueeze(1)


def _write_rows(cache: Tensor, index: Tensor, valid: Tensor, values: Tensor) -> None:
    """cache[b, :, index[b, j]] = values[b, :, j] for the valid slots (token axis 2)."""
    b, j = valid.nonzero().unbind(1)
    cache[b, :, index[b, j]] = values[b, :, j]


def _output(ctx: Tensor, dtype: torch.dtype, copy: bool) -> Tensor:
    """The attention output `[B, H, L, D]` with SDPA's `[B, L, H, D]` memory layout (the usual
    `transpose(1, 2).reshape(B, L, H * D)` after attention then needs no copy). `copy`: ctx is a cache."""
    rows_first = ctx.transpose(1, 2)
    if copy:
        return rows_first.to(dtype, memory_format=torch.contiguous_format, copy=True).transpose(1, 2)
    return rows_first.to(dtype).contiguous().transpose(1, 2)  # no copy when SDPA's layout and dtype already


def _exact_all(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache, ctx_cache,
               stats, scale, tau, k_memory, v_memory, softcap):
    """Every query row exact (one SDPA call over the updated K/V cache)."""
    B, H, L, D = q.shape
    if bool(dense) or kv_rows is None:
        k_cache.copy_(k)
        v_cache.copy_(v)
    else:
        keep = ~kv_rows[:, None, :, None]
        torch.where(keep, k_cache, k, out=k_cache)  # elementwise: out may alias an input
        torch.where(keep, v_cache, v, out=v_cache)
    keys, values = _keys(k_memory, k_cache), _keys(v_memory, v_cache)
    if softcap:  # SDPA cannot soft-cap the scores
        Hk = keys.shape[1]
        s = _cap((_grouped(q.to(torch.float32), Hk) @ keys.to(torch.float32).unsqueeze(2).transpose(-2, -1)) * scale,
                 softcap)
        if attn_mask is not None:
            s = s + _grouped(_additive(attn_mask, B, L, keys.shape[2]), Hk)
        ctx = (torch.softmax(s, dim=-1) @ values.to(torch.float32).unsqueeze(2)).flatten(1, 2)
    elif bool(dense) or bool(query_rows.all()):
        ctx = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=attn_mask, scale=scale, enable_gqa=k.shape[1] != H).to(torch.float32)
    else:  # the query rows alone (response rows between prompt passes); the others keep their context
        rows, valid = _select(query_rows)
        mask = _additive(attn_mask, B, L, keys.shape[2])
        ctx_rows = torch.nn.functional.scaled_dot_product_attention(
            _take(q, rows, 2), keys, values, attn_mask=None if mask is None else _take(mask, rows, 2).to(q.dtype),
            scale=scale, enable_gqa=k.shape[1] != H)
        ctx = ctx_cache.clone()
        _write_rows(ctx, rows, valid, ctx_rows.to(torch.float32))
    if bool(dense):
        salient = torch.ones(B, L, dtype=torch.bool, device=q.device)
        ctx_cache.copy_(ctx)
        stats.copy_(torch.tensor([B * L, B * L, 0, B * L]))
    else:
        ctx, salient = update_context(ctx, ctx_cache, query_rows, always_rows, stats, tau)
    return _output(ctx, q.dtype, copy=False), salient


def delta_attention_reference(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache,
                              ctx_cache, lse_cache, stats, scale, tau, exact_below, k_memory=None,
                              v_memory=None, softcap=0.0):
    B, H, L, D = q.shape
    P = 0 if k_memory is None else k_memory.shape[2]
    if P + L <= exact_below:
        return _exact_all(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache,
                          ctx_cache, stats, scale, tau, k_memory, v_memory, softcap)
    Hk = k.shape[1]
    g = H // Hk
    mask = _additive(attn_mask, B, L, P + L)
    qg = q.to(torch.float32).unflatten(1, (Hk, g))
    old_ctx = ctx_cache.clone()
    is_dense = bool(dense)
    if is_dense:
        changed = torch.ones(B, L, dtype=torch.bool, device=q.device)
        exact, incremental = changed, ~changed
    else:
        changed = kv_rows if kv_rows is not None else torch.ones(B, L, dtype=torch.bool, device=q.device)
        exact = (changed | stale_rows(lse_cache)) & query_rows
        incremental = ~exact & query_rows if bool(changed.any()) else torch.zeros_like(changed)

    cols, col_valid = _select(changed)
    k_old = _take(k_cache, cols, 2).to(torch.float32)
    v_old = _take(v_cache, cols, 2).to(torch.float32)
    _write_rows(k_cache, cols, col_valid, _take(k, cols, 2))
    _write_rows(v_cache, cols, col_valid, _take(v, cols, 2))

    if bool(incremental.any()):
        k_new = _take(k_cache, cols, 2).to(torch.float32)
        v_new = _take(v_cache, cols, 2).to(torch.float32)
        col_mask = torch.zeros(B, 1, 1, cols.shape[1], device=q.device).masked_fill_(~col_valid[:, None, None], -math.inf)
        if mask is not None:
            col_mask = col_mask + _take(mask, cols + P, 3)
        col_mask = _grouped(col_mask, Hk)
        s_old = _cap((qg @ k_old.unsqueeze(2).transpose(-2, -1)) * scale, softcap) + col_mask
        s_new = _cap((qg @ k_new.unsqueeze(2).transpose(-2, -1)) * scale, softcap) + col_mask
        lse0 = lse_cache.unflatten(1, (Hk, g))
        c0 = ctx_cache.unflatten(1, (Hk, g))
        m = torch.maximum(lse0, torch.maximum(s_old.amax(-1), s_new.amax(-1)))
        w_old = torch.exp(s_old - m.unsqueeze(-1))
        w_new = torch.exp(s_new - m.unsqueeze(-1))
        base = torch.exp(lse0 - m)
        rest = base - w_old.sum(-1)
        den = rest + w_new.sum(-1)
        ctx = (c0 * base.unsqueeze(-1) - w_old @ v_old.unsqueeze(2) + w_new @ v_new.unsqueeze(2)) / den.unsqueeze(-1)
        cancelled = (rest < CANCELLATION_FLOOR * base).flatten(1, 2).any(1) & incremental
        exact = exact | cancelled
        incremental = incremental & ~cancelled
        keep = incremental[:, None, :]
        ctx_cache.copy_(torch.where(keep[..., None], ctx.flatten(1, 2), ctx_cache))
        lse_cache.copy_(torch.where(keep, (m + torch.log(den)).flatten(1, 2), lse_cache))

    if bool(exact.any()):
        rows, row_valid = _select(exact)
        keys, values = _keys(k_memory, k_cache), _keys(v_memory, v_cache)
        s = _grouped(_take(q.to(torch.float32), rows, 2), Hk) @ keys.to(torch.float32).unsqueeze(2).transpose(-2, -1)
        s = _cap(s * scale, softcap)
        if mask is not None:
            s = s + _grouped(_take(mask, rows, 2), Hk)
        lse = torch.logsumexp(s, dim=-1)
        ctx = torch.exp(s - lse.unsqueeze(-1)) @ values.to(torch.float32).unsqueeze(2)
        _write_rows(ctx_cache, rows, row_valid, ctx.flatten(1, 2))
        _write_rows(lse_cache.unsqueeze(-1), rows, row_valid, lse.flatten(1, 2).unsqueeze(-1))

    if is_dense:
        salient = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        salient = saliency_reference(ctx_cache, old_ctx, query_rows, always_rows, tau)
        lse_cache.masked_fill_(~query_rows[:, None, :], math.inf)
    stats.copy_(torch.stack([salient.sum(), exact.sum(), incremental.sum(),
                             query_rows.sum() if not is_dense else torch.tensor(B * L)]))
    return _output(ctx_cache, q.dtype, copy=True), salient


@torch.library.custom_op(
    "dyllm::delta_attention_reference", mutates_args={"k_cache", "v_cache", "ctx_cache", "lse_cache", "stats"}
)
def _reference_op(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Optional[Tensor],
    query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_cache: Tensor, v_cache: Tensor, ctx_cache: Tensor,
    lse_cache: Tensor, stats: Tensor, scale: float, tau: float, exact_below: int,
    k_memory: Optional[Tensor] = None, v_memory: Optional[Tensor] = None, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    return delta_attention_reference(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache,
                                     ctx_cache, lse_cache, stats, scale, tau, exact_below, k_memory, v_memory,
                                     softcap)


@_reference_op.register_fake
def _(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache, ctx_cache, lse_cache, stats,
      scale, tau, exact_below, k_memory=None, v_memory=None, softcap=0.0):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, L, dtype=torch.bool)


@triton_op("dyllm::delta_attention", mutates_args={"k_cache", "v_cache", "ctx_cache", "lse_cache", "stats"})
def delta_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Optional[Tensor],
    query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_cache: Tensor, v_cache: Tensor, ctx_cache: Tensor,
    lse_cache: Tensor, stats: Tensor, scale: float, tau: float, exact_below: int,
    k_memory: Optional[Tensor] = None, v_memory: Optional[Tensor] = None, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    if use_triton(q) and q.shape[2] > exact_below:
        from .delta_attention_triton import delta_attention_triton

        ctx, salient = delta_attention_triton(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache,
                                              v_cache, ctx_cache, lse_cache, stats, scale, tau, k_memory,
                                              v_memory, softcap)
        return _output(ctx, q.dtype, copy=True), salient
    return torch.ops.dyllm.delta_attention_reference(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense,
                                                     k_cache, v_cache, ctx_cache, lse_cache, stats, scale,
                                                     tau, exact_below, k_memory, v_memory, softcap)
