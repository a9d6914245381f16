"""`dyllm_fx.explain(model, *args, **kwargs)`: what the backend finds in a model, without running it fast."""
import torch
from torch import nn

from dyllm_fx.backend import Backend, graphs_of


class Explanation(list):
    """One `Report` per graph Dynamo produced (more than one: the model has graph breaks)."""

    graph_breaks: list

    def __str__(self) -> str:
        head = []
        if len(self.graph_breaks):
            head.append(f"{len(self.graph_breaks)} graph break(s): the backend sees the model in pieces; "
                        "remove them (TORCH_LOGS=graph_breaks) for a full rewrite. Reasons: " +
                        "; ".join(str(b.reason) for b in self.graph_breaks[:3]))
        return "\n\n".join(head + [str(r) for r in self])


def explain(model: nn.Module, *args, **kwargs) -> Explanation:
    """Traces `model` on example inputs with the dyllm backend (eager lowering) and returns its reports.
    Options of the backend may be passed as `options={...}`."""
    options = dict(kwargs.pop("options", None) or {})
    options["lowering"] = "eager"
    module = getattr(model, "_orig_mod", model)
    before = set(map(id, graphs_of(module)))
    compiled = torch.compile(module, backend=Backend(**options), dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
        breaks = torch._dynamo.explain(module)(*args, **kwargs).break_reasons
    result = Explanation(g.report for g in graphs_of(module) if id(g) not in before)
    result.graph_breaks = breaks
    return result
