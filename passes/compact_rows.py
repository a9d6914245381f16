"""Row-wise ops on compact tensors: which ones can run on a region's rows alone, and their rewritten args.

A compact tensor (`kernels/compact_rows.py`) keeps its full counterpart's rank and axis order, with the
batch axis of size 1 and the token axis of size `n`. Most row-wise ops then run on it as they are; what
changes is:
- shape arguments (`view`, `reshape`, `expand`): the token size becomes `n`, the batch size 1;
- tensor operands that carry the token axis without being compact (positions' cos/sin) are gathered to
  the same rows first.
An op this file does not know, or whose operands it cannot gather, is refused: the rewrite then writes
the compact input into a cache and the op runs on full tensors as before.
"""
from typing import Optional

import torch
from torch import fx

from dyllm_fx.kernels.compact_rows import rows_linear, take_rows, take_token_rows
from dyllm_fx.kernels.packed_linear import packed_linear

from .token_axis import ELEMENTWISE, IDENTITY_DROPOUT, RowAxes, TokenAxisAnalysis, op_name, tensor_meta

SAME_SHAPE_ARGS = ELEMENTWISE | IDENTITY_DROPOUT | {
    "getitem", "flatten", "unsqueeze", "transpose", "swapaxes", "permute", "movedim", "contiguous", "cat",
    "chunk", "split", "layer_norm", "rms_norm", "softmax", "log_softmax", "linear",
}
SIZE_ARGS = {"view", "reshape", "expand"}
# reductions whose dims and keepdim do not change on compact rows, where the analysis finds them row-wise (they
# reduce other axes: a norm's mean over the hidden axis)
ROW_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "prod"}
SHAPE_OF_ANOTHER = {"view_as", "reshape_as", "expand_as"}  # the other tensor is full-size: refused


