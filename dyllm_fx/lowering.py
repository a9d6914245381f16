"""Inductor lowering of the rewritten graph: one compile per distinct layer segment, not one per layer.

The rewritten graph repeats one block per layer. Compiled whole, AOTAutograd and Inductor trace, schedule and
generate code for every layer again. `SegmentedGraph` cuts it before the attention steps it is given (the backend
gives every k-th step the rewrite put in, k = the `split_layers` option): with k = 1, segment i runs from attention
i up to attention i + 1 (its output projection, MLP, and the next layer's norm and Q/K/V projections), the first
segment holds the embedding and layer 0's projections, the last the final norm and the LM head; with k > 1 a
middle segment spans k layers. A segment reads everything that differs between layers as an input (weights,
caches, its attentions' rows of the stats buffer, `passes/saliency_rewrite.py`), so identical runs of layers give
the same segment graph over other tensors: it is compiled once and every such run calls the compiled function.

Segments exchange only tensors of static size: where a tensor of data-dependent size (a row index of the compact
path) would cross a cut, the cut moves on to the first node past its last reader, or is dropped if the next
attention comes first. Each compiled function is keyed by its segment's graph (`signature`: ops, constants and
wiring, not node names) and by the shapes, strides and dtypes of its inputs. Inductor does not fuse across a cut;
the layers' own kernels are unchanged.
"""
from typing import Callable

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.split_module import split_module


def _encode(arg, index: dict):
    if isinstance(arg, fx.Node):
        return ("node", index[arg])
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_encode(a, index) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _encode(v, index)) for k, v in arg.items()))
    return (type(arg).__name__, repr(arg))


def signature(gm: fx.GraphModule) -> tuple:
    """A graph's structure: each node's op, target and arguments, nodes named by position. Two graphs with the
    same signature compute the same function of their inputs."""
    index, out = {}, []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        target = node.target if node.op in ("call_function", "call_method", "get_attr") else None
        out.append((node.op, target, _encode(node.args, index), _encode(node.kwargs, index)))
    return tuple(out)


def _layout(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a)
                 for a in args)


def _data_dependent(value) -> bool:
    """Whether a node's value has a size (or is a number) known only at run time: a row index, its length."""
    if isinstance(value, torch.Tensor):
        return any(_data_dependent(s) for s in (*value.shape, *value.stride()))
    if isinstance(value, (tuple, list)):  # torch.Size included
        return any(_data_dependent(v) for v in value)
    return isinstance(value, torch.SymInt) and value.node.maybe_as_int() is None


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # the compact path's row indexes have data-dependent sizes (`select_rows`, `.item()`)
    return FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True, allow_scalar_outputs=True))


class _Segment:
    """One segment of the split graph as its compiled function (which takes and returns a tuple)."""

    def __init__(self, fn: Callable, single: bool):
        self.fn, self.single = fn, single

    def __call__(self, *args):
        out = self.fn(*args)
        return out[0] if self.single else out


class SegmentedGraph:
    """The rewritten graph `gm`, split at its attention steps `steps` (`_cuts`) and compiled per distinct segment by
    `compile_fx` with `config_patches`, for inputs laid out like `example_inputs`.

    Everything is compiled here, while Dynamo compiles the model. (Compiled at the first call instead, the fake
    tensors' traceback would keep Dynamo's code for the model alive, and with it the compiled model after
    `torch._dynamo.reset()`.) The example inputs are remade in a fake mode of our own, whose shape environment
    allows data-dependent sizes, and propagated through the graph once (`_probe`): that gives both where a
    data-dependent size lives (the cuts) and each segment's example inputs."""

    def __init__(self, gm: fx.GraphModule, steps: list[fx.Node], config_patches: dict, example_inputs):
        mode = _fake_mode()
        with mode:
            fakes = [torch.empty_strided(e.shape, e.stride(), dtype=e.dtype, device=e.device)
                     if isinstance(e, torch.Tensor) else e for e in example_inputs]
        values = _probe(gm, mode, fakes)
        cuts = set(_cuts(list(gm.graph.nodes), steps, values))
        part, k = {}, 0
        for node in gm.graph.nodes:
            k += node in cuts
            part[node] = k
        self.top = split_module(gm, None, lambda n: part[n], keep_original_order=True)
        by_name = {n.name: v for n, v in values.items()}
        compiled: dict = {}  # (segment graph, input layout) -> compiled function
        segments = list(self.top.named_children())
        for name, sub in segments:
            # a segment's placeholders are named after the nodes of `gm` whose values they take
            args = [by_name[p.target] for p in sub.graph.find_nodes(op="placeholder")]
            output = next(iter(sub.graph.find_nodes(op="output")))
            single = not isinstance(output.args[0], (tuple, list))
            if single:  # AOTAutograd wants a tuple of outputs
                output.args = ((output.args[0],),)
                sub.recompile()
            key = (signature(sub), _layout(args))
            if key not in compiled:
                from torch._inductor.compile_fx import compile_fx

                # a tracing context of our own: AOTAutograd takes the fake mode from it, not Dynamo's
                with torch.no_grad(), torch._guards.tracing(torch._guards.TracingContext(mode)):
                    compiled[key] = compile_fx(sub, args, config_patches=config_patches)
            delattr(self.top, name)
            setattr(self.top, name, _Segment(compiled[key], single))
        self.segments, self.compiles = len(segments), len(compiled)

    def __call__(self, *args):
        return self.top(*args)


def _probe(gm: fx.GraphModule, mode, fakes: list) -> dict:
    """Every node's value when `gm` runs on the fake inputs `fakes` (of `mode`); the graph's meta is left as it was."""
    nodes = list(gm.graph.nodes)
    kept = {n: {k: n.meta[k] for k in ("val", "unbacked_bindings") if k in n.meta} for n in nodes}
    # a plain function of the graph (an attention step) may make and drop sizes of its own inside
    with torch.no_grad(), mode.shape_env.ignore_fresh_unbacked_symbols():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    values = {n: n.meta.get("val") for n in nodes}
    for n in nodes:
        n.meta.pop("val", None)
        n.meta.pop("unbacked_bindings", None)
        n.meta.update(kept[n])
    return values


def _cuts(nodes: list[fx.Node], steps: list[fx.Node], values: dict) -> list[fx.Node]:
    """Where to cut: per attention step, the first node from it on (before the next step) that no value of
    data-dependent size crosses, i.e. none made before it is read from it on. That is the step itself unless a row
    index outlives it (a parallel block's MLP reads an index made before its attention); a step with no such node
    gets no cut."""
    position = {n: i for i, n in enumerate(nodes)}
    spans = [(position[n], max((position[u] for u in n.users), default=-1)) for n in nodes
             if _data_dependent(values[n])]
    ends = [position[s] for s in steps[1:]] + [len(nodes) - 1]  # the output node is never cut before
    cuts = []
    for step, end in zip(steps, ends):
        at = next((p for p in range(position[step], end) if not any(made < p <= read for made, read in spans)),
                  None)
        if at is not None:
            cuts.append(nodes[at])
    return cuts
