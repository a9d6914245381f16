"""`dyllm::row_update_`: writes the selected rows of a freshly computed tensor into its cache.

After the call the cache holds the new value on the selected rows and the cached one elsewhere; the
rewritten graph reads the cache in place of the tensor. CPU: gather/scatter of the selected rows; CUDA:
one elementwise `where` over the cache (no host synchronisation), traced into the graph (a `triton_op`, as
`sparse_rows_linear.py` says) so that Inductor fuses it with its neighbours.
"""
import torch
from torch import Tensor
from torch.library import triton_op

from .dispatch import use_triton
from .row_layout import gather_rows, row_mask, scatter_rows_


def row_update_reference(cache, new, rows, batch_axis, token_axis):
    if bool(rows.all()):
        cache.copy_(new)
        return
    scatter_rows_(cache, rows, gather_rows(new, rows, batch_axis, token_axis).to(cache.dtype), batch_axis, token_axis)


@torch.library.custom_op("dyllm::row_update_reference", mutates_args={"cache"})
def _reference_op(cache: Tensor, new: Tensor, rows: Tensor, batch_axis: int, token_axis: int) -> None:
    row_update_reference(cache, new, rows, batch_axis, token_axis)


@_reference_op.register_fake
def _(cache, new, rows, batch_axis, token_axis):
    return None


@triton_op("dyllm::row_update_", mutates_args={"cache"})
def row_update_(cache: Tensor, new: Tensor, rows: Tensor, batch_axis: int, token_axis: int) -> None:
    if use_triton(cache):
        torch.where(row_mask(cache, rows, batch_axis, token_axis), new.to(cache.dtype), cache, out=cache)
        return
    torch.ops.dyllm.row_update_reference(cache, new, rows, batch_axis, token_axis)
