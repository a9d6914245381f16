"""`packed_linear` (`kernels/packed_linear.py`): `panel_gemm` on a weight packed once (oneDNN where the C++ is not
built), and when the rewrite uses it."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings, strategies as st

import dyllm_fx
from dyllm_fx.backend import graphs_of
from dyllm_fx.kernels import cpp_build, packed_linear as packed, panel_gemm
from dyllm_fx.kernels.compact_rows import rows_linear
from dyllm_fx.models import llada_like
from trajectories import left_to_right, rows_seen_by_gated_linears, run_both

ops = torch.ops.dyllm
needs_onednn = pytest.mark.skipif(not packed._ONEDNN, reason="torch built without oneDNN")
needs_kernel = pytest.mark.skipif(not panel_gemm.available(), reason="panel_gemm's C++ could not be built")


def plain(x, weights, biases):
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)


@needs_kernel
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(1, 80), widths=st.lists(st.integers(1, 70), min_size=1, max_size=3),
       total=st.integers(1, 40), bias=st.lists(st.booleans(), min_size=3, max_size=3), seed=st.integers(0, 99))
def test_a_row_gets_the_same_bits_whatever_rows_share_its_call(k, widths, total, bias, seed):
    """A row's result does not depend on the other rows of the call, and is within rounding of `F.linear`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, k, generator=g)
    weights = [torch.randn(n, k, generator=g) for n in widths]
    biases = [torch.randn(n, generator=g) if has else None for n, has in zip(widths, bias)]
    full = ops.packed_linear(x, weights, biases)
    torch.testing.assert_close(full, plain(x, weights, biases), rtol=1e-5, atol=1e-5)
    one_by_one = torch.cat([ops.packed_linear(x[r:r + 1], weights, biases) for r in range(total)])
    assert torch.equal(full, one_by_one)
    for m in sorted({0, 1, 2, total // 2}):
        rows = torch.randperm(total, generator=g)[:m]
        assert torch.equal(ops.packed_linear(x[rows], weights, biases), full[rows]), f"{m} of {total} rows"


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(m=st.integers(1, 26), n=st.integers(1, 120), k=st.integers(1, 70), pad=st.integers(0, 5),
       bias=st.booleans(), row_block=st.sampled_from([1, 5, 7, 256]), seed=st.integers(0, 99))
@example(m=2, n=120, k=70, pad=1, bias=True, row_block=256, seed=0)  # pairs of panels (both threads: 8 panels)
@example(m=5, n=105, k=33, pad=0, bias=False, row_block=256, seed=1)  # pairs k-blocked, an odd run, a partial panel
def test_panel_gemm_is_the_linear(m, n, k, pad, bias, row_block, seed):
    """Any row count (two panels side by side at up to 6 rows, k-blocked chunks at 7-18 rows, one pass per chunk
    above), column count (a partial last panel), passes over the weight, and inputs with a row stride wider than
    their width. With `out_rows` the same rows land in those rows of `out`, and its other rows stay as they were."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + pad, generator=g)[:, :k]
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None
    assert panel_gemm.takes(x)
    out = panel_gemm.linear(x, panel_gemm.pack(w), panel_gemm.pack_bias(b), n, row_block=row_block)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    target, rows = torch.full((m + 3, n + pad), math.nan), torch.randperm(m + 3, generator=g)[:m]
    packed_bias = panel_gemm.pack_bias(b)
    panel_gemm.call(panel_gemm.kernel(), x, panel_gemm.pack(w), 0 if b is None else packed_bias.data_ptr(), n,
                    row_block, out=target[:, :n], out_rows=rows)
    assert torch.equal(target[rows, :n], out) and target[:, n:].isnan().all()
    assert target[[i for i in range(m + 3) if i not in rows]].isnan().all()


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 7, 20])
def test_panel_gemm_gives_the_same_bits_on_any_thread_count(m):
    """Threads split the panels, and a thread pairs its panels by its share: the bits do not depend on either."""
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 50, generator=g), torch.randn(150, 50, generator=g), torch.randn(150, generator=g)
    packed, bias, threads = panel_gemm.pack(w), panel_gemm.pack_bias(b), torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(panel_gemm.linear(x, packed, bias, 150))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0], F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_panel_gemm_refuses_what_it_cannot_take():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert not panel_gemm.takes(x.double())
    assert not panel_gemm.takes(x.t().contiguous().t())  # columns not contiguous
    with pytest.raises(ValueError, match="float32 CPU input"):
        panel_gemm.linear(x.double(), panel_gemm.pack(w), None, 4)
    with pytest.raises(ValueError, match="packed must be pack"):
        panel_gemm.linear(x, w, None, 4)  # the plain weight
    with pytest.raises(ValueError, match="packed must be pack"):
        panel_gemm.linear(x, panel_gemm.pack(w), None, 40)
    with pytest.raises(ValueError, match="bias must be pack_bias"):
        panel_gemm.linear(x, panel_gemm.pack(w), torch.randn(4), 4)
    with pytest.raises(ValueError, match="2-D float32 weight"):
        panel_gemm.pack(w.double())


@needs_kernel
def test_panel_gemm_is_a_named_event_under_the_profiler():
    """`benchmarks/profile_step.py` counts it with the GEMMs."""
    with torch.profiler.profile() as prof:
        ops.packed_linear(torch.randn(3, 8), [torch.randn(5, 8)], [None])
    assert "dyllm::panel_gemm" in {e.key for e in prof.key_averages()}


@needs_onednn
def test_without_the_compiled_kernel_packed_linear_takes_onednn_with_one_warning(monkeypatch):
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    cpp_build.forget("panel_gemm")
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", broken)
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        with pytest.warns(UserWarning, match="could not be compiled"):
            y = ops.packed_linear(x, [w], [b])
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert not panel_gemm.available()
    finally:
        cpp_build.forget("panel_gemm")


def test_keeps_the_leading_axes_and_repacks_after_an_in_place_update():
    x, w = torch.randn(2, 1, 7, 8), torch.randn(6, 8)
    y = ops.packed_linear(x, [w], [None])
    assert y.shape == (2, 1, 7, 6)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w.mul_(-2.0)
    torch.testing.assert_close(ops.packed_linear(x, [w], [None]), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_a_group_repacks_when_any_member_changes_or_is_replaced():
    x, w1, w2, b2 = torch.randn(9, 8), torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    ops.packed_linear(x, [w1, w2], [None, b2])
    with torch.no_grad():
        b2.add_(1.0)  # in place: the version counter moves
    torch.testing.assert_close(ops.packed_linear(x, [w1, w2], [None, b2]), plain(x, [w1, w2], [None, b2]),
                               rtol=1e-5, atol=1e-5)
    w3 = torch.randn(5, 8)  # another tensor in the second place, same first weight
    torch.testing.assert_close(ops.packed_linear(x, [w1, w3], [None, b2]), plain(x, [w1, w3], [None, b2]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.packed_linear(x, [w1], [None]), F.linear(x, w1), rtol=1e-5, atol=1e-5)
    # a bias where there was none (same weights) is another group too
    torch.testing.assert_close(ops.packed_linear(x, [w1], [b2[:4]]), F.linear(x, w1, b2[:4]), rtol=1e-5, atol=1e-5)


def test_an_input_of_another_width_than_the_weights_is_refused():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    ops.packed_linear(x, [w], [None])  # packed
    with pytest.raises(ValueError, match="features"):
        ops.packed_linear(torch.randn(3, 9), [w], [None])


def test_other_dtypes_are_the_plain_linear():
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    w2 = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(ops.packed_linear(x, [w], [None]), F.linear(x, w))
    assert torch.equal(ops.packed_linear(x, [w, w2], [None, None]), plain(x, [w, w2], [None, None]))


def test_opcheck_packed_linear():
    torch.library.opcheck(ops.packed_linear.default,
                          (torch.randn(4, 8), [torch.randn(6, 8), torch.randn(3, 8)], [torch.randn(6), None]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("tau, packed_weights, expected", [
    (0.99, None, ops.packed_linear.default), (1.0, None, rows_linear), (0.99, False, rows_linear),
    (1.0, True, ops.packed_linear.default)])
def test_gated_linears_use_packed_weights_below_tau_one(tau, packed_weights, expected):
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=tau, policy="full", lowering="eager",
                                                             packed_weights=packed_weights), dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 50, (2, 9)))
    (graph,) = graphs_of(model)
    calls = [n for n in graph.rewritten.graph.nodes if n.target is expected]
    if expected is ops.packed_linear.default:  # the returned logits' linear writes its cache (packed_linear_put_)
        puts = [n for n in graph.rewritten.graph.nodes if n.target is ops.packed_linear_put_.default]
        linears = sum(len(n.args[1]) for n in calls) + sum(len(n.args[3]) for n in puts)
    else:
        linears = len(calls)
    other = rows_linear if expected is ops.packed_linear.default else ops.packed_linear.default
    assert linears == sum(l.region is not None for l in graph.linears) > 0
    assert other not in [n.target for n in graph.rewritten.graph.nodes]


def test_the_gemm_is_built_with_the_graph_not_at_the_first_call():
    torch._dynamo.reset()
    cpp_build.forget("panel_gemm")
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy="full", lowering="eager"),
                             dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 50, (2, 9)))
    assert cpp_build.built("panel_gemm") and panel_gemm.available()


def test_linears_reading_the_same_rows_are_one_call_and_the_logits_write_their_cache():
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy="full", lowering="eager"),
                             dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 50, (2, 9)))
    (graph,) = graphs_of(model)
    widths = sorted(len(n.args[1]) for n in graph.rewritten.graph.nodes if n.target is ops.packed_linear.default)
    # per layer: Q/K/V one call, the output projection, gate/up one call, down
    assert widths == [1] * 4 + [2] * 2 + [3] * 2
    # the LM head writes the logits the graph returns into their cache (`packed_linear_put_`)
    writes = [n for n in graph.rewritten.graph.nodes if n.target is ops.packed_linear_put_.default]
    output = next(n for n in graph.rewritten.graph.nodes if n.op == "output")
    assert len(writes) == 1 and writes[0].args[0] in output.all_input_nodes
    assert graph.report.grouped_linears == 10 and "grouped linears: 10" in str(graph.report)


def test_packed_weights_need_the_compact_path():
    with pytest.raises(ValueError, match="packed_weights"):
        dyllm_fx.backend(packed_weights=True, compact_rows=False)


@pytest.mark.slow
def test_packed_weights_under_inductor_stay_within_rounding_of_eager():
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=97, seed=0)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, policy="full", dense_steps=1,
                                                             packed_weights=True), dynamic=False)
    steps = left_to_right(model.config.mask_token_id)
    with rows_seen_by_gated_linears() as seen:
        run_both(model, compiled, steps)
    assert any(0 < n < total for n, total in seen), f"the gated linears never ran on a strict subset of rows: {seen}"


def test_explain_reports_the_packed_copies():
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    ids = torch.randint(0, 50, (2, 9))
    (packed,) = dyllm_fx.explain(model, ids, options={"tau": 0.99, "policy": "full"})
    (exact,) = dyllm_fx.explain(model, ids, options={"tau": 1.0, "policy": "full"})
    gated = packed.gated
    assert packed.packed_bytes == 4 * sum(int(l.node.args[1].meta["example_value"].numel()) for l in gated) > 0
    assert "packed weights:" in str(packed) and exact.packed_bytes == 0 and "packed weights" not in str(exact)


@pytest.mark.parametrize("rows", ["all", "some", "none"])
@pytest.mark.parametrize("shape, batch_axis, token_axis", [((2, 5, 7), 0, 1), ((1, 5, 7), -1, 1)])
def test_packed_linear_put_writes_what_put_rows_of_packed_linear_writes(rows, shape, batch_axis, token_axis):
    """At every row (a dense step) the GEMM writes into the whole cache, at some rows into those rows of the cache
    (a sparse step). Either way the cache ends as `put_rows(cache, index, packed_linear(x))` leaves it."""
    from dyllm_fx.kernels.compact_rows import put_rows, select_rows

    g = torch.Generator().manual_seed(0)
    mask = {"all": torch.ones(2 if batch_axis == 0 else 1, 5, dtype=torch.bool), "none": torch.zeros(
        2 if batch_axis == 0 else 1, 5, dtype=torch.bool)}.get(rows, torch.rand(2 if batch_axis == 0 else 1, 5,
                                                                                generator=g) < 0.5)
    index = select_rows(mask)
    x = torch.randn(1, len(index), 6, generator=g)
    weights, biases = [torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)], [torch.randn(3), None]
    cache = torch.randn(shape, generator=g)
    expected = cache.clone()
    put_rows(expected, index, packed.packed_linear(x, weights, biases), batch_axis, token_axis)
    ops.packed_linear_put_(cache, index, x, weights, biases, batch_axis, token_axis)
    assert torch.equal(cache, expected)


def test_packed_linear_put_refuses_an_index_outside_the_cache():
    x, weights = torch.randn(1, 2, 5), [torch.randn(4, 5)]
    for index in ([0, 6], [-1, 1]):
        with pytest.raises(IndexError, match="packed_linear_put_: index out of range"):
            ops.packed_linear_put_(torch.zeros(2, 3, 4), torch.tensor(index), x, weights, [None], 0, 1)


def test_opcheck_packed_linear_put():
    from dyllm_fx.kernels.compact_rows import select_rows

    index = select_rows(torch.tensor([[True, False, True]]))
    args = (torch.zeros(1, 3, 4), index, torch.randn(1, 2, 5), [torch.randn(4, 5)], [torch.randn(4)], -1, 1)
    torch.library.opcheck(ops.packed_linear_put_.default, args, test_utils=("test_schema", "test_faketensor"))

