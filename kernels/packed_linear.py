"""`packed_linear`: a CPU linear on a weight prepacked once for oneDNN (the compact path's GEMM below tau = 1).

MKL's fp32 GEMM, which `F.linear` calls on CPU, repacks the weight on every call. At the few rows of a sparse
step that repacking costs more than the arithmetic (a micro-benchmark on 2 cores: SmolLM2's 49152 x 576 LM head
on 12 rows, 23 ms through `F.linear`, 9 ms through oneDNN on a prepacked weight, about the time to read it once).

oneDNN's GEMM on a packed weight is batch invariant: a row's result does not depend on how many other rows are in
the call (tested), so unlike `compact_rows.rows_linear` no padding rows are needed. Its summation order differs
from MKL's (results differ from `F.linear` by fp32 rounding), which is why tau = 1.0 keeps the MKL path: there
the rewritten model reproduces the original bit for bit.

The packed copies live in `_PACKED`, keyed weakly by the weight tensor (dropped with it) and re-packed when the
weight's version counter moves (an in-place update). They cost as much memory as the weights they copy.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

_PACKED = WeakTensorKeyDictionary()  # weight -> (weight._version, packed weight)
PACK_ROWS_HINT = 16  # the row count oneDNN chooses its packed layout for
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def available(dtype: torch.dtype, device) -> bool:
    """Whether `packed_linear` runs oneDNN for this weight dtype and device (else it is `F.linear`)."""
    return _ONEDNN and torch.device(device).type == "cpu" and dtype == torch.float32


def packed_weight(weight: Tensor) -> Tensor:
    """The oneDNN-packed copy of `weight`, made on first use and after every in-place update of `weight`."""
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT))
        _PACKED[weight] = entry
    return entry[1]


# Defined with `torch.library.define`/`impl` rather than `custom_op`: in a micro-benchmark `custom_op`'s per-call
# Python wrapper cost ~90 us, more than the GEMM at a sparse step's few rows (~200 calls per step), this ~30 us.
torch.library.define("dyllm::packed_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.impl("dyllm::packed_linear", "CPU")
def _packed_linear_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if not _ONEDNN or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), packed_weight(weight), bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.impl("dyllm::packed_linear", "CompositeExplicitAutograd")
def _packed_linear_other(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x, weight, bias)  # no packed GEMM off CPU


@torch.library.register_fake("dyllm::packed_linear")
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


packed_linear = torch.ops.dyllm.packed_linear.default
