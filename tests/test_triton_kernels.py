"""The Triton kernels against their plain-torch references, on tiny shapes (the interpreter on CPU, the JIT on
CUDA): row compaction, sparse-row linear with its epilogues, saliency, exact rows attention, the incremental
update with its cancellation rule, and the whole delta-attention step through the op."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dyllm_fx import kernels  # noqa: F401
from dyllm_fx.kernels.delta_attention_triton import (CANCELLATION_FLOOR, _additive_mask, incremental_update,
                                                     rows_attention)
from dyllm_fx.kernels.dispatch import triton_on_cpu
from dyllm_fx.kernels.row_index import row_index_reference, row_index_triton
from dyllm_fx.kernels.saliency import saliency_reference, saliency_triton
from dyllm_fx.kernels.sparse_rows_linear_triton import sparse_rows_linear_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rand(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def mask_of(kind, B, L, g, p=0.4):
    """Row masks with the edge cases: none, one, all, random."""
    if kind == "none":
        return torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    if kind == "all":
        return torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    if kind == "one":
        m = torch.zeros(B, L, dtype=torch.bool)
        m[torch.randint(0, B, (1,), generator=g), torch.randint(0, L, (1,), generator=g)] = True
        return m.to(DEVICE)
    return (torch.rand(B, L, generator=g) < p).to(DEVICE)


KINDS = st.sampled_from(["none", "one", "all", "random"])


@settings(max_examples=25, **SETTINGS)
@given(G=st.integers(1, 3), L=st.integers(1, 70), kind=KINDS, seed=st.integers(0, 99))
def test_row_index_lists_every_set_row_once(G, L, kind, seed):
    mask = mask_of(kind, G, L, torch.Generator().manual_seed(seed))
    index, count = row_index_triton(mask, block=16)
    ref_index, ref_count = row_index_reference(mask)
    assert torch.equal(count.cpu(), ref_count.cpu())
    for g in range(G):
        n = int(count[g])
        assert sorted(index[g, :n].tolist()) == ref_index[g, :n].tolist()


@settings(max_examples=25, **SETTINGS)
@given(M=st.integers(1, 40), K=st.sampled_from([1, 7, 16, 33]), N=st.sampled_from([1, 5, 16, 24]), kind=KINDS,
       bias=st.booleans(), act=st.sampled_from([None, "silu", "gelu", "gelu_tanh", "relu2"]), gated=st.booleans(),
       residual=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_sparse_rows_linear_kernel_writes_exactly_the_indexed_rows(M, K, N, kind, bias, act, gated, residual, dtype,
                                                                   seed):
    g = torch.Generator().manual_seed(seed)
    x, w, w2 = rand(M, K, g=g, dtype=dtype), rand(N, K, g=g, dtype=dtype), rand(N, K, g=g, dtype=dtype)
    b, b2 = (rand(N, g=g, dtype=dtype), rand(N, g=g, dtype=dtype)) if bias else (None, None)
    res = rand(M, N, g=g, dtype=dtype) if residual else None
    rows = mask_of(kind, 1, M, g)
    index, count = row_index_triton(rows)
    out = torch.full((M, N), 7.0, device=DEVICE, dtype=dtype)
    sparse_rows_linear_triton(x, w, b, index[0], count, out, activation=act, weight2=w2 if gated else None,
                              bias2=b2 if gated else None, residual=res)
    f = x.float()
    y = torch.nn.functional.linear(f, w.float(), None if b is None else b.float())
    y = {None: y, "silu": torch.nn.functional.silu(y), "gelu": torch.nn.functional.gelu(y),
         "gelu_tanh": torch.nn.functional.gelu(y, approximate="tanh"), "relu2": torch.relu(y).square()}[act]
    if gated:
        y = y * torch.nn.functional.linear(f, w2.float(), None if b2 is None else b2.float())
    if residual:
        y = y + res.float()
    sel = rows[0]
    scale = max(y.abs().max().item(), 1.0)
    assert (out[sel].float() - y[sel]).abs().max().item() <= TOL[dtype] * scale if sel.any() else True
    assert (out[~sel] == 7.0).all()  # untouched


@settings(max_examples=25, **SETTINGS)
@given(B=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 9), D=st.sampled_from([1, 3, 8, 20]),
       tau=st.sampled_from([0.9, 0.99, 1.0]), kind=KINDS, seed=st.integers(0, 99))
def test_saliency_kernel_matches_reference_and_compacts(B, H, L, D, tau, kind, seed):
    g = torch.Generator().manual_seed(seed)
    old = rand(B, H, L, D, g=g)
    moved = torch.rand(B, 1, L, 1, generator=g).to(DEVICE)
    new = old + moved * rand(B, H, L, D, g=g) * (torch.rand(B, 1, L, 1, generator=g).to(DEVICE) < 0.5)
    query = mask_of("random", B, L, g, 0.8) | mask_of(kind, B, L, g)
    always = mask_of(kind, B, L, g, 0.2)
    salient, index, count = saliency_triton(new, old, query, always, tau)
    ref = saliency_reference(new, old, query, always, tau)
    assert torch.equal(salient, ref)
    n = int(count)
    assert n == int(ref.sum()) and sorted(index[:n].tolist()) == ref.view(-1).nonzero().squeeze(1).tolist()


def attention_reference(q, k, v, mask, scale):
    """fp32 context and lse of every query row (GQA by repeating keys)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse


