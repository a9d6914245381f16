"""Groups the compact path's packed linears that read the same rows into one `packed_linear` call.

A layer's Q, K and V projections read the same normed rows (one region, one gather: `CompactOps.take`), and so do
an MLP's gate and up projections. `packed_linear(x, [Wq], [bq])`, `packed_linear(x, [Wk], [bk])`, ... become
one `packed_linear(x, [Wq, Wk, ...], [bq, bk, ...])` and each former result a `narrow` of its output: one GEMM
over the concatenated weights (packed once, as much memory as the separate copies) instead of one per weight.
At a sparse step's few rows each call's fixed cost (dispatch, oneDNN's primitive) is a large part of its time.
The group is computed where its first member was, so a weight or bias computed in the graph after that point
keeps its group apart.
"""
import torch
from torch import fx

from dyllm_fx.kernels.packed_linear import packed_linear


def group_shared_input_linears(gm: fx.GraphModule) -> int:
    """Rewrites every group of two or more `packed_linear` calls on the same input in place; returns how many
    calls the groups replaced."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is packed_linear:
            groups.setdefault(node.args[0], []).append(node)
    replaced = 0
    for x, members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        params = [a for m in members for a in (*m.args[1], *m.args[2]) if isinstance(a, fx.Node)]
        if any(a.op not in ("placeholder", "get_attr") and order[a] > order[first] for a in params):
            continue  # a weight computed after the first member: leave the group apart
        widths = [_rows_out(m) for m in members]
        if None in widths:
            continue
        with gm.graph.inserting_before(first):
            group = gm.graph.call_function(packed_linear, (x, [w for m in members for w in m.args[1]],
                                                           [b for m in members for b in m.args[2]]))
            starts = [sum(widths[:i]) for i in range(len(members))]
            parts = [gm.graph.call_function(torch.ops.aten.narrow.default, (group, -1, s, w))
                     for s, w in zip(starts, widths)]
        ex = first.meta.get("example_value")
        if isinstance(ex, torch.Tensor):  # AOTAutograd's cache reads a method call's tensor from this meta
            group.meta["example_value"] = ex.new_empty((*ex.shape[:-1], sum(widths)))
        for m, part in zip(members, parts):
            part.meta = dict(m.meta)
            m.replace_all_uses_with(part)
            gm.graph.erase_node(m)
        replaced += len(members)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _rows_out(node: fx.Node):
    """The output width of a `packed_linear` call: its weights' rows (None when a weight's shape is unknown)."""
    shapes = [w.meta.get("example_value", w.meta.get("val")) for w in node.args[1]]
    return None if any(s is None for s in shapes) else sum(int(s.shape[0]) for s in shapes)
