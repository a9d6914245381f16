"""Who owns a compiled model's outputs: the caller, unless it borrows them.

A rewritten graph may return one of its cache buffers, or a view of one (the logits of a gated LM head are the
head's output cache). The next call writes that buffer in place, so by default `CompiledGraph` returns a copy of
every output sharing storage with a cache: outputs stay valid after later calls, as torch.compile promises.
Inside `borrowed_outputs()` such an output is returned as it is, without the copy (a 50 MB write per step for
SmolLM2's [2, 128, 49152] logits): it is valid until the model's next call, like the outputs of CUDA graphs.
`generate` and `teacher_forced_agreement` borrow: they read each step's logits before the next call.
"""
import contextlib
import contextvars

from torch import Tensor

_BORROWED = contextvars.ContextVar("dyllm_borrowed_outputs", default=False)


@contextlib.contextmanager
def borrowed_outputs():
    """Within this context, outputs of dyllm-compiled models may be their cache buffers: read or copy each
    output before calling the same model again."""
    token = _BORROWED.set(True)
    try:
        yield
    finally:
        _BORROWED.reset(token)


def owned(outputs, cache_storages: frozenset):
    """`outputs` (a graph's list or tuple of outputs) with a copy of each tensor whose storage is one of
    `cache_storages` (data pointers), unless the caller borrows."""
    if _BORROWED.get():
        return outputs
    copied = [o.clone() if isinstance(o, Tensor) and o.untyped_storage().data_ptr() in cache_storages else o
              for o in outputs]
    return tuple(copied) if isinstance(outputs, tuple) else copied
