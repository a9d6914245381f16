"""Triton kernel of the sparse-row linear: `out[r] = epilogue(x[r] @ W^T + b)` for the rows `r` in a
fixed-capacity index with a device-side count, written straight into the full-length output.

One program computes a `BLOCK_M x BLOCK_N` tile for `BLOCK_M` index slots; programs whose slots are all past
the count return at once, so the launch grid is static (capacity) and the work follows the count.
Epilogues (constexpr): bias; activation (`silu`, `gelu` (erf), `gelu_tanh`, `relu2`); the gated product of a
SwiGLU/GeGLU pair (`act(x @ W^T + b) * (x @ W2^T + b2)`: gate and up in one pass over `x[r]`); residual add
(`residual[r] + ...`). Block sizes: autotuned on CUDA (`CUDA_CONFIGS`), fixed under the interpreter. fp32 inputs
accumulate in IEEE fp32 (no TF32), so `tau = 1.0` stays exact; half inputs use the tensor cores with fp32
accumulation (upcast first under the interpreter, whose `tl.dot` on bf16 returns garbage with triton 3.9).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import interpreted, launch
from .sparse_rows_linear import check_epilogue
from .triton_dot import dot

ACTIVATIONS = {None: 0, "silu": 1, "gelu": 2, "relu2": 3, "gelu_tanh": 4}  # `_activate`'s codes of the op's names


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = x * tl.sigmoid(x)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = tl.maximum(x, 0.0)
        x = x * x
    elif ACT == 4:  # tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x


@triton.jit
def _sparse_rows_linear_kernel(
    X, W, B, W2, B2, RES, OUT, INDEX, COUNT,
    N, K, stride_xm, stride_wn, stride_rm, stride_om,
    HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    count = tl.load(COUNT)
    first = tl.program_id(0) * BLOCK_M
    if first >= count:
        return
    slots = first + tl.arange(0, BLOCK_M)
    valid = slots < count
    rows = tl.load(INDEX + slots, mask=valid, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_ptrs = offs_n[None, :] * stride_wn + offs_k[:, None]
        w_ok = n_ok[None, :] & k_ok[:, None]
        w = tl.load(W + w_ptrs, mask=w_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += dot(x, w, IEEE)
        if GATED:
            w2 = tl.load(W2 + w_ptrs, mask=w_ok, other=0.0)
            if UPCAST:
                w2 = w2.to(tl.float32)
            acc2 += dot(x, w2, IEEE)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(B2 + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _activate(acc, ACT)
    if GATED:
        acc = acc * acc2
    out_ok = valid[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(RES + rows[:, None] * stride_rm + offs_n[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=out_ok)


# CUDA: block sizes autotuned per weight shape and dtype (Triton's autotuner; under torch.compile Inductor takes
# the configs and tunes the user kernel itself). Tuning reruns the kernel, which only writes `out`: harmless.
CUDA_CONFIGS = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
                for m, n, k, w, s in [(16, 128, 128, 4, 4), (32, 128, 64, 4, 3), (64, 128, 64, 4, 3),
                                      (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (32, 256, 64, 8, 3)]]
_tuned_kernel = triton.autotune(CUDA_CONFIGS, key=["N", "K"])(_sparse_rows_linear_kernel)
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # few programs; tl.dot's minimum tile


def sparse_rows_linear_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], index: Tensor, count: Tensor, out: Optional[Tensor] = None, *,
    activation: Optional[str] = None, weight2: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
    residual: Optional[Tensor] = None, **blocks,
) -> Tensor:
    """`x [M, K]`, `weight [N, K]` (`weight2` likewise: gated pair), `index int32 [cap]`, `count int32 [1]`.
    Writes the indexed rows of `out [M, N]` (allocated uninitialised when None) and returns it."""
    check_epilogue(activation, weight, weight2, bias, bias2)
    M, K = x.shape
    N = weight.shape[0]
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("sparse_rows_linear_triton needs x and weight with contiguous last axes")
    out = x.new_empty(M, N) if out is None else out
    capacity = index.numel()
    if x.device.type != "cpu" and not blocks:
        kernel, cfg = _tuned_kernel, {}
        grid = lambda meta: (triton.cdiv(capacity, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    else:  # the interpreter, or blocks given (tests, benchmarks)
        kernel, cfg = _sparse_rows_linear_kernel, {**INTERPRETER_BLOCKS, **blocks}
        grid = (triton.cdiv(capacity, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    dummy = weight
    launch(kernel)[grid](
        x, weight, bias if bias is not None else dummy, weight2 if weight2 is not None else dummy,
        bias2 if bias2 is not None else dummy, residual if residual is not None else dummy, out, index, count,
        N, K, x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, GATED=weight2 is not None, ACT=ACTIVATIONS[activation],
        HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, UPCAST=interpreted() and x.dtype != torch.float32,
        **cfg)
    return out
