"""The saliency rewrite: gated linears, delta attention and cache points, with caches as graph inputs.

Walks the graph once, in order, tracking which tensors are *partial*: valid only on the rows of one
region's row set (the output of a gated linear, and row-wise ops over it with tensors that do not
depend on the token input). A partial tensor may feed another gated linear of the same region, or the
key/value of the next attention (whose K/V cache takes exactly those rows). Anywhere else (a residual
add with a full tensor, a query, a graph output, an op that mixes rows) it goes through a *cache
point*: `row_update_` writes its valid rows into a cache and the consumer reads the cache.

Two representations of a partial tensor (`compact`, chosen per device by `Options.compact`):
- masked (GPU): full-size, valid on the region's rows; gated linears are `sparse_rows_linear` over the
  `[B, L]` row mask (static shapes: no host synchronisation, CUDA-graph safe);
- compact (CPU): only the region's rows (`kernels/compact_rows.py`, `passes/compact_rows.py`); the region's
  index is computed once (`select_rows`), full inputs are gathered once per gated linear, and the row-wise
  ops between gated linears run on the rows alone. Cache points write with `put_rows`.
"""
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from dyllm_fx import kernels  # noqa: F401  (registers torch.ops.dyllm)
from dyllm_fx.kernels import compact_rows
from dyllm_fx.kernels.exact_attention import exact_attention_step
from dyllm_fx.kernels.incremental_attention import incremental_attention_step

from .attention import AttentionSite
from .compact_rows import CompactOps
from .regions import LinearSite
from .token_axis import TokenAxisAnalysis, op_name, tensor_meta

ops = torch.ops.dyllm
# how an attention's sparse step is computed (`RewriteResult.attention`, shown by `dyllm_fx.explain`)
EVERY_ROW_EXACT, INCREMENTAL, DELTA_OP = "every row exact (SDPA, in graph)", "incremental (in graph)", "delta_attention op"
INCREMENTAL_CPP = "incremental (attention_step, one C++ call)"
HEADS_INNER = (0, 2, 1, 3)  # memory order of a [B, H, L, D] cache stored [B, L, H, D] (rows outer), as SDPA returns it


@dataclass
class BufferSpec:
    """A graph input the runtime owns: shape, dtype, and what it holds."""

    name: str
    shape: tuple
    dtype: torch.dtype
    role: str  # entry_rows | query_rows | dense | stats | k_cache | v_cache | context | lse | cache
    order: Optional[tuple] = None  # memory order of the axes, outermost first (None: contiguous)


@dataclass
class RewriteResult:
    buffers: list[BufferSpec] = field(default_factory=list)
    cache_points: list[tuple[str, str]] = field(default_factory=list)  # (node name, region)
    attention: dict[int, str] = field(default_factory=dict)  # site index -> how its sparse step is computed
    steps: list[fx.Node] = field(default_factory=list)  # the attention steps' calls, in graph order
    # returned caches whose rows are their first two axes: (the cache's buffer name), in the order their written-row
    # masks ([B, L] bool) follow the model's outputs at the end of the graph's outputs (`_note_written_rows`)
    written: list[str] = field(default_factory=list)


