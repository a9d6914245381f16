"""`dyllm::sparse_rows_linear`: a linear layer computed only on the selected rows.

`y[r] = x[r] @ weight.T + bias` for the rows `r` set in the bool `[B, L]` mask `rows`; the other rows of
`y` are left uninitialised: the rewrite only lets them reach row-wise ops, linears that read the
selected rows, and cache writes of the selected rows. Optional epilogue: `activation` (`ACTIVATIONS`) of that,
times `x[r] @ weight2.T + bias2` when `weight2` is given (the gated pair of a SwiGLU/GeGLU MLP in one op:
`passes/gated_pairs.py`).

CPU: the plain-torch reference (a data-dependent `nonzero`, so the matmul shrinks with the row count).
CUDA: the Triton kernel of `sparse_rows_linear_triton.py` over the row index of `row_index.py` (static
capacity, device-side count: no host synchronisation), when the rows are the leading `B * L` elements of
a contiguous `x`; otherwise the reference.

Lowering: the op is a `torch.library.triton_op`. Under `torch.compile` its body is traced: on CUDA Inductor
sees the row-index and linear kernels as user-defined Triton kernels (`triton_kernel_wrapper_functional`) and
emits them in its own wrapper, beside the kernels it generates; elsewhere it sees the opaque reference op
`dyllm::sparse_rows_linear_reference`. Not a `TritonTemplate`: a template's epilogue assumes its output index
is the layout index, and this op scatters into data-dependent rows of a full-length output.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .dispatch import use_triton
from .row_layout import flat_rows, gather_rows, scatter_rows_


# CPU BLAS (MKL) runs a GEMM of fewer than 12 rows (except 4 and 8) with other kernels, in another summation
# order: the same row comes out a few ulps apart depending on how many rows were selected with it, and a deep
# model amplifies that (SmolLM2-135M: 1e-3 on the logits at tau=1.0). Computing at least this many rows (the
# first unselected ones are added) gives every row the result of the dense GEMM.
MIN_ROWS = 12

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
               "relu2": lambda t: F.relu(t).square()}


def _at_least(rows: Tensor, n: int) -> Tensor:
    missing = n - int(rows.sum())
    if missing <= 0:
        return rows
    flat = rows.reshape(-1).clone()
    flat[(~flat).nonzero().squeeze(1)[:missing]] = True
    return flat.view_as(rows)


def _epilogue(x, weight, bias, activation, weight2, bias2):
    y = F.linear(x, weight, bias)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    return y if weight2 is None else y * F.linear(x, weight2, bias2)


def sparse_rows_linear_reference(x, weight, bias, rows, batch_axis, token_axis, activation=None, weight2=None,
                                 bias2=None):
    if x.device.type == "cpu":
        rows = _at_least(rows, MIN_ROWS)
    if bool(rows.all()):
        return _epilogue(x, weight, bias, activation, weight2, bias2)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    selected = gather_rows(x, rows, batch_axis, token_axis)
    scatter_rows_(out, rows, _epilogue(selected, weight, bias, activation, weight2, bias2), batch_axis, token_axis)
    return out


def check_epilogue(activation, weight, weight2, bias, bias2):
    """The epilogue arguments both paths take (`sparse_rows_linear_triton` checks with this too)."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"sparse_rows_linear: activation {activation!r}; valid: None, {', '.join(ACTIVATIONS)}")
    if weight2 is not None and (weight2.shape != weight.shape or (bias is None) != (bias2 is None)):
        raise ValueError("sparse_rows_linear: weight2 must have weight's shape, and bias2 must be given exactly when "
                         "bias is")


@torch.library.custom_op("dyllm::sparse_rows_linear_reference", mutates_args=())
def _reference_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, batch_axis: int, token_axis: int,
    activation: Optional[str] = None, weight2: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
) -> Tensor:
    return sparse_rows_linear_reference(x, weight, bias, rows, batch_axis, token_axis, activation, weight2, bias2)


@_reference_op.register_fake
def _(x, weight, bias, rows, batch_axis, token_axis, activation=None, weight2=None, bias2=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@triton_op("dyllm::sparse_rows_linear", mutates_args=())
def sparse_rows_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, batch_axis: int, token_axis: int,
    activation: Optional[str] = None, weight2: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
) -> Tensor:
    check_epilogue(activation, weight, weight2, bias, bias2)
    x2d = flat_rows(x, rows, batch_axis, token_axis) if use_triton(x) else None
    if x2d is None or weight.stride(1) != 1 or (weight2 is not None and weight2.stride(1) != 1):
        return torch.ops.dyllm.sparse_rows_linear_reference(x, weight, bias, rows, batch_axis, token_axis,
                                                           activation, weight2, bias2)
    from .row_index import row_index
    from .sparse_rows_linear_triton import sparse_rows_linear_triton

    index, count = row_index(rows.reshape(1, -1))
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    sparse_rows_linear_triton(x2d, weight, bias, index.view(-1), count, out.view(x2d.shape[0], weight.shape[0]),
                              activation=activation, weight2=weight2, bias2=bias2)
    return out
