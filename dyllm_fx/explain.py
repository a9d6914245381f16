"""`dyllm_fx.explain(model, *args, **kwargs)`: what the backend finds in a model, without running it fast."""
import torch
from torch import nn

from dyllm_fx.backend import LIVE_GRAPHS, Backend


class Explanation(list):
    """One `Report` per graph Dynamo produced (more than one: the model has graph breaks)."""

    @property
    def graph_breaks(self) -> list[str]:
        return [r.fallback for r in self if r.fallback and "graph break" in r.fallback]

    def __str__(self) -> str:
        head = []
        if len(self) > 1:
            head.append(f"{len(self)} graphs: the model has graph breaks, the backend sees it in pieces and runs "
                        "it unchanged; remove them (TORCH_LOGS=graph_breaks) for a rewrite")
        return "\n\n".join(head + [str(r) for r in self])


class _Recorder(Backend):
    """The backend, keeping the graphs it builds to itself: `stats` and `reset` of the model never see them."""

    def __init__(self, **options):
        super().__init__(**options)
        self.graphs = []

    def __call__(self, gm, example_inputs, mode=None, options=None):
        graph = super().__call__(gm, example_inputs, mode, options)
        LIVE_GRAPHS.discard(graph)
        self.graphs.append(graph)
        return graph


def explain(model: nn.Module, *args, **kwargs) -> Explanation:
    """Traces `model` (or the module a `torch.compile` wraps) on example inputs with the dyllm backend (eager
    lowering, nothing cached for the model) and returns one report per graph. Backend options may be passed as
    `options={...}`. Other compiled versions of the model are left as they are."""
    options = dict(kwargs.pop("options", None) or {})
    options["lowering"] = "eager"
    module = getattr(model, "_orig_mod", model)
    recorder = _Recorder(**options)
    with torch.no_grad():
        torch.compile(module, backend=recorder, dynamic=False)(*args, **kwargs)
    return Explanation(g.report for g in recorder.graphs)
