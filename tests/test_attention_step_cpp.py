"""`dyllm::attention_step` (`kernels/attention_step_cpp.py`): the C++ form of the compact path's attention step.
Its contract against full attention and under Inductor is tested with the traced form in
`test_incremental_attention.py`; here: the two forms agree step by step, the fallback, and the backend's choice."""
import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import dyllm_fx
from dyllm_fx.backend import graphs_of
from dyllm_fx.kernels import attention_step_cpp, cpp_build
from dyllm_fx.kernels.delta_attention import CANCELLATION_FLOOR
from dyllm_fx.kernels.incremental_attention import incremental_attention_step
from dyllm_fx.models import llada_like
from dyllm_fx.passes.saliency_rewrite import EVERY_ROW_EXACT, INCREMENTAL, INCREMENTAL_CPP

from test_incremental_attention import Layer, _mask

attention_step = torch.ops.dyllm.attention_step.default
# The two forms sum in other orders. An incremental row subtracts the changed columns' old terms from its cached
# context, which amplifies rounding by up to 1 / CANCELLATION_FLOOR (rows past that are recomputed): a few fp32 ulps
# of it, relative, between the forms.
RTOL = 4 * torch.finfo(torch.float32).eps / CANCELLATION_FLOOR


def _changed(t, rows, gen):
    return torch.where(rows[:, None, :, None], torch.randn(t.shape, generator=gen, dtype=t.dtype), t)


@settings(max_examples=30, deadline=None)
@example(B=2, Hk=2, g=1, L=2, D=72, mask_kind="additive", tau=1.0, seed=44, p=0.05)  # 3e-5 apart, relative
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), g=st.integers(1, 3), L=st.integers(2, 40),
       D=st.sampled_from([5, 8, 64, 72]), mask_kind=st.sampled_from([None, "additive", "bool"]),
       tau=st.sampled_from([1.0, 0.999]), seed=st.integers(0, 999), p=st.sampled_from([0.05, 0.3]))
def test_the_cpp_step_agrees_with_the_traced_one(B, Hk, g, L, D, mask_kind, tau, seed, p):
    """Same contexts, caches and exact/incremental split, step by step; query rows left out now and then (stale
    rows). At tau = 1.0 every query row whose context moved at all is salient (the two may differ on rows recomputed
    to other roundings: salient by one, not by the other; both safe). With `rows_only` the C++ step writes the same
    caches, saliency and stats, and the same output at the rows it returns as salient."""
    gen = torch.Generator().manual_seed(seed)
    H = Hk * g
    q, k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, Hk, L, D, generator=gen), \
        torch.randn(B, Hk, L, D, generator=gen)
    mask = _mask(mask_kind, B, L, gen)
    torch_layer, cpp_layer, rows_layer = (Layer(B, H, Hk, L, D, 1 / math.sqrt(D), tau) for _ in range(3))
    everyone = torch.ones(B, L, dtype=torch.bool)
    before = None
    for i in range(4):
        rows = everyone if i == 0 else torch.rand(B, L, generator=gen) < p
        query = everyone if i % 2 == 0 else torch.rand(B, L, generator=gen) < 0.8
        q, k, v = _changed(q, rows, gen), _changed(k, rows, gen), _changed(v, rows, gen)
        always = everyone if i == 0 else None  # the backend's dense step: every row entered layer 0
        want = torch_layer(q, k, v, mask, rows, query=query, always=always, dense=i == 0)
        got = cpp_layer(q, k, v, mask, rows, query=query, always=always, dense=i == 0, step=attention_step)
        only = rows_layer(q, k, v, mask, rows, query=query, always=always, dense=i == 0,
                          step=lambda *args: attention_step(*args, rows_only=True))
        assert torch.equal(only[1], got[1]) and torch.equal(rows_layer.stats, cpp_layer.stats)
        assert all(torch.equal(a, b) for a, b in zip(rows_layer.caches, cpp_layer.caches))
        assert torch.equal(only[0].transpose(1, 2)[got[1]], got[0].transpose(1, 2)[got[1]])
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=RTOL)
        for a, b in zip(cpp_layer.caches, torch_layer.caches):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=RTOL)
        assert torch.equal(cpp_layer.stats[1:], torch_layer.stats[1:])  # exact, incremental, query rows
        if i == 0:  # the dense step: every row salient in both (the C++ form skips the cosines there)
            assert torch.equal(got[1], want[1]) and got[1].all() and torch.equal(cpp_layer.stats, torch_layer.stats)
        if tau == 1.0 and before is not None:
            moved = (got[0] != before).any(3).any(1) & query
            assert got[1][moved].all()
        before = got[0].clone()


