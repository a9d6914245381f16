"""The saliency test: which query rows' attention context moved since the previous step.

A row `(b, l)` is salient when `cos(new[b, :, l, :], old[b, :, l, :]) < tau` over all heads together (fp32
accumulation), or, with `tau >= 1`, when any element changed at all (exactness); rows in `always` are
salient whatever their cosine, rows outside `query` never are. Contexts are `[B, H, L, D]`, any strides.

`saliency_triton` fuses the cosine, the threshold and the compaction: besides the `[B, L]` mask it returns
the flat row index and count of `row_index.py` (`index int32 [B * L]`, `count int32 [1]`) for the next
sparse-row ops.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import launch


def saliency_reference(new: Tensor, old: Tensor, query: Tensor, always: Tensor, tau: float) -> Tensor:
    if tau >= 1.0:
        moved = (new != old).any(3).any(1)
    else:
        dot = (new * old).sum((1, 3), dtype=torch.float32)
        norms = new.square().sum((1, 3), dtype=torch.float32) * old.square().sum((1, 3), dtype=torch.float32)
        moved = dot < tau * norms.sqrt().clamp_min(1e-30)
    return (moved | always) & query


@triton.jit
def _saliency_kernel(NEW, OLD, QUERY, ALWAYS, SALIENT, INDEX, COUNT, H, L, D, tau,
                     snb, snh, snl, sob, soh, sol, EXACT: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    l = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    nn = tl.zeros((BLOCK_D,), dtype=tl.float32)
    oo = tl.zeros((BLOCK_D,), dtype=tl.float32)
    diff = tl.zeros((BLOCK_D,), dtype=tl.int32)
    for h in range(0, H):
        for d0 in range(0, D, BLOCK_D):
            ok = d0 + offs < D
            n = tl.load(NEW + b * snb + h * snh + l * snl + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            o = tl.load(OLD + b * sob + h * soh + l * sol + d0 + offs, mask=ok, other=0.0).to(tl.float32)
            dot += n * o
            nn += n * n
            oo += o * o
            diff = tl.maximum(diff, (n != o).to(tl.int32))
    if EXACT:
        moved = tl.max(diff, axis=0) > 0
    else:
        norms = tl.sqrt(tl.sum(nn, axis=0) * tl.sum(oo, axis=0))
        moved = tl.sum(dot, axis=0) < tau * tl.maximum(norms, 1e-30)
    row = b * L + l
    salient = (moved | (tl.load(ALWAYS + row) != 0)) & (tl.load(QUERY + row) != 0)
    tl.store(SALIENT + row, salient.to(tl.int8))
    slot = tl.atomic_add(COUNT, salient.to(tl.int32))
    tl.store(INDEX + slot, row.to(tl.int32), mask=salient)


def saliency_triton(new: Tensor, old: Tensor, query: Tensor, always: Tensor, tau: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(salient bool [B, L], flat index int32 [B * L], count int32 [1])."""
    B, H, L, D = new.shape
    if new.stride(3) != 1 or old.stride(3) != 1:
        raise ValueError("saliency_triton needs contexts with a contiguous last axis")
    salient = torch.empty(B, L, dtype=torch.int8, device=new.device)
    index = torch.zeros(B * L, dtype=torch.int32, device=new.device)
    count = torch.zeros(1, dtype=torch.int32, device=new.device)
    launch(_saliency_kernel)[(B, L)](
        new, old, query.contiguous().view(torch.int8), always.contiguous().view(torch.int8), salient, index, count,
        H, L, D, float(tau), new.stride(0), new.stride(1), new.stride(2), old.stride(0), old.stride(1), old.stride(2),
        EXACT=tau >= 1.0, BLOCK_D=min(triton.next_power_of_2(D), 128))
    return salient.view(torch.bool), index, count


def saliency(new: Tensor, old: Tensor, query: Tensor, always: Tensor, tau: float) -> Tensor:
    from .dispatch import use_triton

    if use_triton(new) and new.stride(3) == 1 and old.stride(3) == 1:
        return saliency_triton(new, old, query, always, tau)[0]
    return saliency_reference(new, old, query, always, tau)
