"""Fuses the gated pair of a SwiGLU/GeGLU MLP on the masked path into one `sparse_rows_linear`.

`mul(act(sparse_rows_linear(x, Wg, bg, rows)), sparse_rows_linear(x, Wu, bu, rows))` becomes
`sparse_rows_linear(x, Wg, bg, rows, activation=act, weight2=Wu, bias2=bu)`: on CUDA one kernel reads `x`'s rows
once for both weights and writes only the product (`kernels/sparse_rows_linear_triton.py`'s gated epilogue).
Matched when both linears read the same input with the same row set, neither result nor the activation has
another user, both or neither have a bias, and the activation is one the kernel has (SiLU, GELU exact or tanh).
The compact (CPU) path does not need it: its linears are plain GEMMs that Inductor fuses around.
"""
import operator

import torch
import torch.nn.functional as F
from torch import fx


def _activation(node: fx.Node):
    """The kernel's name for the activation `node` computes, or None."""
    if node.op != "call_function" or len(node.args) != 1:
        return None
    if node.target in (F.silu, torch.ops.aten.silu.default) and not node.kwargs.get("inplace", False):
        return "silu"
    if node.target in (F.gelu, torch.ops.aten.gelu.default):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    return None


def _gated_pair(act: fx.Node, up: fx.Node):
    """(activation name, gate linear) when `act` is an activation of a gated linear that pairs with `up`."""
    linear = torch.ops.dyllm.sparse_rows_linear.default
    name = _activation(act) if isinstance(act, fx.Node) else None
    gate = act.args[0] if name else None
    if not (isinstance(gate, fx.Node) and isinstance(up, fx.Node) and gate.target is linear and up.target is linear):
        return None
    if gate.kwargs or up.kwargs or len(gate.users) != 1 or len(act.users) != 1 or len(up.users) != 1:
        return None
    (x, _, bg, *rows), (x_up, _, bu, *rows_up) = gate.args, up.args
    if x is not x_up or rows != rows_up or (bg is None) != (bu is None):
        return None
    return name, gate


def fuse_gated_pairs(gm: fx.GraphModule) -> int:
    """Rewrites every matching pair in place; returns how many."""
    fused = 0
    for mul in list(gm.graph.nodes):
        if mul.op != "call_function" or mul.target not in (operator.mul, torch.mul) or len(mul.args) != 2 or mul.kwargs:
            continue
        a, b = mul.args
        for act, up in ((a, b), (b, a)):
            pair = _gated_pair(act, up)
            if pair is None:
                continue
            name, gate = pair
            with gm.graph.inserting_before(mul):
                node = gm.graph.call_function(gate.target, gate.args,
                                              dict(activation=name, weight2=up.args[1], bias2=up.args[2]))
            node.meta = dict(mul.meta)
            mul.replace_all_uses_with(node)
            for dead in (mul, act, gate, up):
                gm.graph.erase_node(dead)
            fused += 1
            break
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused
