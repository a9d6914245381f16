"""Compaction of a row mask into a fixed-capacity row index and a device-side count.

`row_index(mask [G, L])` returns `index int32 [G, L]` and `count int32 [G]`: for group `g`, the first
`count[g]` slots of `index[g]` hold the positions of the set rows, each once; the order inside a group is
not specified (the row kernels do not depend on it) and the slots past the count are not read. The shapes
are static (capacity = L): no recompilation, no host synchronisation. A flat index over `[B, L]` rows is
`row_index(mask.view(1, B * L))`.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import launch


def row_index_reference(mask: Tensor) -> tuple[Tensor, Tensor]:
    G, L = mask.shape
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices
    return order.to(torch.int32), mask.sum(1, dtype=torch.int32)


@triton.jit
def _row_index_kernel(MASK, INDEX, COUNT, L, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    set_ = tl.load(MASK + g * L + offs, mask=offs < L, other=0).to(tl.int32)
    total = tl.sum(set_, axis=0)
    base = tl.atomic_add(COUNT + g, total)  # this block's first slot; blocks land in any order
    slot = base + tl.cumsum(set_, axis=0) - 1
    tl.store(INDEX + g * L + slot, offs.to(tl.int32), mask=set_ != 0)


def row_index_triton(mask: Tensor, block: int = 256) -> tuple[Tensor, Tensor]:
    G, L = mask.shape
    mask = mask.contiguous().view(torch.int8) if mask.dtype == torch.bool else mask.contiguous()
    index = torch.zeros(G, L, dtype=torch.int32, device=mask.device)
    count = torch.zeros(G, dtype=torch.int32, device=mask.device)
    block = min(block, triton.next_power_of_2(L))
    launch(_row_index_kernel)[(G, triton.cdiv(L, block))](mask, index, count, L, BLOCK=block)
    return index, count


def row_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    from .dispatch import use_triton

    return row_index_triton(mask) if use_triton(mask) else row_index_reference(mask)
