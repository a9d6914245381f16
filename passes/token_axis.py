"""Token-axis analysis: for every tensor computed from the token input, which axis carries the token.

The sequence length `L` and batch `B` come from the token input `[B, L, ...]`. The analysis walks the
graph in order and maps the token and batch axes through each op by its semantics (broadcasting,
prefix products for views and reshapes, permutations, reductions over other axes). A node gets a
`RowAxes` when its token axis is known. `rowwise` holds the nodes whose op is *row-wise*: output row
`(b, l)` depends on input rows `(b, l)` alone (plus tensors that do not depend on the token input).
Attention and matmuls of two token tensors mix rows but keep the layout of their left/query operand;
reductions or slices along the token axis and gathers by data lose it (`None`).

*Expanded rows* (`RowAxes.expand = K`): one row axis of size `B * L * K` (or `L * K` when `B == 1`) holding
each row's K consecutive copies, as a mixture of experts makes them: `repeat_interleave(K, dim=rows)`,
`topk_index.reshape(-1)`, `expert_weight[expert_ids]`, a `bmm` of two such tensors, and back with
`view(rows, K, D).sum(1)`. Expanded nodes are not `rowwise` (the rewrite keeps them off row sets: they are
computed in full); they keep the token axis known through the experts, so later layers are rewritten.
"""
import math
import operator
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx


@dataclass(frozen=True)
class RowAxes:
    """`token`: the axis of the token index. `batch`: the batch axis; `== token` when batch and token
    are merged into one axis of size `B * L` (batch outer); -1 when `B == 1` and it has no axis."""

    token: int
    batch: int
    expand: int = 1


def tensor_meta(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def op_name(node: fx.Node) -> str:
    """A canonical name for call_function and call_method nodes ('linear', 'view', 'add', ...)."""
    t = node.target
    if node.op == "call_method":
        return t
    if node.op != "call_function":
        return node.op
    if t is operator.getitem:
        return "getitem"
    if t in (operator.matmul, torch.matmul):
        return "matmul"
    name = getattr(t, "__name__", str(t))
    return name.lstrip("_").replace("inplace_", "")


ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid",
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "mish", "softplus", "abs", "square", "clamp",
    "clip", "where", "masked_fill", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous",
    "clone", "detach", "eq", "ne", "gt", "lt", "ge", "le", "logical_not", "logical_and", "logical_or",
    "and_", "or_", "invert", "erf", "sin", "cos", "reciprocal", "maximum", "minimum", "floordiv", "mod",
    "iadd", "imul", "isub", "itruediv", "add_", "mul_", "sub_", "div_", "nan_to_num", "sign",
}
REDUCE_KEEP_RANK = {"softmax", "log_softmax", "cumsum", "topk", "sort", "argsort", "cummax", "cumprod"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "argmax",
          "argmin", "prod", "all", "any"}
VIEWS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
IDENTITY_DROPOUT = {"dropout", "dropout1d", "dropout2d", "feature_alpha_dropout", "alpha_dropout"}


# Ops that read only the shape, dtype or device of these positional arguments (`arange(L).expand_as(ids)`,
# `torch.zeros_like(ids)`): their outputs do not depend on token values.
SHAPE_ONLY_ARGS = {
    "expand_as": (1,), "view_as": (1,), "reshape_as": (1,), "type_as": (1,), "zeros_like": (0,), "ones_like": (0,),
    "empty_like": (0,), "full_like": (0,), "new_zeros": (0,), "new_ones": (0,), "new_empty": (0,), "new_full": (0,),
    "new_tensor": (0,), "size": (0,), "dim": (0,),
}


def _reads_shape_only(node: fx.Node, arg: fx.Node) -> bool:
    positions = SHAPE_ONLY_ARGS.get(op_name(node), ())
    return bool(positions) and all(i in positions for i, a in enumerate(node.args) if a is arg) and \
        arg not in node.kwargs.values()


def _prod(xs):
    return math.prod(int(x) for x in xs)


