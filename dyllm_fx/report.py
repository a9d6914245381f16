"""What the backend found and did for one graph, printable as tables (`dyllm_fx.explain`).

Nodes are named by the module that produced them (Dynamo's `nn_module_stack`, e.g.
`model.layers.0.mlp.down_proj`), falling back to the FX node name for code outside any module.
"""
from dataclasses import dataclass, field
from typing import Optional


def where(node) -> str:
    """The module path of the code that produced `node` (without Dynamo's `L['self']` root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    for root in ("L['self'].", "L['args'][0].", "L['self']", "L['args'][0]"):
        if path.startswith(root):
            path = path[len(root):]
            break
    return path or node.name


def mask_kind(site) -> str:
    if site.mask is None:
        return "none"
    meta = site.mask.meta.get("example_value", site.mask.meta.get("val"))
    dtype = getattr(meta, "dtype", None)
    return "boolean" if str(dtype) == "torch.bool" else "additive"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


@dataclass
class Report:
    options: object
    fallback: Optional[str] = None
    sites: list = field(default_factory=list)
    linears: list = field(default_factory=list)
    cache_points: list = field(default_factory=list)
    attention: dict = field(default_factory=dict)  # site index -> form of its sparse step (`RewriteResult`)
    cache_bytes: int = 0
    packed_bytes: int = 0  # packed copies of the gated linears' weights (`packed_weights`)
    grouped_linears: int = 0  # packed linears computed with others that read the same rows, one GEMM per group
    fused_pairs: int = 0  # gated SwiGLU/GeGLU pairs computed by one sparse-row linear (`passes/gated_pairs.py`)
    batch: int = 0
    seq_len: int = 0
    segmented: object = None  # the `lowering.SegmentedGraph` the graph runs as (option split_layers)

    @property
    def gated(self) -> list:
        """The linears computed only on a row set (`LinearSite`, `region` set)."""
        return [l for l in self.linears if l.region is not None]

    @property
    def dense(self) -> list[tuple[str, str]]:
        """What stays dense and why: `(module path, reason)` for attentions and linears."""
        return ([(where(s.output), s.reason) for s in self.sites if not s.supported] +
                [(where(l.node), l.reason) for l in self.linears if l.region is None])

    @property
    def cache_bytes_per_token(self) -> float:
        return self.cache_bytes / max(self.batch * self.seq_len, 1)

    def __str__(self) -> str:
        out = [f"dyllm: policy={self.options.policy} tau={self.options.tau}"]
        if self.fallback:
            out.append(f"runs unchanged: {self.fallback}")
        if self.sites:
            out.append(table(
                ["attention", "module", "kind", "heads", "kv heads", "head dim", "mask", "replaced by"],
                [[s.index, where(s.output), s.kind, s.heads, s.kv_heads, s.head_dim, mask_kind(s),
                  f"delta attention: {self.attention.get(s.index, '?')}" if s.supported else f"dense: {s.reason}"]
                 for s in self.sites]))
        if self.linears:
            out.append(table(
                ["linear", "class", "weight", "rows computed"],
                [[where(l.node), l.cls, "x".join(str(int(d)) for d in l.node.args[1].meta["example_value"].shape)
                  if "example_value" in l.node.args[1].meta else "?",
                  "dense: " + (l.reason or "") if l.region is None else
                  ("rows changed at the input" if l.region < 0 else f"saliency of attention {l.region}")]
                 for l in self.linears]))
        if self.batch:
            out.append(f"cache: {self.cache_bytes / 2**20:.2f} MiB for {self.batch} x {self.seq_len} tokens "
                       f"({self.cache_bytes_per_token / 1024:.1f} KiB per token), {len(self.cache_points)} cache points")
        if self.fused_pairs:
            out.append(f"gated pairs: {self.fused_pairs} MLP gate/up projection pairs (SwiGLU/GeGLU), each fused into "
                       "one sparse-row linear (one pass over the input's rows)")
        if self.packed_bytes:
            out.append(f"packed weights: {self.packed_bytes / 2**20:.2f} MiB, packed copies of the gated linears' "
                       "fp32 weights (option packed_weights; False saves the memory, costs speed on CPU)")
        if self.grouped_linears:
            out.append(f"grouped linears: {self.grouped_linears} gated linears share their input rows with others "
                       "(Q/K/V, gate/up) and run as one GEMM per group")
        if self.segmented is not None and self.segmented.segments:
            out.append(f"lowering: {self.segmented.segments} segments cut at the attentions (option split_layers: "
                       f"layers per segment), {self.segmented.compiles} Inductor compiles (segments with the same "
                       "graph share one)")
        return "\n\n".join(out)
