"""Who owns a compiled model's outputs: the caller, unless it borrows them.

A rewritten graph may return one of its cache buffers, or a view of one (the logits of a gated LM head are the
head's output cache). The next call writes that buffer in place, so by default `CompiledGraph` returns a copy of
every output sharing storage with a cache: outputs stay valid after later calls, as torch.compile promises.
Inside `borrowed_outputs()` such an output is returned as it is, without the copy (a 50 MB write per step for
SmolLM2's [2, 128, 49152] logits): it is valid until the model's next call, like the outputs of CUDA graphs.
`generate` and `teacher_forced_agreement` borrow: they read each step's logits before the next call.

A borrowed cache output also tells which of its rows the call wrote (`rows_written`): the others hold what the
previous call returned there, bit for bit. A decoding loop re-reads only those rows (`generate`'s greedy scan).
"""
import contextlib
import contextvars
import weakref
from typing import Optional

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


# a returned cache's storage address -> (weakref to the cache, its layout, the [B, L] rows its last call wrote)
_WRITTEN: dict[int, tuple] = {}


def note_written(cache: Tensor, rows: Tensor) -> None:
    """Records that the call which just returned `cache` (a [B, L, ...] cache buffer) wrote its `rows` ([B, L] bool)
    and no other (`CompiledGraph`, after each call)."""
    key = cache.untyped_storage().data_ptr()
    entry = _WRITTEN.get(key)
    if entry is not None and entry[0]() is cache:  # every call after the first: the same cache and layout
        _WRITTEN[key] = (*entry[:2], rows)
        return
    ref = weakref.ref(cache, lambda r, key=key: _WRITTEN.pop(key) if _WRITTEN.get(key, (None,))[0] is r else None)
    _WRITTEN[key] = (ref, _layout(cache), rows)


def rows_written(output: Tensor) -> Optional[Tensor]:
    """For an output of a dyllm-compiled model taken under `borrowed_outputs()` ([B, L, ...]: the logits), the
    [B, L] bool mask of the rows its call wrote: every other row holds what the same model's previous call returned
    there. Read it before the model's next call. None where not known (the output is not one of the model's caches,
    or was copied: every row may have changed)."""
    entry = _WRITTEN.get(output.untyped_storage().data_ptr())
    if entry is None:
        return None
    cache, layout, rows = entry
    cache = cache()
    if cache is None or cache.untyped_storage().data_ptr() != output.untyped_storage().data_ptr() or \
            _layout(output) != layout:
        return None
    return rows


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.storage_offset(), t.dtype
