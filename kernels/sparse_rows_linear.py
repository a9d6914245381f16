"""`dyllm::sparse_rows_linear`: a linear layer computed only on the selected rows.

`y[r] = x[r] @ weight.T + bias` for the rows `r` set in the bool `[B, L]` mask `rows`; the other rows of
`y` are left uninitialised: the rewrite only lets them reach row-wise ops, linears that read the
selected rows, and cache writes of the selected rows.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .row_layout import gather_rows, scatter_rows_


def sparse_rows_linear_reference(x, weight, bias, rows, batch_axis, token_axis):
    if bool(rows.all()):
        return F.linear(x, weight, bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    selected = gather_rows(x, rows, batch_axis, token_axis)
    scatter_rows_(out, rows, F.linear(selected, weight, bias), batch_axis, token_axis)
    return out


@torch.library.custom_op("dyllm::sparse_rows_linear", mutates_args=())
def sparse_rows_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], rows: Tensor, batch_axis: int, token_axis: int
) -> Tensor:
    return sparse_rows_linear_reference(x, weight, bias, rows, batch_axis, token_axis)


@sparse_rows_linear.register_fake
def _(x, weight, bias, rows, batch_axis, token_axis):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
