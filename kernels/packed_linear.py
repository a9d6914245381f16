"""`packed_linear`: the compact path's CPU linear below tau = 1, on a sparse step's few rows and a dense step's all.

`packed_linear(x, [w1, w2, ...], [b1, b2, ...])` is `cat([F.linear(x, w1, b1), F.linear(x, w2, b2), ...], -1)`:
linears that read the same rows (a layer's Q, K and V projections, an MLP's gate and up) are one call
(`passes/shared_input_linears.py`). A bias may be None.

The group's weights are concatenated and packed once into column panels, and every call is one `panel_gemm`
(`panel_gemm.py`) at any row count. MKL's fp32 GEMM, which `F.linear` calls on CPU, repacks the weight on every
call, and at a sparse step's few rows that costs more than the arithmetic. Where the C++ kernel cannot be built,
the packed copy is oneDNN's and every call is one oneDNN GEMM.

With `panel_gemm` a row's result does not depend on the other rows of its call (tested); with oneDNN it may
(seen with torch 2.11 between 1 and 3 rows). Both sum in another order than MKL (results differ from
`F.linear` by fp32 rounding), which is why tau = 1.0 keeps the MKL path: there the rewritten model reproduces
the original bit for bit.

`packed_linear_put_(cache, index, x, weights, biases, ...)` is `put_rows` of the same product into a cache, for the
logits a graph returns: the GEMM writes straight into the cache's rows (all of them at a dense step).

The packed copies live in `_PACKED`, keyed by the group's first weight (the entry is dropped with it) and re-made when
a weight or bias of the group is another tensor or its version counter moved (an in-place update). They cost as
much memory as the weights they copy.
"""
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import panel_gemm
from .compact_rows import flat_rows_view, put_rows, rows_view

# id(first weight) -> the group's entry (`_new_entry`: weakrefs to its weights and biases, their versions, the packed
# copies, its sizes); a plain dict (a weak-keyed one cost more per lookup than a sparse step's GEMM on a few rows),
# cleared by the first weakref's callback when the weight is freed
_PACKED: dict = {}
PACK_ROWS_HINT = 16  # the row count oneDNN chooses its packed layout for (where panel_gemm is not built)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def available(dtype: torch.dtype, device) -> bool:
    """Whether `packed_linear` runs a packed GEMM for this weight dtype and device (else it is `F.linear`)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and (_ONEDNN or panel_gemm.available())


def _concatenated_bias(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    if all(b is None for b in biases):
        return None
    return torch.cat([w.new_zeros(w.shape[0]) if b is None else b.detach() for w, b in zip(weights, biases)])


def _pack(w: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    if panel_gemm.available():
        return panel_gemm.pack(w), panel_gemm.pack_bias(bias)
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT), bias


def _new_entry(weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> tuple:
    """Packs the group into its `_PACKED` entry, where it has none or its entry is not `_current` (a weight or bias
    replaced or updated in place): (refs, versions, packed weight, packed bias, output features, input features,
    the packed bias's address or 0)."""
    parts = (*weights, *(b for b in biases if b is not None))
    key = id(weights[0])
    w = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
    refs = (weakref.ref(weights[0], lambda _, key=key: _PACKED.pop(key, None)),
            *(weakref.ref(t) for t in parts[1:]))
    packed, bias = _pack(w, _concatenated_bias(weights, biases))
    entry = (refs, tuple(t._version for t in parts), packed, bias, w.shape[0], w.shape[1],
             0 if bias is None else bias.data_ptr())
    _PACKED[key] = entry
    return entry


def _current(entry: tuple, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> bool:
    """Whether `entry` was made from these very weights and biases, none updated in place since (a plain loop: this
    runs on every call, ~120 per sparse step)."""
    refs, versions = entry[0], entry[1]
    i = 0
    for group in (weights, biases):
        for t in group:
            if t is None:
                continue
            if i == len(refs) or refs[i]() is not t or versions[i] != t._version:
                return False
            i += 1
    return i == len(refs)


def _plain(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> Tensor:
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


# Defined with `torch.library.define`/`impl` rather than `custom_op`: in a micro-benchmark `custom_op`'s per-call
# Python wrapper cost ~90 us, more than the GEMM at a sparse step's few rows (~200 calls per step), this ~30 us.
torch.library.define("dyllm::packed_linear", "(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor")


def packed_linear_cpu(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                      out: Optional[Tensor] = None, out_rows: Optional[Tensor] = None) -> Tensor:
    """The op on CPU (also called directly by Inductor's wrapper, `direct_calls.py`). Lean on purpose: in a sparse
    step every microsecond of Python here is paid ~120 times, and several times over (the GEMMs between the calls
    evict the interpreter's data from the caches). `out` (`packed_linear_put_`): a 2-D fp32 tensor with contiguous
    rows that receives the result, one row per row of `x`, or row i in `out[out_rows[i]]` where `out_rows` (int64,
    contiguous, valid rows of `out`: the caller checks) is given; `out` is returned."""
    entry = _PACKED.get(id(weights[0]))
    if entry is None or x.dtype != torch.float32 or not _current(entry, weights, biases):
        if x.dtype != torch.float32 or any(w.dtype != torch.float32 for w in weights) or \
                not (panel_gemm.available() or _ONEDNN):
            return _into(out, _plain(x, weights, biases), out_rows)
        entry = _new_entry(weights, biases)
    _, _, packed, bias, n, k, bias_ptr = entry
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if flat.shape[1] != k:  # bounds the kernel's reads
        raise ValueError(f"packed_linear: the input has {flat.shape[1]} features, the weights {k}")
    kernel = panel_gemm.kernel()
    if flat.shape[0] == 0:
        y = flat.new_empty(0, n)
    elif kernel is not None:
        y = panel_gemm.call(kernel, flat if flat.stride(1) == 1 else flat.contiguous(), packed, bias_ptr, n, out=out,
                            out_rows=out_rows)
        if out is not None:
            return y
    else:
        y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), packed, bias, "none", [], "")
    return _into(out, y if x.dim() == 2 else y.view(*x.shape[:-1], n), out_rows)


def _into(out: Optional[Tensor], y: Tensor, out_rows: Optional[Tensor] = None) -> Tensor:
    if out is None:
        return y
    if out_rows is None:
        return out.copy_(y.reshape(out.shape))
    return out.index_copy_(0, out_rows, y.reshape(-1, out.shape[1]))


torch.library.impl("dyllm::packed_linear", "CPU")(packed_linear_cpu)


@torch.library.impl("dyllm::packed_linear", "CompositeExplicitAutograd")
def _packed_linear_other(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]]) -> Tensor:
    return _plain(x, weights, biases)  # no packed GEMM off CPU