class CompactOps:
    def __init__(self, graph: fx.Graph, analysis: TokenAxisAnalysis, packed: bool = False):
        self.graph, self.analysis = graph, analysis
        # a linear on compact rows: oneDNN on a prepacked weight, or MKL padded to exactness (`rows_linear`)
        self.linear = packed_linear if packed else rows_linear
        self.taken: dict[tuple, fx.Node] = {}  # (full tensor, index, batch axis, token axis) -> its compact rows
        self.original = set(graph.nodes)  # the nodes the analysis saw (the rewrite adds others)
        self.partial: dict = {}  # the rewrite's compact nodes (`SaliencyRewrite.partial`): never in a chain

    def take(self, x: fx.Node, axes: RowAxes, index: fx.Node, before: fx.Node, count: Optional[fx.Node] = None,
             readers: Optional[set] = None) -> fx.Node:
        """The compact rows of the full tensor `x` (axes `axes`), computed just before `before` the first time
        they are asked for: linears reading the same rows read one gather (and `packed_linear` can group them).
        With `count` (the index's length) and `readers` (every user of `x`, all reading these rows), the gather
        moves up through the row-wise ops computing `x` (`_sink`): a norm then runs on the rows alone instead of
        every row."""
        key = (x, index, axes.batch, axes.token)
        if key not in self.taken:
            sunk = self._sink(x, index, count, before) if count is not None and set(x.users) == readers else None
            if sunk is None:
                with self.graph.inserting_before(before):
                    sunk = self.graph.call_function(take_rows, key)
            self.taken[key] = sunk
        return self.taken[key]

    def _chain(self, x: fx.Node) -> Optional[list]:
        """The row-wise nodes computing `x` from full tensors that other nodes read too (the leaves), each read
        only by nodes of the chain (`x` by the caller's readers), in graph order; None where `x` is not one."""
        def rowwise(n):
            return n in self.analysis.rowwise and n in self.original and n not in self.partial and not _in_place(n)

        if not rowwise(x):
            return None
        chain, todo = {x}, [x]
        while todo:
            for a in todo.pop().all_input_nodes:
                if a not in chain and rowwise(a) and set(a.users) <= chain:  # else a leaf (or a constant)
                    chain.add(a)
                    todo.append(a)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted(chain, key=order.__getitem__)

    def _sink(self, x: fx.Node, index: fx.Node, count: fx.Node, before: fx.Node) -> Optional[fx.Node]:
        """`x`'s row-wise chain (`_chain`) copied just before `before` to run on the rows `index` alone: its leaves
        gathered, its ops rewritten for compact tensors (`rewrite`). None, with the graph unchanged, where some op
        of the chain cannot run on compact rows or a leaf has no known rows. The full chain is left to dead-code
        elimination once `x`'s readers read the copy."""
        chain = self._chain(x)
        if chain is None:
            return None
        copies: dict[fx.Node, fx.Node] = {}
        taken: list[tuple] = []  # keys of the gathers made here
        for node in chain:
            outside = [a for a in node.all_input_nodes if a not in copies]
            # leaves: full tensors with known rows (the analysis's, or caches the rewrite made); the others must be
            # the analysis's constants (weights): a node the rewrite made whose rows are unknown stops the sink
            leaves = [a for a in outside if a in self.analysis.varying or a not in self.original]
            if any(self.analysis.axes.get(a) is None or self.analysis.axes[a].expand != 1 or a in self.partial
                   for a in leaves):
                break
            with self.graph.inserting_before(before):
                copy = self.graph.node_copy(node, lambda a: copies.get(a, a))
            self.analysis.axes[copy] = self.analysis.axes[node]
            self.analysis.rowwise.add(copy)
            gathered = set()
            for a in leaves:
                key = (a, index, self.analysis.axes[a].batch, self.analysis.axes[a].token)
                if key not in self.taken:
                    with self.graph.inserting_before(copy):
                        self.taken[key] = self.graph.call_function(take_rows, key)
                    # a tensor for AOTAutograd's cache, which checks that a method's receiver is one (like the
                    # rewritten nodes, it keeps the full tensor's meta)
                    self.taken[key].meta["example_value"] = tensor_meta(a)
                    taken.append(key)
                copy.replace_input_with(a, self.taken[key])
                gathered.add(self.taken[key])
            copies[node] = copy
            if not self.rewrite(copy, gathered | set(copies.values()), index, count):
                break
        else:
            return copies[x]
        for copy in reversed(list(copies.values())):  # refused: undo
            self.graph.erase_node(copy)
        for key in reversed(taken):
            self.graph.erase_node(self.taken.pop(key))
        return None

    def set_linear(self, node: fx.Node, x: fx.Node, w: fx.Node, b) -> None:
        """Makes `node` the compact path's linear of `x` (compact) by `w`, `b`."""
        args = (x, [w], [b]) if self.linear is packed_linear else (x, w, b)  # packed_linear takes lists
        node.target, node.op, node.args, node.kwargs = self.linear, "call_function", args, {}

    def rewrite(self, node: fx.Node, compact: set, index: fx.Node, count: fx.Node) -> bool:
        """Makes `node` (row-wise, its varying inputs the compact nodes `compact`) run on compact tensors;
        False (graph unchanged) when it cannot."""
        name = op_name(node)
        out = self.analysis.axes.get(node)
        if out is None or out.expand != 1 or name in SHAPE_OF_ANOTHER:
            return False
        if name not in SAME_SHAPE_ARGS and name not in SIZE_ARGS and not (
                name in ROW_REDUCE and node in self.analysis.rowwise):
            return False
        if name == "squeeze" or (name == "getitem" and any(isinstance(a, fx.Node) for a in _flat(node.args[1]))):
            return False
        rank = _rank(node)
        if rank is None:
            return False
        operands = {}
        for a in node.all_input_nodes:
            if a in compact:
                continue
            taken = self._operand(a, out, rank, index, node)
            if taken is False:
                return False
            if taken is not None:
                operands[a] = taken
        if name in SIZE_ARGS:
            sizes = self._sizes(node, out, rank, count)
            if sizes is None:
                return False
            node.args = (node.args[0], *sizes)
            node.kwargs = {}
        for a, taken in operands.items():
            node.replace_input_with(a, taken)
        if name == "linear":
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            self.set_linear(node, node.args[0], node.args[1], b)
        return True

    def _operand(self, a: fx.Node, out: RowAxes, rank: int, index: fx.Node, node: fx.Node):
        """None: usable as is (no token axis); a node: its gathered rows; False: cannot be gathered."""
        ex = tensor_meta(a)
        if ex is None:
            return None  # a number, a dtype
        if a in self.analysis.varying:
            return False  # a full varying tensor: the rewrite caches the compact one instead
        if op_name(node) not in ELEMENTWISE and op_name(node) != "cat":
            return None  # weights of linears and norms: no token axis
        shift = rank - ex.dim()  # broadcasting aligns trailing axes
        t, b = out.token - shift, out.batch - shift if out.batch >= 0 else -1
        B, L = self.analysis.B, self.analysis.L
        has_token = 0 <= t < ex.dim() and int(ex.shape[t]) > 1
        has_batch = out.batch != out.token and 0 <= b < ex.dim() and int(ex.shape[b]) > 1
        if not has_token:
            return False if has_batch else None
        with self.graph.inserting_before(node):
            if out.batch == out.token or out.batch < 0:
                if int(ex.shape[t]) != (B * L if out.batch == out.token else L):
                    return False
                return self.graph.call_function(take_rows, (a, index, t, t))
            if has_batch:
                return self.graph.call_function(take_rows, (a, index, b, t))
            return self.graph.call_function(take_token_rows, (a, index, t, L))

    def _sizes(self, node: fx.Node, out: RowAxes, rank: int, count: fx.Node) -> Optional[list]:
        sizes = list(node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
            sizes = list(sizes[0])
        if node.kwargs or len(sizes) != rank or not all(isinstance(s, int) for s in sizes):
            return None
        # every other size from the output's static shape: a -1 is ambiguous when the region has no rows
        sizes = [int(d) for d in tensor_meta(node).shape]
        expand = op_name(node) == "expand"
        sizes[out.token] = -1 if expand else count
        if out.batch >= 0 and out.batch != out.token:
            sizes[out.batch] = -1 if expand else 1
        return sizes


def _in_place(node: fx.Node) -> bool:
    name = op_name(node)
    return name.endswith("_") or name in ("iadd", "imul", "isub", "itruediv")


def _rank(node: fx.Node) -> Optional[int]:
    ex = tensor_meta(node)
    if ex is not None:
        return ex.dim()
    value = node.meta.get("example_value")  # chunk / split: a tuple of tensors
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return value[0].dim()
    return None


def _flat(index):
    return index if isinstance(index, (list, tuple)) else (index,)
