"""The compact path's attention step against full attention: traced into the graph as torch ops
(`kernels/incremental_attention.py`) and as one C++ call (`kernels/attention_step_cpp.py`), same contract."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dyllm_fx.kernels import attention_step_cpp
from dyllm_fx.kernels.compact_rows import select_rows_per_sequence
from dyllm_fx.kernels.incremental_attention import incremental_attention_step

STEPS = pytest.mark.parametrize("step", [incremental_attention_step, torch.ops.dyllm.attention_step.default],
                                ids=["torch", "cpp"])


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


class Layer:
    """One attention layer's caches and a step function over them."""

    def __init__(self, B, H, Hk, L, D, scale, tau=1.0):
        z = torch.zeros
        self.caches = [z(B, Hk, L, D), z(B, Hk, L, D), z(B, H, L, D), z(B, H, L)]
        self.stats = z(4, dtype=torch.long)
        self.scale, self.tau, self.B, self.L = scale, tau, B, L

    def __call__(self, q, k, v, mask, kv_rows, query=None, always=None, dense=False, step=incremental_attention_step):
        query = torch.ones(self.B, self.L, dtype=torch.bool) if query is None else query
        always = torch.zeros(self.B, self.L, dtype=torch.bool) if always is None else always
        return step(q, k, v, mask, kv_rows, query, always, torch.tensor(dense), *self.caches, self.stats,
                    self.scale, self.tau)

    @property
    def counts(self):
        return dict(zip(["salient", "exact", "incremental", "query"], self.stats.tolist()))


def _mask(kind, B, L, gen):
    if kind is None:
        return None
    keep = torch.rand(B, 1, L, L, generator=gen) < 0.8
    keep[..., 0] = True
    return keep if kind == "bool" else torch.zeros(B, 1, L, L).masked_fill(~keep, -1e9)


@STEPS
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), Hk=st.integers(1, 2), g=st.integers(1, 3), L=st.integers(2, 19),
       D=st.sampled_from([3, 4, 8, 20, 70]), mask_kind=st.sampled_from([None, "additive", "bool"]),
       seed=st.integers(0, 999), steps=st.integers(1, 4), p=st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_every_step_equals_full_attention(step, B, Hk, g, L, D, mask_kind, seed, steps, p):
    """Q, K and V change on a few rows per step (as a gated layer's do): every row's context equals full
    attention over the current Q/K/V, and only the changed rows (and cancelling ones) are exact."""
    gen = torch.Generator().manual_seed(seed)
    H, scale = Hk * g, 1 / math.sqrt(D)
    q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, Hk, L, D, generator=gen), \
        torch.randn(B, Hk, L, D, generator=gen)
    mask = _mask(mask_kind, B, L, gen)
    layer = Layer(B, H, Hk, L, D, scale)
    everyone = torch.ones(B, L, dtype=torch.bool)
    out, salient = layer(q, k, v, mask, everyone, dense=True, step=step)
    assert torch.allclose(out, sdpa(q, k, v, mask, scale), atol=1e-5) and salient.all()
    assert layer.counts == dict(salient=B * L, exact=B * L, incremental=0, query=B * L)
    for _ in range(steps):
        rows = torch.rand(B, L, generator=gen) < p
        q = torch.where(rows[:, None, :, None], torch.randn(B, H, L, D, generator=gen), q)
        k = torch.where(rows[:, None, :, None], torch.randn(B, Hk, L, D, generator=gen), k)
        v = torch.where(rows[:, None, :, None], torch.randn(B, Hk, L, D, generator=gen), v)
        out, salient = layer(q, k, v, mask, rows, step=step)
        assert torch.allclose(out, sdpa(q, k, v, mask, scale), atol=1e-4)
        counts = layer.counts
        assert counts["exact"] >= int(rows.sum())
        assert counts["exact"] + counts["incremental"] == L * int(rows.any(1).sum())  # sequences that changed
        if not rows.any():
            assert not salient.any() and counts["exact"] == 0


@STEPS
def test_cancelling_rows_are_recomputed_exactly(step):
    """A changed key that held nearly all of every row's attention mass: every row takes the exact path."""
    B, H, L, D = 1, 1, 6, 4
    q = torch.zeros(B, H, L, D)
    q[..., 0] = 10.0
    k = torch.zeros(B, H, L, D)
    k[0, 0, 2, 0] = 5.0
    v = torch.randn(B, H, L, D)
    layer = Layer(B, H, H, L, D, 1.0)
    layer(q, k, v, None, torch.ones(B, L, dtype=torch.bool), dense=True, step=step)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, 2] = True
    k2 = k.clone()
    k2[0, 0, 2, 0] = -5.0
    out, _ = layer(q, k2, v, None, rows, step=step)
    assert layer.counts["exact"] == L and layer.counts["incremental"] == 0
    assert torch.allclose(out, sdpa(q, k2, v, None, 1.0), atol=1e-5)


