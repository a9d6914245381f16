"""The `dyllm` torch.compile backend: analyse the Dynamo graph, rewrite it, lower it, run it with state.

`dyllm_backend` is the `torch_dynamo_backends` entry point (`backend="dyllm"`); it must not register
itself at import. `backend(**options)` gives the same backend with options bound.
"""
import copy
import functools
import warnings
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from dyllm_fx.kernels import attention_step_cpp, panel_gemm
from dyllm_fx.lowering import SegmentedGraph
from dyllm_fx.options import Options
from dyllm_fx.outputs import note_written, owned
from dyllm_fx.passes.attention import find_attention
from dyllm_fx.passes.gated_pairs import fuse_gated_pairs
from dyllm_fx.passes.regions import plan_linears
from dyllm_fx.passes.saliency_rewrite import SaliencyRewrite
from dyllm_fx.passes.shared_input_linears import group_shared_input_linears
from dyllm_fx.passes.token_axis import TokenAxisAnalysis
from dyllm_fx.report import Report
from dyllm_fx.state import SequenceState

# Every live compiled graph, found again from a model's parameters by `stats`, `reset`, `explain`.
LIVE_GRAPHS: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()


def clone_dynamo_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy that keeps what AOTAutograd reads from Dynamo (static inputs for CUDA graphs)."""
    new = copy.deepcopy(gm)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    for a, b in zip(gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")):
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
    return new


def _is_user_input(node: fx.Node, example) -> bool:
    return not isinstance(example, nn.Parameter) and "_buffers_" not in node.name and "_parameters_" not in node.name


def _token_input(placeholders, example_inputs) -> Optional[int]:
    users = [i for i, (n, e) in enumerate(zip(placeholders, example_inputs))
             if isinstance(e, torch.Tensor) and _is_user_input(n, e)]
    ids = [i for i in users if not example_inputs[i].is_floating_point() and example_inputs[i].dim() == 2
           and example_inputs[i].dtype != torch.bool]
    if ids:
        # Placeholders come in the order the code first reads them (a model may read position ids before the
        # tokens): an argument named like token ids wins, one named like positions, masks or segment ids loses.
        def rank(i):
            name = placeholders[i].name.lower()
            return 0 if "input_ids" in name else 2 if any(w in name for w in ("position", "mask", "type")) else 1
        return min(ids, key=rank)
    for i in users:
        if example_inputs[i].is_floating_point() and example_inputs[i].dim() == 3:
            return i
    return None


def _graph_break() -> tuple[Optional[str], bool]:
    """(why this graph ends at a graph break, whether it resumes after one), from Dynamo's tracer."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        reason = tx.output.compile_subgraph_reason
        ends = reason.reason.strip().splitlines()[0] if reason is not None and reason.graph_break else None
        return ends, tx.f_code.co_name.startswith("torch_dynamo_resume_in_")
    except Exception:  # private API: no tracer, no verdict
        return None, False


def _static_fakes(tensors) -> list:
    """The runtime-owned inputs as static fake tensors of Dynamo's fake mode: given as real tensors, Inductor
    would fakify them itself, possibly with symbolic sizes that no Dynamo source names (a guard on one then
    fails to build: `symbol_to_source` IndexError)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode()
    if fake_mode is None:
        return list(tensors)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _allow_data_dependent_sizes(example_inputs) -> None:
    """Lets the compiler trace `select_rows` (an output size that depends on data) and the `.item()` of
    `select_rows_per_sequence` in this graph: Dynamo allows them only under `fullgraph=True` or
    `capture_dynamic_output_shape_ops` / `capture_scalar_outputs`, settings of the graph's ShapeEnv that the
    rewrite, not the user's code, needs."""
    import dataclasses

    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None and not (shape_env.allow_dynamic_output_shape_ops and shape_env.allow_scalar_outputs):
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True,
                                                 allow_scalar_outputs=True)


def _packed_bytes(linears) -> int:
    """Bytes of the packed copies `packed_linear` makes: each distinct fp32 weight of a gated linear, once."""
    weights = {l.node.args[1]: l.node.args[1].meta.get("example_value") for l in linears if l.region is not None}
    return sum(w.numel() * w.element_size() for w in weights.values()
               if isinstance(w, torch.Tensor) and w.dtype == torch.float32)


class SourceKey(CustomGraphPass):
    """A post-grad pass that does nothing but key Inductor's FX-graph cache on this package's sources:
    a cached graph compiled against other versions of our ops (fake impls, layouts) is never reused."""

    def __call__(self, graph) -> None:
        pass

    def uuid(self) -> bytes:
        return _source_hash()


