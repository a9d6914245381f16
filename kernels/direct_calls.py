"""Inductor's Python wrapper calls our ops' Python implementations directly, not through the dispatcher.

Our CPU ops (`packed_linear`, `select_rows`, `attention_step`) are Python functions registered as op kernels. In
a compiled graph Inductor calls each as `torch.ops.dyllm.<op>.default(...)`: the dispatcher boxes the arguments
and calls back into Python, which costs more than the work of many calls, and a sparse step of the default model
makes about 180 such calls. Where Inductor has a registry of custom wrapper code for fallback kernels
(`torch._inductor.codegen.custom_extern_kernel_codegen`), `register()` makes the wrapper call
`extern_kernels.dyllm_<op>(...)` instead: the function the op's kernel runs, with the same arguments. Where it
has none, nothing changes. The compiled graph is an inference graph, already functionalized: the dispatcher has
no autograd or functionalization to run there. Under the profiler each call records the op's name, as the
dispatcher would.
"""
import contextlib
from typing import Callable, Iterator
from unittest import mock

import torch

from .attention_step_cpp import attention_step
from .compact_rows import select_rows_impl
from .packed_linear import packed_linear_any

# the op as Inductor's wrapper names it -> (name under `extern_kernels`, implementation, profiler event)
DIRECT: dict[str, tuple[str, Callable, str]] = {
    "torch.ops.dyllm.packed_linear.default": ("dyllm_packed_linear", packed_linear_any, "dyllm::packed_linear"),
    "torch.ops.dyllm.select_rows.default": ("dyllm_select_rows", select_rows_impl, "dyllm::select_rows"),
    "torch.ops.dyllm.attention_step.default": ("dyllm_attention_step", attention_step, "dyllm::attention_step"),
}


def _recorded(fn: Callable, event: str) -> Callable:
    def call(*args, **kwargs):  # Inductor passes an argument left at its schema default by name
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(event):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _wrapper_line(name: str) -> Callable:
    def python(node, writeline) -> None:
        args = [*node.codegen_args(), *node.codegen_kwargs()]
        writeline(f"{node.get_name()} = extern_kernels.{name}({', '.join(args)})")

    return python


def register() -> bool:
    """Installs the direct calls; False (and nothing changed) where this Inductor has no registry for them."""
    try:
        from torch._inductor.codegen.custom_extern_kernel_codegen import (CUSTOM_EXTERN_KERNEL_CODEGEN,
                                                                          CustomCodegen)
        from torch._inductor.select_algorithm import extern_kernels
    except ImportError:
        return False
    for op, (name, fn, event) in DIRECT.items():
        setattr(extern_kernels, name, _recorded(fn, event))
        CUSTOM_EXTERN_KERNEL_CODEGEN[op] = CustomCodegen(python=_wrapper_line(name))
    return True


REGISTERED = register()


@contextlib.contextmanager
def dispatched() -> Iterator[None]:
    """Inside it, Inductor compiles call our ops through the dispatcher again (benchmarks' A/B, tests). Inductor's
    and AOTAutograd's compile caches are off inside it: their keys do not see the registry, so a cached compile
    would bring the direct calls back."""
    if not REGISTERED:
        yield
        return
    from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN as registry

    with mock.patch.dict(registry, {k: v for k, v in registry.items() if k not in DIRECT}, clear=True), \
            torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