@STEPS
def test_a_row_left_out_of_the_query_rows_is_exact_when_queried_again(step):
    """Outside `query_rows` a row keeps its context while keys change; the next step that queries it must not
    apply only that step's changes to the stale context."""
    B, H, L, D = 1, 2, 6, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    layer = Layer(B, H, H, L, D, 0.5, tau=0.99)
    everyone = torch.ones(B, L, dtype=torch.bool)
    layer(q, k, v, None, everyone, dense=True, step=step)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, 1] = True
    query = everyone.clone()
    query[0, 4] = False
    k1, v1 = k.clone(), v.clone()
    k1[0, :, 1] += 3.0
    v1[0, :, 1] += 100.0
    before = layer.caches[2][0, :, 4].clone()
    out, salient = layer(q, k1, v1, None, rows, query=query, step=step)
    assert torch.equal(out[0, :, 4], before) and not salient[0, 4]
    assert torch.allclose(out[0, :, :4], sdpa(q, k1, v1, None, 0.5)[0, :, :4], atol=1e-5)
    rows2 = torch.zeros(B, L, dtype=torch.bool)
    rows2[0, 2] = True
    k2, v2 = k1.clone(), v1.clone()
    v2[0, :, 2] -= 1.0
    out, salient = layer(q, k2, v2, None, rows2, step=step)
    assert torch.allclose(out, sdpa(q, k2, v2, None, 0.5), atol=1e-5)
    assert salient[0, 4]


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 9), p=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 99))
def test_select_rows_per_sequence(B, L, p, seed):
    rows = torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) < p
    index = select_rows_per_sequence(rows)
    n = min(max(int(rows.sum(1).max()), 2), L)
    assert index.shape == (B, n)
    for b in range(B):
        chosen = index[b].tolist()
        assert len(set(chosen)) == n and all(0 <= j < L for j in chosen)
        want = rows[b].nonzero().squeeze(1).tolist()
        assert chosen[:len(want)] == want


@STEPS
def test_under_inductor_matches_eager(step):
    """Compiled by Inductor: traced into a graph with data-dependent row counts, or the op whose caches Inductor must
    leave written in place; the same as eager."""
    B, H, Hk, L, D = 2, 4, 2, 12, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, Hk, L, D, generator=gen), \
        torch.randn(B, Hk, L, D, generator=gen)
    mask = _mask("additive", B, L, gen)
    eager, compiled = Layer(B, H, Hk, L, D, 0.35, tau=0.99), Layer(B, H, Hk, L, D, 0.35, tau=0.99)

    def fn(*args):
        out, salient = step(*args)
        return out * 2, salient

    fn_compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
    for i in range(4):
        rows = torch.ones(B, L, dtype=torch.bool) if i == 0 else torch.rand(B, L, generator=gen) < 0.25
        k = torch.where(rows[:, None, :, None], torch.randn(B, Hk, L, D, generator=gen), k)
        want = eager(q, k, v, mask, rows, dense=i == 0, step=fn)
        got = compiled(q, k, v, mask, rows, dense=i == 0, step=fn_compiled)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled.caches, eager.caches))
        assert torch.equal(compiled.stats, eager.stats)


@settings(max_examples=20, deadline=None)
@given(G=st.integers(1, 3), M=st.integers(1, 9), N=st.integers(1, 6), seed=st.integers(0, 99),
       masked=st.booleans())
def test_attend_on_cpu_equals_the_plain_product_of_other_devices(G, M, N, seed, masked):
    """`_attend`'s CPU flash kernel and `attend_math` (its branch off CPU) agree, rows attending to no column
    included (context 0, lse 0 from both)."""
    from dyllm_fx.kernels.incremental_attention import _attend, attend_math

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, G, n, 4, generator=gen) for n in (M, N, N))
    bias = None
    if masked:
        bias = torch.where(torch.rand(2, G, M, N, generator=gen) < 0.5, 0.0, -math.inf)
        bias[0, 0, 0] = -math.inf  # a row that attends to nothing
    ctx, lse = _attend(q, k, v, bias, 0.5)
    ctx_math, lse_math = attend_math(q, k, v, bias, 0.5)
    assert torch.allclose(ctx, ctx_math, atol=1e-5) and torch.allclose(lse, lse_math, atol=1e-5)
    if masked:
        assert ctx[0, 0, 0].abs().max() == 0 and lse[0, 0, 0] == 0
