"""`split_layers` (`dyllm_fx/lowering.py`): the rewritten graph compiled per distinct layer segment."""
import pytest
import torch

import dyllm_fx
from dyllm_fx.backend import graphs_of
from dyllm_fx.lowering import SegmentedGraph, signature
from dyllm_fx.models import dream_like
from dyllm_fx.options import LAYERS_PER_SEGMENT
from trajectories import left_to_right, run_both


def _decode(model, split, steps: int = 8):
    """Logits and stats rows of `steps` calls, one token changed per call, under a dyllm compile, and its compiled
    graph (the one this compile made: an earlier compile's graph may not be collected yet)."""
    torch._dynamo.reset()
    before = set(map(id, graphs_of(model)))
    compiled = torch.compile(model, backend="dyllm", options={"tau": 0.95, "split_layers": split}, dynamic=False)
    x = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    logits, stats, graph = [], [], None
    with torch.no_grad():
        for s in range(steps):
            logits.append(compiled(x).logits.clone())
            if graph is None:
                (graph,) = [g for g in graphs_of(model) if id(g) not in before]
            stats.append(graph.state.by_role["stats"][0].clone())
            x[:, 10 + s] = (x[:, 10 + s] + 1) % 500
    return logits, stats, graph


def test_identical_layers_compile_once_and_give_the_whole_graphs_results():
    model = dream_like(num_layers=4, hidden_size=56, gqa_ratio=7, head_dim=8, seed=3).eval()
    whole, whole_stats, _ = _decode(model, split=False)
    split, split_stats, graph = _decode(model, split=1)
    segmented = graph.report.segmented
    # embedding + layer 0's projections, 3 identical middle segments, the last layer with the head
    assert (segmented.segments, segmented.compiles) == (5, 3)
    assert "5 segments" in str(graph.report)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    for a, b in zip(whole_stats, split_stats):  # each attention wrote its own row: same salient rows per layer
        assert torch.equal(a, b)
    # after the 4 dense steps some layers skip rows (this random model moves every row's context at tau=0.99)
    assert all(int(s[:, 0].sum()) == 2 * 20 * 4 for s in split_stats[:4])
    assert min(int(s[:, 0].sum()) for s in split_stats[4:]) < 2 * 20 * 4


def _read_then_more(x, m):
    index = torch.nonzero(m)  # a data-dependent size
    a = torch.relu(x)  # the "attention steps" the graph is cut at
    b = torch.sigmoid(a)
    return b + index.shape[0], a * 2  # the index's size is last read by the add


def _read_last(x, m):
    index = torch.nonzero(m)
    a = torch.relu(x)
    b = torch.sigmoid(a)
    c = a * 2
    return c, b + index.shape[0]  # ... and here nothing follows that read


@pytest.mark.parametrize("f, segments", [(_read_then_more, 2), (_read_last, 1)])
def test_no_cut_lets_a_data_dependent_size_cross_it(f, segments):
    """The index is made before both steps and read after the second: no cut at either step; the second one's cut
    moves past the read when a node follows it, else it is dropped."""
    gm = torch.fx.symbolic_trace(f)
    steps = [n for n in gm.graph.nodes if n.target in (torch.relu, torch.sigmoid)]
    x, m = torch.randn(3, 4), torch.rand(3, 4) > 0.5
    lowered = SegmentedGraph(gm, steps, {}, (x, m))
    assert (lowered.segments, lowered.compiles) == (segments, segments)
    assert all("val" not in n.meta for n in gm.graph.nodes)  # the probe's fakes are not left on the graph
    for got, want in zip(lowered(x, m), f(x, m)):
        assert torch.allclose(got, want)


def test_segments_of_a_graph_run_as_the_graph():
    def f(x, w):
        for _ in range(3):  # three identical "layers", each starting at its relu
            x = torch.relu(x) @ w + x
        return x.sum(-1), x

    gm = torch.fx.symbolic_trace(f)
    steps = [n for n in gm.graph.nodes if n.target is torch.relu]
    x, w = torch.randn(5, 4), torch.randn(4, 4)
    lowered = SegmentedGraph(gm, steps, {}, (x, w))
    assert (lowered.segments, lowered.compiles) == (3, 2)  # two identical layers, then the last with the sum
    for got, want in zip(lowered(x, w), f(x, w)):
        assert torch.allclose(got, want, atol=1e-5)


def test_signature_ignores_names_and_sees_constants():
    def f(x, w):
        return torch.nn.functional.linear(x, w) * 2.0

    def g(y, v):
        return torch.nn.functional.linear(y, v) * 2.0

    def h(x, w):
        return torch.nn.functional.linear(x, w) * 3.0

    f_, g_, h_ = (torch.fx.symbolic_trace(fn) for fn in (f, g, h))
    assert signature(f_) == signature(g_)
    assert signature(f_) != signature(h_)


def test_segments_of_several_layers_compile_once_and_give_the_whole_graphs_results():
    model = dream_like(num_layers=5, hidden_size=56, gqa_ratio=7, head_dim=8, seed=3).eval()
    whole, whole_stats, _ = _decode(model, split=False, steps=6)
    split, split_stats, graph = _decode(model, split=2, steps=6)
    segmented = graph.report.segmented
    # the embedding with layer 0's projections, two identical segments of two layers, the last layer with the head
    assert (segmented.segments, segmented.compiles) == (4, 3)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    for a, b in zip(whole_stats, split_stats):
        assert torch.equal(a, b)


def test_the_default_segment_spans_layers_per_segment_layers():
    model = dream_like(num_layers=2 * LAYERS_PER_SEGMENT + 1, hidden_size=56, gqa_ratio=7, head_dim=8, seed=3).eval()
    segmented = _decode(model, split=True, steps=1)[2].report.segmented
    assert (segmented.segments, segmented.compiles) == (4, 3)


@pytest.mark.parametrize("bad", ["yes", 0, -2, 1.5])
def test_split_layers_must_be_a_bool_or_a_positive_int(bad):
    with pytest.raises(ValueError, match="split_layers"):
        dyllm_fx.backend(split_layers=bad)


def test_gemma2_soft_capped_alternating_layers_stay_exact_at_tau_one():
    """Gemma 2: soft-capped scores (the `delta_attention` op, not a traced step) and sliding-window layers
    alternating with global ones, so two kinds of middle segment."""
    from dyllm_fx.zoo import gemma2

    torch._dynamo.reset()
    model = gemma2(num_layers=4).eval()
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, dense_steps=1, split_layers=1), dynamic=False)
    run_both(model, compiled, left_to_right(model.config.mask_token_id))
    segmented = graphs_of(model)[0].report.segmented
    assert (segmented.segments, segmented.compiles) == (5, 4)