class TokenAxisAnalysis:
    """Runs over `gm` once. `axes[node]`: the node's `RowAxes` (None: unknown); `rowwise`: nodes whose
    op is row-wise; `varying`: nodes that depend on the token input."""

    def __init__(self, gm: fx.GraphModule, token_input: fx.Node):
        ex = tensor_meta(token_input)
        self.token_input = token_input
        self.B, self.L = int(ex.shape[0]), int(ex.shape[1])
        self.axes: dict[fx.Node, Optional[RowAxes]] = {
            token_input: RowAxes(1, 0 if self.B > 1 else -1)
        }
        self.varying = {token_input}
        self.rowwise: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node is token_input or node.op in ("placeholder", "get_attr", "output"):
                continue
            inputs = [a for a in node.all_input_nodes if a in self.varying and not _reads_shape_only(node, a)]
            if not inputs:
                continue
            self.varying.add(node)
            try:
                mixing = self._mixing_layout(node, inputs)
                self.axes[node] = mixing if mixing is not None else self._propagate(node, inputs)
                if mixing is None and self.axes[node] is not None and self.axes[node].expand == 1:
                    self.rowwise.add(node)
            except Exception:
                self.axes[node] = None

    def _mixing_layout(self, node: fx.Node, inputs) -> Optional[RowAxes]:
        """Ops that mix rows but whose output rows still follow one input's rows: attention (the
        query's rows) and matmuls of two token tensors (scores follow the left operand's rows)."""
        name = op_name(node)
        if node.op == "call_function" and node.target is torch._C._nn.scaled_dot_product_attention:
            return self.axes.get(node.args[0])
        if name in ("matmul", "bmm") and all(a in self.varying for a in node.args[:2]):
            a, xd = self.axes.get(node.args[0]), tensor_meta(node.args[0]).dim()
            if self._same_rows_batched(node):
                return None
            if a is not None and a.token < xd - 1:
                return self._shift(a, tensor_meta(node).dim() - xd)
        return None

    # -- rules -------------------------------------------------------------------------------
    def _propagate(self, node: fx.Node, inputs) -> Optional[RowAxes]:
        if any(self.axes.get(a) is None for a in inputs):
            return None
        name = op_name(node)
        out = tensor_meta(node)
        if name == "getitem":
            return self._getitem(node)
        if out is None:
            # tuple-valued row-wise ops (topk, split, chunk): elements share the input's axes
            if name in ("topk", "sort", "max", "min", "split", "chunk", "unbind") and self._dim_ok(node, 0):
                return self.axes[node.args[0]] if name != "unbind" or self._dim_ok(node, 0) else None
            return None
        if name in ELEMENTWISE:
            return self._broadcast(node, inputs, out)
        if name in IDENTITY_DROPOUT:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else False)
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return self.axes[node.args[0]] if (not training or p == 0) else None
        if name == "linear":
            if node.args[0] not in inputs or len(inputs) != 1:
                return None
            a = self.axes[node.args[0]]
            return a if a.token != tensor_meta(node.args[0]).dim() - 1 else None
        if name in ("matmul", "mm", "bmm"):
            x, w = node.args[0], node.args[1]
            if self._same_rows_batched(node):
                return self.axes[x]
            if w in self.varying or x not in self.varying:
                return None
            a, xd = self.axes[x], tensor_meta(x).dim()
            if xd < 2 or a.token == xd - 1:
                return None
            return self._shift(a, out.dim() - xd)
        if name == "embedding":
            return self.axes[node.args[0]] if node.args[0] in inputs and len(inputs) == 1 else None
        if name in ("layer_norm", "rms_norm", "group_norm"):
            if name == "group_norm" or node.args[0] not in inputs or len(inputs) != 1:
                return None
            a, xd = self.axes[node.args[0]], tensor_meta(node.args[0]).dim()
            nd = len(node.args[1]) if isinstance(node.args[1], (list, tuple)) else 1
            return a if max(a.token, a.batch) < xd - nd else None
        if name in REDUCE_KEEP_RANK or name in REDUCE:
            return self._reduce(node, out, name in REDUCE_KEEP_RANK)
        if name in VIEWS:
            return self._view(node.args[0], out)
        if name in ("transpose", "swapaxes", "permute", "movedim", "t"):
            return self._permute(node, out)
        if name == "expand" or name == "expand_as":
            a = self.axes[node.args[0]]
            return self._shift(a, out.dim() - tensor_meta(node.args[0]).dim())
        if name == "repeat_interleave":
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
            repeats = node.kwargs.get("repeats", node.args[1] if len(node.args) > 1 else None)
            a = self.axes[node.args[0]]
            if dim is not None and isinstance(repeats, int) and dim % out.dim() == a.token and self._one_row_axis(a):
                return replace(a, expand=a.expand * repeats)
            return self._same_rank_if_dim_free(node, dim)
        if name in ("scatter", "scatter_add", "scatter_reduce", "gather"):
            return self._index_along(node, inputs, out)
        if name == "cat":
            return self._cat(node, out)
        if name == "stack":
            return None
        if name == "one_hot":
            return self.axes[node.args[0]]
        return None

    def _shift(self, a: RowAxes, by: int) -> RowAxes:
        return replace(a, token=a.token + by, batch=a.batch + by if a.batch >= 0 else -1)

    @staticmethod
    def _one_row_axis(a: RowAxes) -> bool:
        """Batch and token on one axis (merged, or no batch axis): the layouts rows can be expanded in."""
        return a.batch == a.token or a.batch < 0

    def _rows(self, a: RowAxes) -> int:
        return self.B * self.L if a.batch == a.token else self.L

    def _same_rows_batched(self, node) -> bool:
        """A batched matmul of two token tensors with the same rows on a batch axis (experts' weights gathered
        per row times the rows): row-wise, unlike attention's q @ k^T, whose key rows sit on a matrix axis."""
        x, w = node.args[0], node.args[1]
        if not (x in self.varying and w in self.varying and tensor_meta(x) is not None and tensor_meta(w) is not None):
            return False
        a, b = self.axes.get(x), self.axes.get(w)
        xd = tensor_meta(x).dim()
        return a is not None and a == b and xd == tensor_meta(w).dim() and max(a.token, a.batch) < xd - 2

    def _broadcast(self, node, inputs, out) -> Optional[RowAxes]:
        result = None
        for x in inputs:
            a = self._shift(self.axes[x], out.dim() - tensor_meta(x).dim())
            if result is not None and a != result:
                return None
            result = a
        if int(out.shape[result.token]) not in (self.L * result.expand, self.B * self.L * result.expand):
            return None
        return result

    def _dims(self, node, ndim):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None:
            return None
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        return [d % ndim for d in dims if isinstance(d, int)]

    def _dim_ok(self, node, arg) -> bool:
        x = node.args[arg]
        a, xd = self.axes[x], tensor_meta(x).dim() if tensor_meta(x) is not None else 0
        dims = self._dims(node, xd)
        if op_name(node) in ("split", "chunk"):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            dims = [dim % xd]
        if op_name(node) == "topk":
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
            dims = [dim % xd]
        if op_name(node) == "sort":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else -1)
            dims = [dim % xd]
        return dims is not None and a.token not in dims and a.batch not in dims

    def _reduce(self, node, out, keep_rank) -> Optional[RowAxes]:
        x = node.args[0]
        a, xd = self.axes[x], tensor_meta(x).dim()
        dims = self._dims(node, xd)
        if op_name(node) in ("softmax", "log_softmax") and dims is None:
            return None
        if dims is None or a.token in dims or a.batch in dims:
            return None
        if keep_rank or out.dim() == xd:
            return a
        return replace(a, token=a.token - sum(d < a.token for d in dims),
                       batch=a.batch - sum(d < a.batch for d in dims) if a.batch >= 0 else -1)

    def _same_rank_if_dim_free(self, node, dim) -> Optional[RowAxes]:
        a, xd = self.axes[node.args[0]], tensor_meta(node.args[0]).dim()
        if dim is None or dim % xd in (a.token, a.batch):
            return None
        return a

    def _view(self, x, out) -> Optional[RowAxes]:
        """Maps axes through a reshape by prefix products (exact for row-major reshapes)."""
        a, shape, new = self.axes[x], list(tensor_meta(x).shape), list(out.shape)

        def find(prefix, size):
            for j in range(len(new)):
                if _prod(new[:j]) == prefix and int(new[j]) == size:
                    return j
            return None

        if a.expand > 1:
            return self._view_expanded(a, shape, new)
        plain = self._view_plain(a, shape, new, find)
        if plain is None and self._one_row_axis(a) and int(shape[a.token]) == self._rows(a):
            return self._view_expanded(a, shape, new)  # rows merged with the axes after them
        return plain

    def _view_plain(self, a: RowAxes, shape, new, find) -> Optional[RowAxes]:
        B, L = self.B, self.L
        if a.batch == a.token:  # flat [.., B*L, ..]
            p = _prod(shape[: a.token])
            j = find(p, B * L)
            if j is not None:
                return RowAxes(j, j)
            jb = find(p, B)
            if jb is not None and jb + 1 < len(new) and int(new[jb + 1]) == L:
                return RowAxes(jb + 1, jb)
            return None
        t = find(_prod(shape[: a.token]), L)
        if a.batch < 0:
            return RowAxes(t, -1) if t is not None else None
        b = find(_prod(shape[: a.batch]), B)
        if t is not None and b is not None:
            return RowAxes(t, b)
        if a.batch == a.token - 1:
            j = find(_prod(shape[: a.batch]), B * L)
            if j is not None:
                return RowAxes(j, j)
        return None

    def _view_expanded(self, a: RowAxes, shape, new) -> Optional[RowAxes]:
        """One row axis of R * e elements (each row's e copies consecutive) viewed as another shape: the new
        row axis starts where the old one did and holds R * x elements, where x divides e (split) or is e times
        the product of the axes that follow it (merge)."""
        t, e, R = a.token, a.expand, self._rows(a)
        p = _prod(shape[:t])
        merges = {e * _prod(shape[t + 1: t + 1 + k]) for k in range(len(shape) - t)}
        for j in range(len(new)):
            if _prod(new[:j]) == p and int(new[j]) % R == 0:
                x = int(new[j]) // R
                if e % x == 0 or x in merges:
                    return RowAxes(j, j if a.batch == a.token else -1, x)
        return None

    def _permute(self, node, out) -> Optional[RowAxes]:
        x = node.args[0]
        a, xd = self.axes[x], tensor_meta(x).dim()
        name = op_name(node)
        if name == "t":
            perm = list(range(xd))[::-1]
        elif name in ("transpose", "swapaxes"):
            d0, d1 = node.args[1] % xd, node.args[2] % xd
            perm = list(range(xd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        elif name == "permute":
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            perm = [d % xd for d in dims]
        else:  # movedim
            src, dst = node.args[1], node.args[2]
            perm = torch.arange(xd).movedim(src, dst).tolist()
        return replace(a, token=perm.index(a.token), batch=perm.index(a.batch) if a.batch >= 0 else -1)

    def _getitem(self, node) -> Optional[RowAxes]:
        src, idx = node.args
        if tensor_meta(src) is None:  # element of a tuple-valued row-wise op
            return self.axes[src] if isinstance(idx, int) else None
        if src not in self.varying:  # `table[ids]` by token-dependent ids: a lookup, like embedding
            ids = tensor_meta(idx) if isinstance(idx, fx.Node) else None
            if ids is not None and not ids.is_floating_point() and ids.dtype != torch.bool:
                return self.axes[idx]
            return None
        a, xd = self.axes[src], tensor_meta(src).dim()
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) for i in idx):
            return None
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded = []
        for i in idx:
            if i is Ellipsis:
                expanded += [slice(None)] * (xd - n_real)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (xd - sum(1 for i in expanded if i is not None))
        mapping, out_axis, in_axis = {}, 0, 0
        for i in expanded:
            if i is None:
                out_axis += 1
                continue
            size = int(tensor_meta(src).shape[in_axis])
            if isinstance(i, int):
                mapping[in_axis] = None
            else:
                full = i.step in (None, 1) and (i.start in (None, 0)) and (i.stop is None or i.stop >= size)
                mapping[in_axis] = out_axis if full else ("partial", out_axis)
                out_axis += 1
            in_axis += 1
        t = mapping.get(a.token)
        if not isinstance(t, int):
            return None
        if a.batch < 0:
            return replace(a, token=t, batch=-1)
        b = mapping.get(a.batch)
        return replace(a, token=t, batch=b) if isinstance(b, int) else None

    def _index_along(self, node, inputs, out) -> Optional[RowAxes]:
        """scatter(self, dim, index, src) / gather(input, dim, index) along an axis other than the row axes: row
        (b, l) of the output reads row (b, l) of every operand (MoE gates: `zeros_like(logits).scatter(-1, i, w)`).
        Operands that do not depend on the token input (`self` above) are constant per row."""
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if not isinstance(dim, int):
            return None
        dim %= out.dim()
        axes = {self.axes[x] for x in inputs}
        if len(axes) != 1 or any(tensor_meta(x) is None or tensor_meta(x).dim() != out.dim() for x in inputs):
            return None
        a = axes.pop()
        if dim in (a.token, a.batch):
            return None
        row_axes = [d for d in (a.token, a.batch) if d >= 0]
        if any(int(tensor_meta(x).shape[d]) != int(out.shape[d]) for x in inputs for d in row_axes):
            return None  # an index with fewer rows than the output would leave rows to `self`
        return a

    def _cat(self, node, out) -> Optional[RowAxes]:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim %= out.dim()
        result = None
        for x in tensors:
            if x in self.varying:
                a = self.axes[x]
                if result is not None and a != result:
                    return None
                result = a
        if result is None:
            return None
        if dim in (result.token, result.batch):
            # empty 1-D operands (an empty KV cache: `cat([tensor([]), k])`) are skipped by cat
            others = [x for x in tensors if x not in self.varying and tensor_meta(x).numel() != 0]
            if others or sum(x in self.varying for x in tensors) != 1:
                return None
        return result