def packed_linear_any(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]]) -> Tensor:
    """The op's implementation for `x`'s device, without the dispatcher (`direct_calls.py`)."""
    return packed_linear_cpu(x, weights, biases) if x.is_cpu else _plain(x, weights, biases)


@torch.library.register_fake("dyllm::packed_linear")
def _(x, weights, biases):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


packed_linear = torch.ops.dyllm.packed_linear.default

torch.library.define(
    "dyllm::packed_linear_put_",
    "(Tensor(a!) cache, Tensor index, Tensor x, Tensor[] weights, Tensor?[] biases, int batch_axis, "
    "int token_axis) -> ()")


@torch.library.impl("dyllm::packed_linear_put_", "CompositeExplicitAutograd")
def packed_linear_put_(cache: Tensor, index: Tensor, x: Tensor, weights: list[Tensor],
                       biases: list[Optional[Tensor]], batch_axis: int, token_axis: int) -> None:
    """`put_rows(cache, index, packed_linear(x, weights, biases), batch_axis, token_axis)` as one call, for a graph
    output's cache (`passes/saliency_rewrite.py`). Where the cache's rows are one fp32 matrix with contiguous rows,
    the GEMM writes its rows of the cache directly, with no temporary (the default model's logits: 50 MB at a dense
    step, a fresh allocation then a copy; a few MB at a sparse one): the whole cache where `index` names every row
    (a dense step: the index ascends without repeats), else row i into row `index[i]`."""
    flat = flat_rows_view(cache, batch_axis, token_axis)
    if x.is_cpu and flat.dim() == 2 and flat.stride(1) == 1 and flat.dtype == torch.float32 and \
            index.dtype == torch.int64:
        rows = rows_view(x, batch_axis, token_axis).reshape(-1, x.shape[-1])  # x has the cache's axes
        if index.numel() == rows.shape[0] == flat.shape[0]:
            packed_linear_cpu(rows, weights, biases, out=flat)
            return
        if index.numel() == rows.shape[0]:
            if index.numel():
                low, high = torch.aminmax(index)
                if low < 0 or high >= flat.shape[0]:
                    raise IndexError(f"packed_linear_put_: index out of range for a cache of {flat.shape[0]} rows")
            packed_linear_cpu(rows, weights, biases, out=flat, out_rows=index.contiguous())
            return
    put_rows(cache, index, packed_linear_any(x, weights, biases), batch_axis, token_axis)


@torch.library.register_fake("dyllm::packed_linear_put_")
def _(cache, index, x, weights, biases, batch_axis, token_axis):
    return None