def attention_case(data, same_length=False):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    B, Hk, G = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    Lq = data.draw(st.integers(1, 20))
    Lk = Lq if same_length else data.draw(st.integers(1, 20))
    D = data.draw(st.sampled_from([3, 8, 16, 24]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    q, k, v = rand(B, Hk * G, Lq, D, g=g, dtype=dtype), rand(B, Hk, Lk, D, g=g, dtype=dtype), rand(B, Hk, Lk, D, g=g,
                                                                                                    dtype=dtype)
    if data.draw(st.booleans()):  # keys/values in the [B, L, H, D] memory layout of a transposed projection
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    mask_kind = data.draw(st.sampled_from([None, "additive", "bool"]))
    mask = None
    if mask_kind:
        keep = torch.rand(B, 1, Lq, Lk, generator=g) < 0.8
        keep[..., 0] = True
        mask = keep.to(DEVICE) if mask_kind == "bool" else torch.zeros(B, 1, Lq, Lk).masked_fill(~keep, -1e9).to(DEVICE)
    scale = data.draw(st.sampled_from([1.0, 1 / math.sqrt(D)]))
    return q, k, v, _additive_mask(mask, B, Hk * G, Lq, Lk), scale, g, dtype


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_rows_attention_kernel_is_exact_on_the_indexed_rows(data):
    q, k, v, mask, scale, g, dtype = attention_case(data)
    B, H, Lq, D = q.shape
    rows = mask_of(data.draw(KINDS), B, Lq, g)
    index, count = row_index_triton(rows)
    ctx = torch.full((B, H, Lq, D), 5.0, device=DEVICE)
    lse = torch.full((B, H, Lq), 5.0, device=DEVICE)
    rows_attention(q, k, v, mask, index, count, ctx, lse, scale)
    ref_ctx, ref_lse = attention_reference(q, k, v, mask, scale)
    sel = rows[:, None, :].expand(B, H, Lq)
    assert torch.allclose(ctx[sel], ref_ctx[sel], atol=TOL[dtype]) and torch.allclose(lse[sel], ref_lse[sel], atol=TOL[dtype])
    assert (ctx[~sel] == 5.0).all() and (lse[~sel] == 5.0).all()


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_incremental_update_equals_full_attention_over_the_new_keys(data):
    q, k, v, mask, scale, g, dtype = attention_case(data)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cols = mask_of(data.draw(KINDS), B, Lk, g, 0.3)
    k_new = torch.where(cols[:, None, :, None], rand(*k.shape, g=g, dtype=dtype), k)
    v_new = torch.where(cols[:, None, :, None], rand(*v.shape, g=g, dtype=dtype), v)
    ctx, lse = attention_reference(q, k, v, mask, scale)
    ctx, lse = ctx.contiguous(), lse.contiguous()
    rows = mask_of("all", B, Lq, g)
    row_idx, row_count = row_index_triton(rows)
    col_idx, col_count = row_index_triton(cols)
    cancelled = incremental_update(q, k, v, k_new, v_new, mask, row_idx, row_count, col_idx, col_count, ctx, lse, scale)
    ref_ctx, ref_lse = attention_reference(q, k_new, v_new, mask, scale)
    # the rule: a row is flagged when the changed columns held more than 1 - floor of its old mass in a head
    s_old = q.float() @ k.float().repeat_interleave(H // k.shape[1], 1).transpose(-2, -1) * scale
    if mask is not None:
        s_old = s_old + mask
    p_old = torch.softmax(s_old, -1)
    rest = 1 - (p_old * cols[:, None, None, :]).sum(-1)
    near = (rest - CANCELLATION_FLOOR).abs() < 1e-3
    flagged = (rest < CANCELLATION_FLOOR)
    assert ((cancelled == flagged.any(1)) | near.any(1)).all()
    ok = ~cancelled[:, None, :].expand(B, H, Lq)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(ctx[ok], ref_ctx[ok], atol=tol * 10) and torch.allclose(lse[ok], ref_lse[ok], atol=tol * 10)


@pytest.mark.parametrize("mask_kind,memory,softcap", [(None, 0, 0.0), ("bool", 0, 0.0), ("bool", 5, 0.0), (None, 3, 0.0),
                                                       ("bool", 0, 2.0)])
@pytest.mark.parametrize("tau", [1.0, 0.9])
def test_delta_attention_op_triton_path_matches_reference_path(mask_kind, memory, softcap, tau):
    """The whole op, dense step then sparse steps: the Triton path returns what the reference path returns, also with
    a fixed memory of `memory` keys before the sequence (DiffusionGemma's decoder: query length != key length) and
    with soft-capped scores (Gemma 2; a small cap, so that it bends the scores)."""
    g = torch.Generator().manual_seed(0)
    B, Hk, G, L, D = 2, 2, 2, 12, 8
    H, scale = Hk * G, 1 / math.sqrt(D)
    k_memory, v_memory = (rand(B, Hk, memory, D, g=g) for _ in range(2)) if memory else (None, None)
    mask = None
    if mask_kind:
        mask = (torch.rand(B, 1, L, memory + L, generator=g) < 0.8).to(DEVICE)
        mask[..., 0] = True
    q, k, v = rand(B, H, L, D, g=g), rand(B, Hk, L, D, g=g), rand(B, Hk, L, D, g=g)
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=DEVICE)
    states = [[z(B, Hk, L, D), z(B, Hk, L, D), z(B, H, L, D), z(B, H, L), z(4, dtype=torch.long)] for _ in range(2)]
    query = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    for step in range(4):
        dense = torch.tensor(step == 0, device=DEVICE)
        rows = None if step == 0 else mask_of("random", B, L, g, 0.25)
        if rows is not None:
            k = torch.where(rows[:, None, :, None], rand(B, Hk, L, D, g=g), k)
            v = torch.where(rows[:, None, :, None], rand(B, Hk, L, D, g=g), v)
            q = torch.where(rows[:, None, :, None], rand(B, H, L, D, g=g), q)
        always = rows if rows is not None else mask_of("none", B, L, g)
        outs = []
        for use, state in zip([False, True], states):
            with triton_on_cpu(use) if DEVICE == "cpu" else torch.no_grad():
                outs.append(torch.ops.dyllm.delta_attention(q, k, v, mask, rows, query, always, dense, *state, scale,
                                                            tau, 0, k_memory, v_memory, softcap))
        (ref_out, ref_sal), (out, sal) = outs
        assert torch.allclose(out, ref_out, atol=1e-4) and torch.equal(sal, ref_sal)
        assert torch.equal(states[0][4][:3], states[1][4][:3])  # salient, exact, incremental rows


@pytest.mark.parametrize("policy", ["paper", "full"])
def test_backend_through_the_triton_kernels_reproduces_eager(policy, monkeypatch):
    """A whole model compiled at tau=1.0 with every op on its Triton path: the same logits as eager."""
    import dyllm_fx
    from dyllm_fx.kernels import delta_attention_triton, sparse_rows_linear_triton
    from dyllm_fx.models import dream_like

    launched = []
    for module, name in [(sparse_rows_linear_triton, "sparse_rows_linear_triton"),
                         (delta_attention_triton, "delta_attention_triton")]:
        def counting(*args, _f=getattr(module, name), _n=name, **kwargs):
            launched.append(_n)
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)

    torch._dynamo.reset()
    model = dream_like(hidden_size=32, num_layers=2, num_kv_heads=2, gqa_ratio=2, head_dim=8, vocab_size=61).to(DEVICE)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, policy=policy, lowering="eager", dense_steps=1,
                                                             exact_attention_below=0, compact_rows=False),
                             dynamic=False)  # the masked rows: the GPU path, whose kernels these are
    mask_id = model.config.mask_token_id
    ids = torch.full((2, 12), mask_id, device=DEVICE)
    ids[:, :4] = torch.arange(8, device=DEVICE).view(2, 4)
    steps = [ids.clone()]
    for pos in (5, 9, 4):
        ids[:, pos] = pos
        steps.append(ids.clone())
    with triton_on_cpu(DEVICE == "cpu"), torch.no_grad():
        for ids in steps:
            ref, out = model(ids).logits, compiled(ids).logits
            assert (ref - out).abs().max().item() <= 1e-4 and torch.equal(ref.argmax(-1), out.argmax(-1))
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps == 3
    assert launched.count("delta_attention_triton") == 2 * len(steps) and "sparse_rows_linear_triton" in launched
