"""Compact rows: the ops and helpers of `kernels/compact_rows.py`, and the compact rewrite of a model's regions."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import dyllm_fx
from dyllm_fx.backend import graphs_of
from dyllm_fx.kernels.compact_rows import put_rows, rows_first_order, rows_linear, take_rows, take_token_rows
from dyllm_fx.kernels.exact_attention import exact_attention_step
from dyllm_fx.kernels.sparse_rows_linear import MIN_ROWS
from dyllm_fx.models import llada_like

ops = torch.ops.dyllm

# (full shape, batch axis, token axis) for B=2, L=5: rows leading, heads before tokens, one flat B*L axis,
# no batch axis (B == 1), tokens before the batch
LAYOUTS = [((2, 5, 3), 0, 1), ((2, 4, 5, 3), 0, 2), ((10, 3), 0, 0), ((1, 5, 3), -1, 1), ((5, 2, 3), 1, 0)]


def _full_rows(shape, batch_axis, token_axis):
    """[B, L] row mask shape of a layout."""
    if batch_axis == token_axis:
        return (2, 5)
    return (1 if batch_axis < 0 else shape[batch_axis], shape[token_axis])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 999), kind=st.sampled_from(["none", "one", "all", "random"]))
def test_take_then_put_writes_exactly_the_selected_rows(layout, seed, kind):
    shape, ba, ta = layout
    g = torch.Generator().manual_seed(seed)
    rows = {"none": torch.zeros, "all": torch.ones}.get(kind, torch.zeros)(_full_rows(shape, ba, ta), dtype=torch.bool)
    if kind == "one":
        rows.view(-1)[seed % rows.numel()] = True
    if kind == "random":
        rows = torch.rand(rows.shape, generator=g) < 0.4
    new = torch.randn(shape, generator=g)
    order = rows_first_order(len(shape), ba, ta)  # the backend allocates caches rows-first
    cache = torch.randn([shape[d] for d in order], generator=g).permute([order.index(d) for d in range(len(shape))])
    assert cache.shape == new.shape
    before = cache.clone()
    index = ops.select_rows(rows)
    assert torch.equal(index, rows.reshape(-1).nonzero().squeeze(1))
    compact = take_rows(new, index, ba, ta)
    expected = list(shape)
    if ba == ta or ba < 0:
        expected[ta] = len(index)
    else:
        expected[ba], expected[ta] = 1, len(index)
    assert list(compact.shape) == expected
    put_rows(cache, index, compact, ba, ta)
    mask = _broadcast_rows(rows, shape, ba, ta)
    assert torch.equal(torch.where(mask, new, before), cache)


def _broadcast_rows(rows, shape, ba, ta):
    view = [1] * len(shape)
    if ba == ta or ba < 0:
        view[ta] = rows.numel()
        return rows.reshape(view)
    view[ba], view[ta] = rows.shape
    return (rows.t() if ba > ta else rows).reshape(view)


def test_take_token_rows_reads_the_token_of_each_flat_row():
    cos = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 3)
    index = torch.tensor([1, 5, 9])  # (b, l) = (0, 1), (1, 0), (1, 4) for L = 5
    assert take_token_rows(cos, index, 1, 5)[0, :, 0].tolist() == [1.0, 0.0, 4.0]


@pytest.mark.parametrize("n", [0, 1, 5, MIN_ROWS - 1, MIN_ROWS, 40])
def test_rows_linear_equals_the_dense_linear_on_its_rows(n):
    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(64, 96, generator=g), torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    index = torch.randperm(64, generator=g)[:n].sort().values
    assert torch.equal(rows_linear(x[index].unsqueeze(0), w, b)[0], F.linear(x, w, b)[index])  # bitwise


def test_opcheck_select_rows():
    rows = torch.tensor([[True, False, True], [False, False, True]])
    torch.library.opcheck(ops.select_rows.default, (rows,), test_utils=("test_schema", "test_faketensor"))


def test_compact_regions_run_their_pointwise_ops_on_the_rows_alone():
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy="full", lowering="eager"), dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 50, (2, 9)))
    (graph,) = graphs_of(model)
    nodes = list(graph.rewritten.graph.nodes)
    targets = [n.target for n in nodes]
    assert ops.sparse_rows_linear.default not in targets and ops.row_update_.default not in targets
    # below tau = 1 on CPU: attention is the C++ step, not the masked path's op
    assert ops.delta_attention.default not in targets and targets.count(ops.attention_step.default) == 2
    linear = ops.packed_linear.default  # below tau = 1 (tests/test_packed_linear.py)
    gated = [n for n in nodes if n.target is linear]
    puts = [n for n in nodes if n.target is ops.packed_linear_put_.default]  # the LM head writes the logits' cache
    assert sum(len(n.args[1]) for n in gated) + sum(len(n.args[3]) for n in puts) == \
        sum(l.region is not None for l in graph.linears) > 0
    # SwiGLU: silu(gate) * up reads compact linears (gate and up one grouped call), and the down projection
    # reads the product directly
    of_linear = lambda n: n.target is torch.ops.aten.narrow.default and n.args[0].target is linear
    silu = [n for n in nodes if n.target is F.silu]
    assert silu and all(of_linear(n.args[0]) for n in silu)
    assert all(any(u.target is linear for u in m.users) for n in silu for m in n.users)
    # one row index per region, not per linear
    assert targets.count(ops.select_rows.default) == len({l.region for l in graph.linears if l.region is not None})



def test_a_norm_before_a_gated_linear_runs_on_the_region_rows_alone():
    """The gather of a gated linear's input moves up through the norm computing it (`CompactOps._sink`): every
    RMSNorm's mean reduces gathered rows, not every row, and tau = 1.0 still reproduces the model."""
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, policy="full", lowering="eager"), dynamic=False)
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=0, atol=1e-5)
    (graph,) = graphs_of(model)
    means = [n for n in graph.rewritten.graph.nodes if n.op == "call_method" and n.target == "mean"]

    def gathered(node):
        while node.target is not take_rows and node.all_input_nodes:
            node = node.all_input_nodes[0]
        return node.target is take_rows

    assert len(means) == 2 * 2 + 1 and all(gathered(n) for n in means)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_exact_attention_step_matches_the_delta_attention_op(mask_kind):
    """The in-graph form (compact path) and the custom op (one-SDPA path) agree on outputs, saliency, the context
    cache and the stats, over a dense step and a sparse one with changed keys and a partial query set."""
    B, H, Hk, L, D = 2, 4, 2, 6, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    mask = {"none": None, "bool": torch.rand(B, 1, L, L, generator=g) > 0.2,
            "additive": torch.randn(B, 1, L, L, generator=g)}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # no fully masked row
    everyone, nobody = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    op_state = [torch.zeros(B, Hk, L, D), torch.zeros(B, Hk, L, D), torch.zeros(B, H, L, D), torch.zeros(B, H, L),
                torch.zeros(4, dtype=torch.int64)]
    ctx_cache, stats = torch.zeros(B, H, L, D), torch.zeros(4, dtype=torch.int64)
    changed = nobody.clone()
    changed[0, 2] = changed[1, 5] = True
    query = everyone.clone()
    query[1, :3] = False
    k2 = torch.where(changed[:, None, :, None], torch.randn(B, Hk, L, D, generator=g), k)
    for (kk, rows, qr, always, dense) in [(k, None, everyone, everyone, True), (k2, changed, query, changed, False)]:
        ref, ref_salient = ops.delta_attention(q, kk, v, mask, rows, qr, always, torch.tensor(dense), *op_state,
                                               0.3, 0.99, 1024)
        out, salient = exact_attention_step(q, kk, v, mask, qr, always, ctx_cache, stats, 0.3, 0.99)
        assert torch.allclose(out, ref, atol=1e-6) and torch.equal(salient, ref_salient)
        assert torch.allclose(ctx_cache, op_state[2], atol=1e-6) and torch.equal(stats, op_state[-1])