class SaliencyRewrite:
    def __init__(self, gm: fx.GraphModule, analysis: TokenAxisAnalysis, sites: list[AttentionSite],
                 linears: list[LinearSite], tau: float, exact_below: int, compact: bool = False,
                 packed: bool = False, cpp_attention: bool = False):
        self.gm, self.graph, self.analysis = gm, gm.graph, analysis
        self.sites, self.tau, self.exact_below = [s for s in sites if s.supported], tau, exact_below
        self.cpp_attention = cpp_attention  # compact path: the incremental step as `attention_step` (CPU, built)
        self.n_sites = len(sites)  # stats rows are indexed by site index, supported or not
        self.gated = {l.node: l.region for l in linears if l.region is not None}
        self.result = RewriteResult()
        self.partial: dict[fx.Node, int] = {}
        self.cache_of: dict[fx.Node, fx.Node] = {}
        self.fake_mode = next(tensor_meta(n).fake_mode for n in self.graph.nodes
                              if tensor_meta(n) is not None and hasattr(tensor_meta(n), "fake_mode"))
        self._last_placeholder = list(self.graph.find_nodes(op="placeholder"))[-1]
        self.compact = CompactOps(self.graph, analysis, packed) if compact else None
        if self.compact:
            self.compact.partial = self.partial
        self.index: dict[int, tuple[fx.Node, fx.Node]] = {}  # region -> (row index, its length)
        # plain functions that write caches in place (`put_rows`, the attention step): DCE must keep them
        self.writes: set[fx.Node] = set()
        self.stats_rows: list[fx.Node] = []

    # -- graph inputs the runtime owns -------------------------------------------------------------
    def _input(self, name, shape, dtype, role, device, order=None) -> fx.Node:
        with self.graph.inserting_after(self._last_placeholder):
            node = self.graph.placeholder(f"dyllm_{name}")
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        with self.fake_mode:
            node.meta["example_value"] = torch.empty(shape, dtype=dtype, device=device)
        self._last_placeholder = node
        self.result.buffers.append(BufferSpec(node.name, tuple(shape), dtype, role, order))
        return node

    def _cache_point(self, node: fx.Node, consumer: Optional[fx.Node] = None) -> fx.Node:
        if node not in self.cache_of:
            ex, axes, region = tensor_meta(node), self.analysis.axes[node], self.partial[node]
            order = compact_rows.rows_first_order(ex.dim(), axes.batch, axes.token) if self.compact else None
            cache = self._input(f"cache_{node.name}", tuple(ex.shape), ex.dtype, "cache", ex.device, order)
            self.analysis.axes[cache] = axes  # a full tensor with the node's rows (`CompactOps` may gather it)
            with self.graph.inserting_after(node):
                if self.compact:
                    index = self.index[region][0]
                    if node.target is ops.packed_linear.default and consumer is not None and \
                            consumer.op == "output" and set(node.users) == {consumer}:
                        # a gated linear's output that the graph returns (the logits): the GEMM writes the cache's
                        # rows, and at a dense step the cache itself (no temporary); the linear node is left to DCE
                        write = self.graph.call_function(ops.packed_linear_put_.default, (
                            cache, index, *node.args, axes.batch, axes.token))
                    else:
                        write = self.graph.call_function(compact_rows.put_rows,
                                                         (cache, index, node, axes.batch, axes.token))
                    self.writes.add(write)
                else:
                    self.graph.call_function(ops.row_update_.default,
                                             (cache, node, self.rows[region], axes.batch, axes.token))
            self.cache_of[node] = cache
            self.result.cache_points.append((node.name, region))
        return self.cache_of[node]

    def _index(self, region: int, before: fx.Node) -> tuple[fx.Node, fx.Node]:
        """The region's row index and its length, computed once, before its first user."""
        if region not in self.index:
            with self.graph.inserting_before(before):
                index = self.graph.call_function(ops.select_rows.default, (self.rows[region],))
                count = self.graph.call_function(torch.ops.aten.sym_size.int, (index, 0))
            self.index[region] = index, count
        return self.index[region]

    def _stats_row(self, site_index: int) -> fx.Node:
        """`stats[site_index]`, the row an attention step writes. `run` moves these views next to the graph inputs,
        so that a layer's segment of the graph takes its row as an input instead of a layer-specific constant
        (identical layers compile once, `dyllm_fx/lowering.py`)."""
        row = self.graph.call_function(torch.select, (self.stats, 0, site_index))
        with self.fake_mode:
            row.meta["example_value"] = tensor_meta(self.stats)[site_index]
        self.stats_rows.append(row)
        return row

    def _use_cache(self, consumer: fx.Node, node: fx.Node) -> None:
        consumer.replace_input_with(node, self._cache_point(node, consumer))

    def _note_written_rows(self, output: fx.Node) -> None:
        """Appends to the graph's outputs, for each returned cache laid out [B, L, ...], the mask of the rows its put
        writes (its region's rows): the runtime tells a borrowing caller which rows changed (`dyllm_fx/outputs.py`)."""
        outs = output.args[0]
        if not isinstance(outs, (tuple, list)):
            return
        region_of = {cache: self.partial[node] for node, cache in self.cache_of.items()}
        masks = []
        for o in outs:
            axes = self.analysis.axes.get(o) if isinstance(o, fx.Node) else None
            if o in region_of and axes is not None and (axes.batch, axes.token) == (0, 1) and \
                    o.name not in self.result.written:
                masks.append(self.rows[region_of[o]])
                self.result.written.append(o.name)
        if masks:
            output.args = (type(outs)([*outs, *masks]),)

    # -- the walk --------------------------------------------------------------------------------
    def run(self) -> RewriteResult:
        ex = tensor_meta(self.analysis.token_input)
        B, L, dev = self.analysis.B, self.analysis.L, ex.device
        self.rows = {-1: self._input("entry_rows", (B, L), torch.bool, "entry_rows", dev)}
        self.query_rows = self._input("query_rows", (B, L), torch.bool, "query_rows", dev)
        self.dense = self._input("dense", (), torch.bool, "dense", dev)
        self.stats = self._input("stats", (max(self.n_sites, 1), 4), torch.int64, "stats", dev)
        site_of = {s.output: s for s in self.sites}
        inner = {n for s in self.sites for n in s.inner}
        # Nodes nobody reads before the rewrite are there for their effect, not their value: Dynamo keeps
        # functorch's `_vmap_increment_nesting` / `_vmap_decrement_nesting` (transformers' mask functions trace
        # through torch.vmap) and fx's DCE takes them for pure. Remove only what the rewrite leaves unread.
        unread = {n for n in self.graph.nodes if not n.users and n.op != "output"}
        for node in list(self.graph.nodes):
            if node in inner or node.op == "placeholder":
                continue
            if node in self.gated:
                self._gate_linear(node)
            elif node in site_of:
                self._delta_attention(site_of[node])
            elif node.op == "output":
                for a in node.all_input_nodes:
                    if a in self.partial:
                        self._use_cache(node, a)
                self._note_written_rows(node)
            else:
                self._propagate(node)
        for row in reversed(self.stats_rows):
            self._last_placeholder.append(row)
        self.graph.eliminate_dead_code(is_impure_node=lambda n: n in unread or n in self.writes or n.is_impure())
        for step in self.result.steps:
            if step.target is ops.attention_step.default and _reads_salient_rows_only(step):
                step.args = (*step.args, True)  # rows_only: the output's other rows are never read
        self.graph.lint()
        self.gm.recompile()
        return self.result

    def _gate_linear(self, node: fx.Node) -> None:
        region = self.gated[node]
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        axes = self.analysis.axes[node.args[0]]
        if x in self.partial and self.partial[x] != region:
            x = self._cache_point(x)
        if self.compact:
            if x not in self.partial:
                index, count = self._index(region, node)
                readers = {u for u in x.users if self.gated.get(u) == region}  # the region's linears reading x
                x = self.compact.take(x, axes, index, node, count, readers)
            self.compact.set_linear(node, x, w, b)
        else:
            node.target = ops.sparse_rows_linear.default
            node.args, node.kwargs = (x, w, b, self.rows[region], axes.batch, axes.token), {}
        self.partial[node] = region

    def _delta_attention(self, site: AttentionSite) -> None:
        q, k, v = site.q, site.k, site.v
        if q in self.partial:
            q = self._cache_point(q)
        regions = {self.partial.get(k), self.partial.get(v)}
        if len(regions) == 1 and None not in regions:
            kv_rows = self.rows[regions.pop()]
            if self.compact:  # the op takes full-size K/V: their caches, fresh on the region's rows
                k, v = self._cache_point(k), self._cache_point(v)
        else:
            k = self._cache_point(k) if k in self.partial else k
            v = self._cache_point(v) if v in self.partial else v
            kv_rows = None
        mask = site.mask
        if site.mask_negated:  # masked_fill's condition says which columns to drop; the op takes which to keep
            with self.graph.inserting_before(site.output):
                mask = self.graph.call_function(torch.logical_not, (site.mask,))
            with self.fake_mode:
                mask.meta["example_value"] = torch.logical_not(tensor_meta(site.mask))
        elif site.mask_scale != 1.0:  # an additive mask inside the scores' scaling: (q k^T + mask) / sqrt(d)
            with self.graph.inserting_before(site.output):
                mask = self.graph.call_function(operator.mul, (site.mask, site.mask_scale))
            with self.fake_mode:
                mask.meta["example_value"] = tensor_meta(site.mask) * site.mask_scale
        i = site.index
        if self.compact and site.k_memory is None and not site.softcap:
            if kv_rows is None or int(tensor_meta(site.k).shape[2]) <= self.exact_below:
                return self._exact_attention(site, q, k, v, mask)
            return self._incremental_attention(site, q, k, v, mask, kv_rows)
        self.result.attention[i] = DELTA_OP
        self._replace_attention(site, ops.delta_attention.default, (
            q, k, v, mask, kv_rows, self.query_rows, self.rows[-1], self.dense, *self._attention_caches(site),
            self._stats_row(i), site.scale, self.tau, self.exact_below, site.k_memory, site.v_memory,
            site.softcap or 0.0))

    def _attention_caches(self, site: AttentionSite) -> list[fx.Node]:
        """The K/V, context and lse caches of one attention. CPU: stored [B, L, H, D] like SDPA's output and the
        compact K/V cache points, so that row-masked `where`s and gathers run on matching, vectorisable layouts."""
        qe, ke, ve, i = tensor_meta(site.q), tensor_meta(site.k), tensor_meta(site.v), site.index
        rows_first, lse_order = (HEADS_INNER, HEADS_INNER[:3]) if self.compact else (None, None)
        return [
            self._input(f"k_cache_{i}", tuple(ke.shape), ke.dtype, "k_cache", qe.device, rows_first),
            self._input(f"v_cache_{i}", tuple(ve.shape), ve.dtype, "v_cache", qe.device, rows_first),
            self._input(f"context_{i}", tuple(qe.shape), torch.float32, "context", qe.device, rows_first),
            self._input(f"lse_{i}", tuple(qe.shape[:3]), torch.float32, "lse", qe.device, lse_order),
        ]

    def _exact_attention(self, site: AttentionSite, q, k, v, mask) -> None:
        """Every query row recomputed by one SDPA call over the complete K/V, traced into the graph."""
        qe, i = tensor_meta(site.q), site.index
        self.result.attention[i] = EVERY_ROW_EXACT
        context = self._input(f"context_{i}", tuple(qe.shape), torch.float32, "context", qe.device, HEADS_INNER)
        step = self._replace_attention(site, exact_attention_step, (
            q, k, v, mask, self.query_rows, self.rows[-1], context, self._stats_row(i), site.scale, self.tau))
        self.writes.add(step)

    def _incremental_attention(self, site: AttentionSite, q, k, v, mask, kv_rows) -> None:
        """Exact rows and the incremental update over the changed columns: one `attention_step` call (C++), or
        traced into the graph as torch ops. Its K/V caches hold the previous step's K/V, the old terms."""
        if kv_rows is self.rows[-1]:  # layer 0: its changed keys are the changed input rows, always_rows too
            # a node of its own, so that the layer's segment reads the inputs of the others (`lowering.py` compiles
            # identical segments once)
            with self.graph.inserting_before(site.output):
                kv_rows = self.graph.call_function(torch.clone, (kv_rows,))
            kv_rows.meta["example_value"] = tensor_meta(self.rows[-1])
        if self.cpp_attention and all(tensor_meta(t).dtype == torch.float32 for t in (site.q, site.k, site.v)):
            self.result.attention[site.index], target = INCREMENTAL_CPP, ops.attention_step.default
        else:
            self.result.attention[site.index], target = INCREMENTAL, incremental_attention_step
        step = self._replace_attention(site, target, (
            q, k, v, mask, kv_rows, self.query_rows, self.rows[-1], self.dense, *self._attention_caches(site),
            self._stats_row(site.index), site.scale, self.tau))
        self.writes.add(step)

    def _replace_attention(self, site: AttentionSite, target, args: tuple) -> fx.Node:
        """Calls `target(*args)` (-> attention output, salient rows) in place of the attention at `site`; its
        salient rows become the row set of the region the attention gates. Returns the call node."""
        with self.graph.inserting_before(site.output):
            step = self.graph.call_function(target, args)
            out = self.graph.call_function(operator.getitem, (step, 0))
            rows = self.graph.call_function(operator.getitem, (step, 1))
        self.result.steps.append(step)
        out.meta["example_value"] = tensor_meta(site.output)
        site.output.replace_all_uses_with(out)
        self.rows[site.index] = rows
        return step

    def _propagate(self, node: fx.Node) -> None:
        partial_inputs = [a for a in node.all_input_nodes if a in self.partial]
        if not partial_inputs:
            return
        regions = {self.partial[a] for a in partial_inputs}
        full_varying = [a for a in node.all_input_nodes if a in self.analysis.varying and a not in self.partial]
        if node in self.analysis.rowwise and len(regions) == 1 and not full_varying:
            region = regions.pop()
            if not self.compact or self.compact.rewrite(node, set(partial_inputs), *self.index[region]):
                self.partial[node] = region
                return
        for a in partial_inputs:
            self._use_cache(node, a)


_LAYOUT = frozenset({"transpose", "permute", "reshape", "view", "contiguous", "unsqueeze", "squeeze", "flatten"})


def _reads_salient_rows_only(step: fx.Node) -> bool:
    """Whether the graph reads the output of the attention step `step` only at the rows it returns as salient:
    every path from the output runs through layout ops (`_LAYOUT`) to a `take_rows` by the index of those rows."""
    out = [u for u in step.users if u.target is operator.getitem and u.args[1] == 0]
    rows = [u for u in step.users if u.target is operator.getitem and u.args[1] == 1]
    pending = list(out)
    while pending:
        node = pending.pop()
        for user in node.users:
            if user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
                return False
            index = user.args[1] if user.target is compact_rows.take_rows else None
            if isinstance(index, fx.Node) and index.target is ops.select_rows.default and index.args[0] in rows:
                continue
            if op_name(user) not in _LAYOUT:
                return False
            pending.append(user)
    return bool(rows)
