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


# Dynamo keeps at most `recompile_limit` compiled versions of a function (8); past that it runs the function
# uncompiled from then on, with no error. So explain compiles `_call`, which calls the model (Dynamo traces the
# model's forward inside it, whatever Dynamo decided for the forward as a function of its own), with the limits
# lifted for that compile.
_EXPLAIN_LIMITS = {name: 1 << 20 for name in ("recompile_limit", "accumulated_recompile_limit")
                   if hasattr(torch._dynamo.config, name)}


def _call(*args):
    """args: (module, its positional arguments, its keyword arguments); Dynamo names the module `L['args'][0]`, a
    root `report.where` strips."""
    module, positional, keywords = args
    return module(*positional, **keywords)


def explain(model: nn.Module, *args, **kwargs) -> Explanation:
    """Traces `model` (or the module a `torch.compile` wraps) on example inputs with the dyllm backend (eager
    lowering, nothing cached for the model) and returns one report per graph. Backend options may be passed as
    `options={...}`. Other compiled versions of the model are left as they are. Raises RuntimeError where Dynamo
    compiled nothing (the model's forward is skipped or disabled for Dynamo)."""
    options = dict(kwargs.pop("options", None) or {})
    options["lowering"] = "eager"
    module = getattr(model, "_orig_mod", model)
    recorder = _Recorder(**options)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(**_EXPLAIN_LIMITS):
            torch.compile(_call, backend=recorder, dynamic=False)(module, args, kwargs)
    finally:  # Dynamo keeps nothing of this compile for `_call` (its graphs would pile up over explain calls)
        reset_code = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
        if reset_code is not None:
            reset_code(_call.__code__)
    if not recorder.graphs:
        raise RuntimeError(f"dyllm_fx.explain: Dynamo compiled no graph of {type(module).__name__} on these inputs, "
                           "so there is nothing to explain. Its forward may be excluded from Dynamo "
                           "(torch.compiler.disable, a skipped file); TORCH_LOGS=dynamo says why, and "
                           "torch._dynamo.reset() clears what Dynamo kept from earlier compiles.")
    return Explanation(g.report for g in recorder.graphs)