def test_operands_it_does_not_take_run_the_traced_step():
    B, H, L, D = 1, 2, 6, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).bfloat16() for _ in range(3))  # a bf16 model
    everyone = torch.ones(B, L, dtype=torch.bool)
    rows = torch.zeros(B, L, dtype=torch.bool)
    rows[0, 3] = True
    layers = []
    for step in (incremental_attention_step, attention_step):
        layer = Layer(B, H, H, L, D, 0.5)
        layer.caches[:2] = [c.bfloat16() for c in layer.caches[:2]]  # K/V caches in the model's dtype
        assert not attention_step_cpp.supported(q, k, v, *layer.caches, layer.stats)
        outs = [layer(q, k, v, None, everyone, dense=True, step=step), layer(q, 2 * k, v, None, rows, step=step)]
        layers.append((outs, layer))
    (want, torch_layer), (got, cpp_layer) = layers
    for (a, sa), (b, sb) in zip(got, want):
        assert torch.equal(a, b) and torch.equal(sa, sb)
    assert torch.equal(cpp_layer.stats, torch_layer.stats)


def test_the_backend_uses_it_below_tau_one_and_traces_torch_ops_without_it(monkeypatch):
    model = llada_like(num_layers=2, hidden_size=32, num_heads=2, vocab_size=97)
    ids = torch.randint(0, 90, (1, 6))
    (report,) = dyllm_fx.explain(model, ids, options=dict(tau=0.99))
    assert set(report.attention.values()) == {INCREMENTAL_CPP}
    (exact,) = dyllm_fx.explain(model, ids, options=dict(tau=1.0))  # at 1.0 the SDPA form: bit for bit
    assert set(exact.attention.values()) == {EVERY_ROW_EXACT}
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    cpp_build.forget("attention_step")
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", broken)
    try:
        with pytest.warns(UserWarning, match="attention_step could not be compiled"):
            (traced,) = dyllm_fx.explain(model, ids, options=dict(tau=0.99, exact_attention_below=0))
        assert set(traced.attention.values()) == {INCREMENTAL}
        (default,) = dyllm_fx.explain(model, ids, options=dict(tau=0.99))  # as torch ops slower than SDPA here
        assert set(default.attention.values()) == {EVERY_ROW_EXACT}
    finally:
        cpp_build.forget("attention_step")


def test_the_additive_mask_is_made_once_per_mask_and_version():
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, :, :2] = False
    first = attention_step_cpp._bias(mask, 2, 5)
    assert attention_step_cpp._bias(mask, 2, 5) is first  # the same mask again: no new tensor
    assert first.dtype == torch.float32 and first.stride(3) == 1
    assert torch.equal(first.isinf(), ~mask.expand(2, 1, 5, 5))
    mask[1, :, :, 4] = False  # an in-place change: made again from the new values
    again = attention_step_cpp._bias(mask, 2, 5)
    assert again is not first and bool(again[1, 0, 0, 4].isinf()) and not bool(first[1, 0, 0, 4].isinf())
    with torch.inference_mode():  # an inference tensor has no version to key on: made every time, still right
        frozen = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
        assert torch.equal(attention_step_cpp._bias(frozen, 1, 3).isinf(), ~frozen)


@pytest.mark.parametrize("policy", ["full", "paper"])
def test_the_output_is_written_at_the_salient_rows_alone_where_the_graph_reads_no_other(policy):
    """"full" gates the output projection by the step's salient rows: the graph gathers those rows of the
    attention's output and nothing else, so the step writes them alone (`rows_only`). "paper" projects every row."""
    torch._dynamo.reset()
    model = llada_like(hidden_size=16, num_layers=2, num_heads=2, head_dim=8, vocab_size=53)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy=policy, lowering="eager"), dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 50, (2, 9)))
    (graph,) = graphs_of(model)
    steps = [n for n in graph.rewritten.graph.nodes if n.target is attention_step]
    assert len(steps) == 2
    assert all(n.args[15:] == ((True,) if policy == "full" else ()) for n in steps)
