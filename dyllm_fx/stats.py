"""`dyllm_fx.stats(model)`: per layer, per step salient fractions, dense vs sparse steps, cache bytes,
and the ideal speedup by FLOPs at the salient fractions observed."""
from dataclasses import dataclass

import torch

from dyllm_fx.backend import CompiledGraph, graphs_of
from dyllm_fx.passes.saliency_rewrite import EVERY_ROW_EXACT


@dataclass
class GraphStats:
    """One compiled graph (one input shape)."""

    batch: int
    seq_len: int
    dense_steps: int
    sparse_steps: int
    salient: torch.Tensor  # [steps, layers] salient fraction of all rows, every recorded step
    dense_mask: torch.Tensor  # [steps] bool
    cache_bytes: int
    ideal_speedup: float

    @property
    def layer_salient_fraction(self) -> torch.Tensor:
        """Mean salient fraction per layer over the sparse steps."""
        sparse = self.salient[~self.dense_mask]
        return sparse.mean(0) if len(sparse) else torch.full((self.salient.shape[1],), float("nan"))

    @property
    def mean_salient_fraction(self) -> float:
        return float(self.layer_salient_fraction.mean())


def _flops(graph: CompiledGraph, record) -> tuple[float, float]:
    """(dense FLOPs, FLOPs this step needed) from the graph's plan and a step's row counts. Attention needs exact
    rows over every key and the incremental update (old and new terms of the changed keys) for the others, whichever
    form the graph computes it in."""
    B, L = graph.report.batch, graph.report.seq_len
    rows = B * L
    counts = record.layer_counts.double()
    region_rows = {-1: float(record.entry_rows.sum())}
    for i in range(counts.shape[0]):
        region_rows[i] = float(counts[i, 0])
    dense = needed = 0.0
    for lin in graph.linears:
        full = 2.0 * rows * lin.flops_per_row
        dense += full
        needed += full if (record.dense or lin.region is None) else 2.0 * region_rows[lin.region] * lin.flops_per_row
    for s in graph.sites:
        full = 4.0 * B * s.heads * L * L * s.head_dim
        dense += full
        if record.dense or not s.supported:
            needed += full
        else:
            changed = region_rows.get(s.index - 1, rows) if s.index > 0 else region_rows[-1]
            exact, incremental = float(counts[s.index, 1]), float(counts[s.index, 2])
            if graph.report.attention.get(s.index) == EVERY_ROW_EXACT:
                # recomputing every row is the backend's choice on CPU at short lengths, not the policy's need:
                # count the delta step (changed query rows exact, at most min(changed, query), the others incremental)
                query = float(counts[s.index, 3])
                exact = min(changed, query)
                incremental = query - exact
            needed += 4.0 * s.heads * s.head_dim * (exact * L + 2 * incremental * changed)
    return dense, needed


def graph_stats(graph: CompiledGraph) -> GraphStats:
    hist = graph.state.history
    rows = graph.report.batch * graph.report.seq_len
    salient = torch.stack([r.layer_counts[:, 0].double() / rows for r in hist]) if hist else torch.zeros(0, len(graph.sites))
    dense_sites = [s.index for s in graph.sites if not s.supported]
    salient[:, dense_sites] = 1.0  # an attention left dense recomputes every row
    dense_mask = torch.tensor([r.dense for r in hist], dtype=torch.bool)
    flops = [_flops(graph, r) for r in hist]
    ideal = sum(f[0] for f in flops) / max(sum(f[1] for f in flops), 1.0) if flops else float("nan")
    return GraphStats(graph.report.batch, graph.report.seq_len, int(dense_mask.sum()), int((~dense_mask).sum()),
                      salient, dense_mask, graph.state.cache_bytes, ideal)


class Stats(list):
    """A list of `GraphStats`, one per compiled graph of the model; prints as a table."""

    def __str__(self) -> str:
        lines = []
        for g in self:
            lines.append(f"graph [B={g.batch}, L={g.seq_len}]: {g.dense_steps} dense + {g.sparse_steps} sparse steps, "
                         f"cache {g.cache_bytes / 2**20:.2f} MiB, ideal speedup {g.ideal_speedup:.2f}x (FLOPs)")
            lines.append("| layer | salient fraction (sparse steps) |")
            lines.append("|---:|---:|")
            for i, f in enumerate(g.layer_salient_fraction.tolist()):
                lines.append(f"| {i} | {f:.3f} |")
            lines.append(f"| mean | {g.mean_salient_fraction:.3f} |")
        return "\n".join(lines) if lines else "dyllm: no compiled graph has run for this model"


def stats(model) -> Stats:
    """Statistics of every dyllm graph compiled for `model` (the compiled or the original module)."""
    return Stats(graph_stats(g) for g in graphs_of(model) if g.state is not None)


def reset(model) -> None:
    """Forgets the cached state of every dyllm graph of `model`: the next call starts a new sequence."""
    for g in graphs_of(model):
        if g.state is not None:
            g.state.reset()
