"""Triton kernels of the delta attention (`delta_attention.py` defines the op and its reference).

- `_rows_attention_kernel`: exact attention for the query rows of a per-batch index (`row_index.py`) over the
  full K/V cache, flash style (online softmax over key blocks), writing context and log-sum-exp in fp32.
- `_incremental_kernel`: for the other query rows, the update over the changed key/value columns only, both
  channels: the old terms `exp(q.k_old) v_old` leave the cached `(context, lse)` and the new ones enter,
  `O(|A| d)` per row, streaming over column blocks with a running maximum. A row whose changed columns held
  more than `1 - CANCELLATION_FLOOR` of its softmax mass in some head is flagged and recomputed exactly.

Queries `[B, H, Lq, D]`, keys and values `[B, Hk, Lk, D]` (`H % Hk == 0`: GQA/MQA), any strides; an optional
additive fp32 mask indexed `[b, h, query, key]` through its strides (0 for broadcast axes); any `scale`; an optional
soft-cap of the scores before the mask (`softcap * tanh(s / softcap)`, Gemma 2);
`Lq != Lk` works in both kernels. `delta_attention_triton` runs one whole sparse step of the op (self-attention over
the sequence, `Lq == Lk`, plus an optional fixed memory before it: the exact rows then read `P + Lk` keys, as
DiffusionGemma's decoder does) without a host synchronisation.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import launch
from .delta_attention import CANCELLATION_FLOOR, _additive, _keys, stale_rows
from .row_index import row_index
from .saliency import saliency
from .triton_dot import dot


@triton.jit
def _tile(COUNT, H, G, BLOCK_M: tl.constexpr):
    """This program's batch, head, key/value head, the batch's row count and the first index slot of its tile."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    return b, h, h // G, tl.load(COUNT + b), tl.program_id(1) * BLOCK_M


