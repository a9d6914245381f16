"""Compact rows: a row set as an index, and tensors holding only those rows (the CPU path of the rewrite).

`select_rows(rows)` turns a bool `[B, L]` row mask into the flat row index `b * L + l` of its set rows
(ascending; a data-dependent size, an unbacked size to the compiler). A *compact* tensor keeps the rank
and axis order of its full counterpart, with the batch axis of size 1 and the token axis of size `n`
(the index length); when batch and token share one flat axis (or `B == 1`), that axis has size `n`.
Row-wise ops run on compact tensors unchanged, so a region's pointwise work, norms and matmuls all shrink
with `n`, and Inductor compiles the gathers and the region's pointwise ops into its own kernels.

- `select_rows_per_sequence(rows)`: per sequence, the set rows padded to the largest count (`[B, n]`), for
  work that must stay within a sequence (the incremental attention's columns and exact rows).
- `take_rows(t, index, batch_axis, token_axis)`: the compact tensor of a full one (a gather).
- `rows_linear(x, weight, bias)`: a linear on a compact tensor, exact against the dense one on CPU.
- `put_rows(cache, index, values, batch_axis, token_axis)`: writes a compact tensor into the rows of its
  full-size cache, in place (the cache is allocated rows-first, `rows_first_order`, so the write is one
  `index_copy_` that Inductor compiles and fuses with the ops computing the values).

Axes as in `row_layout.py`: `batch_axis == token_axis` for one flat `B * L` axis, -1 when `B == 1`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .row_layout import flat_index, row_axes, rows_view
from .sparse_rows_linear import MIN_ROWS


# `torch.library.define`/`impl`, not `custom_op`: ~30 of these run per step, and `custom_op`'s Python wrapper
# costs more than the `nonzero` itself (see `packed_linear.py`).
torch.library.define("dyllm::select_rows", "(Tensor rows) -> Tensor")


def select_rows_impl(rows: Tensor) -> Tensor:
    """The op's implementation (also called directly by Inductor's wrapper, `direct_calls.py`)."""
    return flat_index(rows)


torch.library.impl("dyllm::select_rows", "CompositeExplicitAutograd")(select_rows_impl)


@torch.library.register_fake("dyllm::select_rows")
def _(rows):
    n = torch.library.get_ctx().new_dynamic_size(max=rows.numel())
    return rows.new_empty(n, dtype=torch.int64)


select_rows = torch.ops.dyllm.select_rows.default

def select_rows_per_sequence(rows: Tensor) -> Tensor:
    """`[B, L]` mask -> `[B, n]`: per sequence, its set rows ascending, then its other rows ascending, cut at the
    largest count `n`, at least 2 (or L), so that no lowering has to decide `n == 1` for an unbacked `n`.
    Every slot names a real row of its sequence, each row at most once. Plain torch, traced into the graph (the
    count is an unbacked size read by `.item()`): an opaque op's per-call dispatch cost more than its work."""
    L = rows.shape[1]
    order = torch.sort(rows.to(torch.int8), dim=1, descending=True, stable=True).indices
    if L <= 2:
        return order
    n = rows.sum(1).max().clamp(2, L).item()
    torch._check(n >= 2)
    torch._check(n <= L)
    return order.narrow(1, 0, n)


def take_rows(t: Tensor, index: Tensor, batch_axis: int, token_axis: int) -> Tensor:
    """The rows `index` of the full tensor `t`, as a compact tensor."""
    if batch_axis == token_axis or batch_axis < 0:
        return t.index_select(token_axis, index)
    rows_first = rows_view(t, batch_axis, token_axis)
    flat = rows_first.flatten(0, 1).index_select(0, index)
    return flat.unsqueeze(0).movedim((0, 1), (batch_axis, token_axis))


def take_token_rows(t: Tensor, index: Tensor, token_axis: int, length: int) -> Tensor:
    """Rows of a tensor that has the token axis but no batch axis (positions' cos/sin: same for every
    sequence): row `b * L + l` reads token `l`."""
    return t.index_select(token_axis, index % length)


def rows_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`F.linear` on a compact tensor. CPU BLAS computes a GEMM of fewer than `MIN_ROWS` rows in another
    summation order (see `sparse_rows_linear.py`); zero rows appended up to `MIN_ROWS` (and at least one) give
    every row the dense GEMM's result, whatever the row count."""
    flat = x.reshape(-1, x.shape[-1])
    # at least one zero row: torch 2.11's Inductor divides by the size hint of this block, which is 0 for
    # `max(MIN_ROWS - n, 0)` when it hints `n` at its upper bound
    padded = torch.cat([flat, flat.new_zeros(torch.sym_max(MIN_ROWS - flat.shape[0], 1), flat.shape[-1])])
    y = F.linear(padded, weight, bias).narrow(0, 0, flat.shape[0])
    return y.view(*x.shape[:-1], weight.shape[0])


def rows_first_order(ndim: int, batch_axis: int, token_axis: int) -> tuple:
    """The memory order (outermost axis first) of a cache `put_rows` writes: its rows outermost."""
    rows = row_axes(batch_axis, token_axis)
    return rows + tuple(d for d in range(ndim) if d not in rows)


def flat_rows_view(cache: Tensor, batch_axis: int, token_axis: int) -> Tensor:
    """`cache` (rows outermost in memory, `rows_first_order`) as a view with one leading axis of its rows."""
    rows_first = rows_view(cache, batch_axis, token_axis)
    return rows_first.view(-1, *rows_first.shape[len(row_axes(batch_axis, token_axis)):])


def put_rows(cache: Tensor, index: Tensor, values: Tensor, batch_axis: int, token_axis: int) -> None:
    """Writes the compact `values` into the rows `index` of `cache`, in place. The cache's rows are outermost
    in memory (`rows_first_order`): one `index_copy_`, which Inductor compiles into the graph."""
    flat = flat_rows_view(cache, batch_axis, token_axis)
    new = rows_view(values, batch_axis, token_axis).reshape(-1, *flat.shape[1:])
    flat.index_copy_(0, index, new.to(flat.dtype))
