"""How a tensor's rows map to the `[B, L]` row mask.

Every row op takes two ints: `token_axis`, and `batch_axis`, which equals `token_axis` when batch and
token are merged into one flat axis of size `B * L` (batch outer), and is -1 when the batch has size 1
and no axis of its own. Both cases index rows by the flat position `b * L + l`.
"""
from typing import Optional

from torch import Tensor


def row_axes(batch_axis: int, token_axis: int) -> tuple:
    """The axes that index rows, outer first."""
    return (token_axis,) if batch_axis == token_axis or batch_axis < 0 else (batch_axis, token_axis)


def rows_view(t: Tensor, batch_axis: int, token_axis: int) -> Tensor:
    """`t` with its row axes moved to the front (outer first)."""
    rows = row_axes(batch_axis, token_axis)
    return t.movedim(rows, tuple(range(len(rows))))


def flat_index(rows: Tensor) -> Tensor:
    """The flat positions `b * L + l` of the set rows of a `[B, L]` mask, ascending."""
    return rows.reshape(-1).nonzero().squeeze(1)


def _index(rows: Tensor, batch_axis: int, token_axis: int):
    if batch_axis == token_axis or batch_axis < 0:
        return (flat_index(rows),)
    return tuple(rows.nonzero().unbind(1))


def _leading_rows(t: Tensor, batch_axis: int, token_axis: int) -> bool:
    """Rows are the leading `B * L` elements of a contiguous tensor: a flat `[B * L, rest]` view exists."""
    leading = token_axis == 0 and batch_axis in (0, -1) or (batch_axis, token_axis) == (0, 1)
    return leading and t.is_contiguous()


def flat_rows(t: Tensor, rows: Tensor, batch_axis: int, token_axis: int) -> Optional[Tensor]:
    """`t` as a `[B * L, features]` view when its rows are its leading elements and one feature axis follows
    (the layout the Triton row kernels take); None otherwise."""
    if t.dim() != token_axis + 2 or not _leading_rows(t, batch_axis, token_axis):
        return None
    return t.view(rows.numel(), t.shape[-1])


def row_mask(t: Tensor, rows: Tensor, batch_axis: int, token_axis: int) -> Tensor:
    """The `[B, L]` row mask shaped to broadcast against `t` (for `torch.where`: no host synchronisation)."""
    shape = [1] * t.dim()
    if batch_axis == token_axis or batch_axis < 0:
        shape[token_axis] = rows.numel()
    else:
        shape[batch_axis], shape[token_axis] = rows.shape
        if batch_axis > token_axis:
            rows = rows.t()
    return rows.reshape(shape)


def gather_rows(t: Tensor, rows: Tensor, batch_axis: int, token_axis: int) -> Tensor:
    """The selected rows of `t` as `[n, *other axes]`."""
    if _leading_rows(t, batch_axis, token_axis):
        flat = t.view(rows.numel(), *t.shape[token_axis + 1:])
        return flat.index_select(0, flat_index(rows))
    return rows_view(t, batch_axis, token_axis)[_index(rows, batch_axis, token_axis)]


def scatter_rows_(t: Tensor, rows: Tensor, values: Tensor, batch_axis: int, token_axis: int) -> None:
    """Writes `values` (`[n, *other axes]`, as from `gather_rows`) into the selected rows of `t`."""
    if _leading_rows(t, batch_axis, token_axis):
        flat = t.view(rows.numel(), *t.shape[token_axis + 1:])
        flat.index_copy_(0, flat_index(rows), values)
        return
    rows_view(t, batch_axis, token_axis)[_index(rows, batch_axis, token_axis)] = values