@triton.jit
def _query_rows(Q, INDEX, b, h, first, count, Lq, D, sqb, sqh, sql, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile's index slots: (valid, query rows, head-dim offsets, their mask, the fp32 queries [BLOCK_M, BLOCK_D])."""
    slots = first + tl.arange(0, BLOCK_M)
    valid = slots < count
    rows = tl.load(INDEX + b * Lq + slots, mask=valid, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sql + offs_d[None, :],
                mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    return valid, rows, offs_d, d_ok, q


@triton.jit
def _scores(q, k, scale, softcap, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """`q @ k^T * scale` in fp32, soft-capped to `softcap * tanh(s / softcap)` when SOFTCAP (Gemma 2)."""
    s = dot(q, tl.trans(k.to(tl.float32)), IEEE) * scale
    if SOFTCAP:
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # tanh
    return s


@triton.jit
def _rows_attention_kernel(
    Q, K, V, MASK, INDEX, COUNT, CTX, LSE, H, G, Lq, Lk, D, scale, softcap,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, smb, smh, smq, smk, scb, sch, scl, slb, slh,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, hk, count, first = _tile(COUNT, H, G, BLOCK_M)
    if first >= count:
        return
    valid, rows, offs_d, d_ok, q = _query_rows(Q, INDEX, b, h, first, count, Lq, D, sqb, sqh, sql, BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < Lk
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + hk * skh + cols[:, None] * skl + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svl + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, scale, softcap, IEEE, SOFTCAP)
        if HAS_MASK:
            s += tl.load(MASK + b * smb + h * smh + rows[:, None] * smq + cols[None, :] * smk,
                         mask=valid[:, None] & c_ok[None, :], other=0.0)
        s = tl.where(c_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p, v.to(tl.float32), IEEE)
        m_i = m_new
    ctx = acc / l_i[:, None]
    tl.store(CTX + b * scb + h * sch + rows[:, None] * scl + offs_d[None, :], ctx, mask=valid[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + rows, m_i + tl.log(l_i), mask=valid)


@triton.jit
def _incremental_kernel(
    Q, K_OLD, V_OLD, K_NEW, V_NEW, MASK, ROWS, ROW_COUNT, COLS, COL_COUNT, CTX, LSE, CANCELLED,
    H, G, Lq, Lk, D, scale, softcap, floor,
    sqb, sqh, sql, sob, soh, sol, spb, sph, spl, snb, snh, snl, swb, swh, swl,
    smb, smh, smq, smk, scb, sch, scl, slb, slh,
    HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, hk, count, first = _tile(ROW_COUNT, H, G, BLOCK_M)
    if first >= count:
        return
    valid, rows, offs_d, d_ok, q = _query_rows(Q, ROWS, b, h, first, count, Lq, D, sqb, sqh, sql, BLOCK_M, BLOCK_D)
    m_i = tl.load(LSE + b * slb + h * slh + rows, mask=valid, other=0.0)  # running max, starts at the old lse
    base = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)  # exp(lse_old - m_i): the old softmax mass
    sum_old = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_new = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_old = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_new = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_cols = tl.load(COL_COUNT + b)
    for n0 in range(0, n_cols, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < n_cols
        cols = tl.load(COLS + b * Lk + j, mask=j_ok, other=0).to(tl.int64)
        kv_ok = j_ok[:, None] & d_ok[None, :]
        k_old = tl.load(K_OLD + b * sob + hk * soh + cols[:, None] * sol + offs_d[None, :], mask=kv_ok, other=0.0)
        v_old = tl.load(V_OLD + b * spb + hk * sph + cols[:, None] * spl + offs_d[None, :], mask=kv_ok, other=0.0)
        k_new = tl.load(K_NEW + b * snb + hk * snh + cols[:, None] * snl + offs_d[None, :], mask=kv_ok, other=0.0)
        v_new = tl.load(V_NEW + b * swb + hk * swh + cols[:, None] * swl + offs_d[None, :], mask=kv_ok, other=0.0)
        s_old = _scores(q, k_old, scale, softcap, IEEE, SOFTCAP)
        s_new = _scores(q, k_new, scale, softcap, IEEE, SOFTCAP)
        if HAS_MASK:
            bias = tl.load(MASK + b * smb + h * smh + rows[:, None] * smq + cols[None, :] * smk,
                           mask=valid[:, None] & j_ok[None, :], other=0.0)
            s_old += bias
            s_new += bias
        s_old = tl.where(j_ok[None, :], s_old, float("-inf"))
        s_new = tl.where(j_ok[None, :], s_new, float("-inf"))
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s_old, axis=1), tl.max(s_new, axis=1)))
        alpha = tl.exp(m_i - m_new)
        p_old = tl.exp(s_old - m_new[:, None])
        p_new = tl.exp(s_new - m_new[:, None])
        base = base * alpha
        sum_old = sum_old * alpha + tl.sum(p_old, axis=1)
        sum_new = sum_new * alpha + tl.sum(p_new, axis=1)
        acc_old = acc_old * alpha[:, None] + dot(p_old, v_old.to(tl.float32), IEEE)
        acc_new = acc_new * alpha[:, None] + dot(p_new, v_new.to(tl.float32), IEEE)
        m_i = m_new
    rest = base - sum_old
    den = rest + sum_new
    c_ptrs = CTX + b * scb + h * sch + rows[:, None] * scl + offs_d[None, :]
    c_ok = valid[:, None] & d_ok[None, :]
    c0 = tl.load(c_ptrs, mask=c_ok, other=0.0)
    ctx = (c0 * base[:, None] - acc_old + acc_new) / den[:, None]
    tl.store(c_ptrs, ctx, mask=c_ok)
    tl.store(LSE + b * slb + h * slh + rows, m_i + tl.log(den), mask=valid)
    tl.store(CANCELLED + b * Lq + rows, tl.full((BLOCK_M,), 1, dtype=tl.int8), mask=valid & (rest < floor * base))


def _strides(t: Optional[Tensor], n: int) -> tuple:
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def _blocks(device: torch.device, D: int) -> dict:
    block_d = max(triton.next_power_of_2(D), 16)
    if device.type == "cpu":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)  # the interpreter: few programs
    return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=block_d, num_warps=4)


def rows_attention(q, k, v, mask, index, count, ctx, lse, scale, softcap=0.0, **blocks) -> None:
    """Exact attention for the rows `index[b, :count[b]]` of every head: writes `ctx [B, H, Lq, D]` and
    `lse [B, H, Lq]` (fp32, last axis contiguous) there."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    cfg = {**_blocks(q.device, D), **blocks}
    m4 = _strides(mask, 4)
    launch(_rows_attention_kernel)[(B * H, triton.cdiv(Lq, cfg["BLOCK_M"]))](
        q, k, v, mask if mask is not None else q, index, count, ctx, lse, H, H // Hk, Lq, Lk, D, float(scale),
        float(softcap), *_strides(q, 3), *_strides(k, 3), *_strides(v, 3), *m4, *_strides(ctx, 3), *_strides(lse, 2),
        HAS_MASK=mask is not None, SOFTCAP=bool(softcap), IEEE=q.dtype == torch.float32, **cfg)


def incremental_update(q, k_old, v_old, k_new, v_new, mask, rows, row_count, cols, col_count, ctx, lse, scale,
                       softcap=0.0, **blocks) -> Tensor:
    """Updates `(ctx, lse)` of the rows `rows[b, :row_count[b]]` for the columns `cols[b, :col_count[b]]` whose
    keys/values went from `(k_old, v_old)` to `(k_new, v_new)`. Returns the rows flagged for an exact
    recomputation (cancellation), bool `[B, Lq]`."""
    B, H, Lq, D = q.shape
    Hk, Lk = k_old.shape[1], k_old.shape[2]
    cancelled = torch.zeros(B, Lq, dtype=torch.int8, device=q.device)
    cfg = {**_blocks(q.device, D), **blocks}
    launch(_incremental_kernel)[(B * H, triton.cdiv(Lq, cfg["BLOCK_M"]))](
        q, k_old, v_old, k_new, v_new, mask if mask is not None else q, rows, row_count, cols, col_count, ctx, lse,
        cancelled, H, H // Hk, Lq, Lk, D, float(scale), float(softcap), CANCELLATION_FLOOR,
        *_strides(q, 3), *_strides(k_old, 3), *_strides(v_old, 3), *_strides(k_new, 3), *_strides(v_new, 3),
        *_strides(mask, 4), *_strides(ctx, 3), *_strides(lse, 2),
        HAS_MASK=mask is not None, SOFTCAP=bool(softcap), IEEE=q.dtype == torch.float32, **cfg)
    return cancelled.view(torch.bool)


def _additive_mask(mask: Optional[Tensor], B: int, H: int, Lq: int, Lk: int) -> Optional[Tensor]:
    """The mask as an fp32 additive tensor viewed as `[B, H, Lq, Lk]` (broadcast axes stride 0)."""
    return None if mask is None else _additive(mask, B, Lq, Lk).expand(B, H, Lq, Lk)


def delta_attention_triton(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_cache, v_cache, ctx_cache,
                           lse_cache, stats, scale, tau, k_memory=None, v_memory=None, softcap=0.0
                           ) -> tuple[Tensor, Tensor]:
    """One sparse (or, with `dense` set, dense) step of `dyllm::delta_attention`, all on the device:
    the same contract as `delta_attention_reference`. With a memory (`k_memory, v_memory [B, Hk, P, D]`) the exact
    rows attend to the `P + L` keys; the incremental update touches sequence columns only (the mask's last `L`)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    P = 0 if k_memory is None else k_memory.shape[2]
    mask = _additive_mask(attn_mask, B, H, Lq, P + Lk)
    sequence_mask = None if mask is None else mask.narrow(3, P, Lk)
    dense_ = dense.to(torch.bool)
    old_ctx = ctx_cache.clone()
    changed = torch.ones(B, Lk, dtype=torch.bool, device=q.device) if kv_rows is None else kv_rows | dense_
    query = query_rows | dense_
    if Lq != Lk:
        raise ValueError(f"delta attention needs self-attention over the token axis (query length {Lq}, key "
                         f"length {Lk}): the kernels take Lq != Lk, the op's row bookkeeping does not yet")
    exact = (changed | stale_rows(lse_cache)) & query
    incremental = query & exact.logical_not() & changed.any(1, keepdim=True)

    # incremental rows first, while the cache still holds the old keys and values
    rows, row_count = row_index(incremental)
    cols, col_count = row_index(changed)
    cancelled = incremental_update(q, k_cache, v_cache, k, v, sequence_mask, rows, row_count, cols, col_count,
                                   ctx_cache, lse_cache, scale, softcap)
    keep = changed.logical_not().view(B, 1, Lk, 1)
    torch.where(keep, k_cache, k, out=k_cache)
    torch.where(keep, v_cache, v, out=v_cache)
    exact = exact | cancelled
    incremental = incremental & cancelled.logical_not()
    rows, row_count = row_index(exact)
    rows_attention(q, _keys(k_memory, k_cache), _keys(v_memory, v_cache), mask, rows, row_count, ctx_cache, lse_cache,
                   scale, softcap)

    salient = saliency(ctx_cache, old_ctx, query_rows, always_rows, tau) | dense_
    lse_cache.masked_fill_(query.logical_not().unsqueeze(1), math.inf)  # stale until queried again (`stale_rows`)
    n_query = torch.where(dense_, B * Lq, query_rows.sum())
    counts = torch.stack([salient.sum(), exact.sum(), incremental.sum(), n_query]).to(stats.dtype)
    # index_copy_, not copy_: copy_ between fake CUDA tensors fails on a CPU-only torch (test_lowering traces this)
    stats.index_copy_(0, torch.arange(4, device=stats.device), counts)
    return ctx_cache, salient
