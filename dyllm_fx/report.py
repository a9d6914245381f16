"""What the backend found and did for one graph: printable as a table (`dyllm_fx.explain`)."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Report:
    options: object
    fallback: Optional[str] = None
    sites: list = field(default_factory=list)
    linears: list = field(default_factory=list)
    cache_points: list = field(default_factory=list)
    cache_bytes: int = 0
    batch: int = 0
    seq_len: int = 0

    def __str__(self) -> str:
        lines = [f"dyllm: policy={self.options.policy} tau={self.options.tau}"]
        if self.fallback:
            lines.append(f"runs unchanged: {self.fallback}")
        for s in self.sites:
            mask = "none" if s.mask is None else "yes"
            state = "delta attention" if s.supported else f"dense ({s.reason})"
            lines.append(f"attention {s.index}: {s.kind}, heads {s.heads}, kv heads {s.kv_heads}, "
                         f"head dim {s.head_dim}, mask {mask}: {state}")
        for l in self.linears:
            gate = "dense: " + (l.reason or "") if l.region is None else (
                "rows changed at the input" if l.region < 0 else f"saliency of attention {l.region}")
            lines.append(f"  linear {l.node.name} [{l.cls}]: {gate}")
        if self.batch:
            per_token = self.cache_bytes / max(self.batch * self.seq_len, 1)
            lines.append(f"cache: {self.cache_bytes / 2**20:.2f} MiB ({per_token / 1024:.1f} KiB per token), "
                         f"{len(self.cache_points)} cache points")
        return "\n".join(lines)