@functools.cache
def _source_hash() -> bytes:
    import dyllm_fx

    root = Path(dyllm_fx.__file__).parent
    folders = [root, Path(dyllm_fx.passes.__file__).parent, Path(dyllm_fx.kernels.__file__).parent]
    return get_hash_for_files(tuple(sorted(str(f) for d in folders for f in d.glob("*.py"))))


def _cacheable(gm: fx.GraphModule) -> dict:
    """Config patches that let AOTAutograd's cache hold the rewritten graph. It refuses a graph that calls plain
    Python functions it does not know (ours: `take_rows`, `put_rows`, the attention step, ...), so every compile
    of the rewritten graph would trace it again (about a minute on the default model). Each of our functions is
    marked cacheable under this package's source hash, which is part of the cache key: an entry made by other
    sources is never reused."""
    key = "unsafe_marked_cacheable_functions"
    if not hasattr(torch._inductor.config, key):
        return {}
    ours = {f"{n.target.__module__}.{n.target.__name__}" for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__module__", "").startswith("dyllm_fx.")}
    if not ours:
        return {}
    marked = dict(getattr(torch._inductor.config, key))
    marked.update(dict.fromkeys(sorted(ours), _source_hash().hex()))
    return {key: marked}


class CompiledGraph:
    """One graph compiled by the dyllm backend: the rewritten callable, its state and its report."""

    def __init__(self, gm: fx.GraphModule, example_inputs, options: Options, mode: Optional[str]):
        self.options = options
        self.mode = mode
        self.original = gm
        # by identity, weakly: an id alone could match a later model's parameter allocated where a dead one was
        self.params = weakref.WeakValueDictionary({id(e): e for e in example_inputs if isinstance(e, nn.Parameter)})
        self.report = Report(options)
        self.state: Optional[SequenceState] = None
        self.written: list[torch.Tensor] = []  # returned caches whose written-row masks end the graph's outputs
        self.linears, self.sites, self.analysis = [], [], None
        self.compact = False
        self.compiled = self._build(gm, list(example_inputs))
        LIVE_GRAPHS.add(self)

    def _lower(self, gm, example_inputs, steps=()):
        """`gm` compiled (or as is with `lowering="eager"`); with the attention `steps` of a rewritten graph and
        `split_layers`, compiled per distinct segment (`lowering.py`)."""
        if self.options.lowering == "eager":
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
        patches["post_grad_custom_post_pass"] = SourceKey()
        patches.update(_cacheable(gm))
        if steps:
            # ~1100 size asserts per sparse step in Inductor's Python wrapper, on the few rows: a serial cost the
            # worker threads wait on (our ops' fake impls give the sizes; tests check them eagerly)
            patches["size_asserts"] = False
        per_segment = self.options.layers_per_segment()
        if steps and per_segment:
            cuts = list(steps)[::per_segment]  # a cut before every k-th attention step
            self.report.segmented = SegmentedGraph(gm, cuts, patches, example_inputs)
            return self.report.segmented
        if self.compact:
            _allow_data_dependent_sizes(example_inputs)
        return compile_fx(gm, example_inputs, config_patches=patches)

    def _fallback(self, gm, example_inputs, why: str, warn: bool = True):
        self.report.fallback = why
        if warn:
            warnings.warn(f"dyllm: running the model unchanged: {why}", stacklevel=2)
        return self._lower(gm, example_inputs)

    def _build(self, gm, example_inputs):
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        ends_at_break, resumes = _graph_break()
        if ends_at_break or resumes:
            return self._fallback(gm, example_inputs, "the model has a graph break" + (
                f" ({ends_at_break})" if ends_at_break else "") + "; the backend needs the whole model in one graph: "
                "remove the break (find it with TORCH_LOGS=graph_breaks or torch._dynamo.explain)", warn=not resumes)
        if any(not isinstance(e, torch.Tensor) for e in example_inputs) or any(
            isinstance(s, torch.SymInt) for e in example_inputs if isinstance(e, torch.Tensor) for s in e.shape
        ):
            return self._fallback(gm, example_inputs, "the graph has dynamic shapes; compile with "
                                  "torch.compile(model, backend='dyllm', dynamic=False)")
        if torch.is_grad_enabled() and any(isinstance(e, nn.Parameter) and e.requires_grad for e in example_inputs):
            return self._fallback(gm, example_inputs, "gradients are enabled (training); call the model under "
                                  "torch.no_grad() or torch.inference_mode() for the fast path")
        token_index = _token_input(placeholders, example_inputs)
        if token_index is None:
            return self._fallback(gm, example_inputs, "no token input found: the model's first input must be "
                                  "token ids [B, L] or embeddings [B, L, D]")
        if int(example_inputs[token_index].shape[1]) < 2:
            return self._fallback(gm, example_inputs, "sequence length < 2")
        for n in gm.graph.nodes:
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "dropout" and \
                    n.kwargs.get("training", n.args[2] if len(n.args) > 2 else False):
                return self._fallback(gm, example_inputs, "dropout is active (train mode); call model.eval()")
        self.analysis = analysis = TokenAxisAnalysis(gm, placeholders[token_index])
        self.sites = sites = find_attention(gm, analysis)
        self.report.sites = sites
        if not sites:
            return self._fallback(gm, example_inputs, "no attention found in the graph (nothing to gate)")
        if not any(s.supported for s in sites):
            return self._fallback(gm, example_inputs, "no attention the delta-attention op can replace: " +
                                  "; ".join(sorted({s.reason for s in sites})))
        self.linears = plan_linears(gm, analysis, sites, self.options.policy)
        self.report.linears = self.linears
        self.report.batch, self.report.seq_len = analysis.B, analysis.L
        rewritten = clone_dynamo_gm(gm)
        node_map = dict(zip(gm.graph.nodes, rewritten.graph.nodes))
        r_analysis = TokenAxisAnalysis(rewritten, node_map[placeholders[token_index]])
        r_sites = find_attention(rewritten, r_analysis)
        r_linears = plan_linears(rewritten, r_analysis, r_sites, self.options.policy)
        device = example_inputs[token_index].device
        self.compact, packed = self.options.compact(device), self.options.packed(device)
        # builds the C++ attention step for the model's head dims now (seconds, once per process), not at the
        # first sparse step
        cpp_attention = self.compact and device.type == "cpu" and attention_step_cpp.available(
            {s.head_dim for s in r_sites if s.supported})
        result = SaliencyRewrite(rewritten, r_analysis, r_sites, r_linears, self.options.tau,
                                 self.options.exact_below(device, cpp_attention), self.compact, packed,
                                 cpp_attention).run()
        self.report.cache_points = result.cache_points
        if not self.compact:
            self.report.fused_pairs = fuse_gated_pairs(rewritten)
        self.report.attention = result.attention
        if packed:
            self.report.packed_bytes = _packed_bytes(self.linears)
            self.report.grouped_linears = group_shared_input_linears(rewritten)
            if device.type == "cpu":
                panel_gemm.available()  # builds the GEMM now (seconds, once), not at the first call
        others = [i for i, (n, e) in enumerate(zip(placeholders, example_inputs))
                  if i != token_index and _is_user_input(n, e)]
        self.state = SequenceState(result.buffers, device, self.options, token_index, others)
        by_name = {b.name: t for b, t in zip(self.state.buffers, self.state.tensors)}
        self.written = [by_name[name] for name in result.written]  # their masks end the graph's outputs
        self.report.cache_bytes = self.state.cache_bytes
        self.rewritten = rewritten
        return self._lower(rewritten, example_inputs + _static_fakes(self.state.tensors), result.steps)

    def __call__(self, *args):
        if self.state is None:
            return self.compiled(*args)
        if torch.is_grad_enabled() and any(isinstance(a, nn.Parameter) and a.requires_grad for a in args):
            return self.original(*args)
        extra = self.state.prepare(args)
        out = self.compiled(*args, *extra)
        self.state.record()
        if self.written:
            n = len(out) - len(self.written)
            for cache, rows in zip(self.written, out[n:]):
                note_written(cache, rows)
            out = type(out)(out[:n])
        return owned(out, self.state.storages)


def dyllm_backend(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None):
    """torch.compile backend entry point: `torch.compile(model, backend="dyllm", options={...})`."""
    return CompiledGraph(gm, example_inputs, Options.from_dict(options), mode)


class Backend:
    """`dyllm_fx.backend(**options)`: the dyllm backend with options bound."""

    def __init__(self, **options):
        self.options = Options.from_dict(options)

    def __call__(self, gm, example_inputs, mode=None, options=None):
        opts = self.options if not options else Options.from_dict({**self.options.__dict__, **options})
        return CompiledGraph(gm, example_inputs, opts, mode)


def backend(**options) -> Backend:
    """A backend callable for `torch.compile(model, backend=dyllm_fx.backend(tau=0.99))`."""
    return Backend(**options)


def graphs_of(model) -> list[CompiledGraph]:
    """The live compiled graphs that captured this model's parameters."""
    params = {id(p): p for p in model.parameters()} if isinstance(model, nn.Module) else {}
    return [g for g in list(LIVE_GRAPHS) if any(g.params.get(i) is p for i, p in params.items())]
