"""`row_gemm`: `x @ w.T (+ b)` on CPU for the few rows of a sparse step, one pass over the plain weight.

At a sparse step a gated linear runs on a handful of rows, and its time is reading the weight. BLAS GEMMs are
built for many rows: MKL repacks the weight on every call and oneDNN's packed GEMM (and its fixed cost per call)
took 2-3x the time of one read of the weight at 4-16 rows (`benchmarks/gemm_floor.py`). This kernel streams
each weight row once: a thread takes blocks of 5 weight rows, and for every pair of input rows (held in L1)
accumulates the 10 dot products in vector registers over the shared axis (10 independent FMA chains, 16 vector
registers in all with AVX2), then reduces each to one output. It reads the weight as it is: no packed copy.

Each output element is one dot product in a fixed summation order, whatever the other rows of the call: a row's
result does not depend on how many rows share its call (batch invariant). The order is not BLAS's, so results
differ from `F.linear` by fp32 rounding.

The C++ below is compiled once per process (and cached on disk) by Inductor's C++ toolchain (`cpp_build.py`).
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import cpp_build

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>

using Vec = at::vec::Vectorized<float>;

// acc[i][j] += x[i, k:k+count] . w[j, k:k+count]; a partial load (count < Vec::size()) fills the other lanes with 0
template <int MB, int NB>
static inline void accumulate(Vec (&acc)[MB][NB], const float* x, const float* w, int64_t k, int64_t count,
                              int64_t K, int64_t ldx) {
    Vec wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = Vec::loadu(w + j * K + k, count);
    for (int i = 0; i < MB; ++i) {
        Vec xv = Vec::loadu(x + i * ldx + k, count);
        for (int j = 0; j < NB; ++j) acc[i][j] = at::vec::fmadd(xv, wv[j], acc[i][j]);
    }
}

// out[i, j] = bias[j] + sum_k x[i, k] * w[j, k] for MB rows of x and NB rows of w
template <int MB, int NB>
static inline void tile(const float* x, const float* w, const float* bias, float* out, int64_t K, int64_t ldx,
                        int64_t ldo) {
    Vec acc[MB][NB];
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j] = Vec(0.f);
    const int64_t full = K - K % Vec::size();
    for (int64_t k = 0; k < full; k += Vec::size()) accumulate<MB, NB>(acc, x, w, k, Vec::size(), K, ldx);
    if (full < K) accumulate<MB, NB>(acc, x, w, full, K - full, K, ldx);  // the tail of the shared axis
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j)
            out[i * ldo + j] = (bias ? bias[j] : 0.f) +
                at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[i][j]);
}

template <int NB>
static inline void weight_block(const float* x, const float* w, const float* bias, float* out, int64_t M,
                                int64_t K, int64_t ldx, int64_t ldo) {
    int64_t i = 0;
    for (; i + 2 <= M; i += 2) tile<2, NB>(x + i * ldx, w, bias, out + i * ldo, K, ldx, ldo);
    if (i < M) tile<1, NB>(x + i * ldx, w, bias, out + i * ldo, K, ldx, ldo);
}

extern "C" void kernel(const float* x, const float* w, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N,
                       int64_t K, int64_t ldx, int64_t ldo) {
    constexpr int64_t NB = 5;
    const float* bias = reinterpret_cast<const float*>(bias_ptr);
    float* out = reinterpret_cast<float*>(out_ptr);
    const int64_t blocks = N / NB;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
        weight_block<NB>(x, w + b * NB * K, bias ? bias + b * NB : nullptr, out + b * NB, M, K, ldx, ldo);
    for (int64_t j = blocks * NB; j < N; ++j)
        weight_block<1>(x, w + j * K, bias ? bias + j : nullptr, out + j, M, K, ldx, ldo);
}
"""
_ARGTYPES = ["const float*", "const float*", "uintptr_t", "uintptr_t"] + ["int64_t"] * 5


def _kernel():
    """The compiled kernel, or None (with one warning) where it cannot be built: callers take another GEMM."""
    return cpp_build.load("row_gemm", _ARGTYPES, _SOURCE, "sparse steps use oneDNN")


def available() -> bool:
    """Whether the kernel is built (compiles it at the first call, a few seconds, then from Inductor's cache)."""
    return _kernel() is not None


def supported(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether `row_gemm` takes these operands: fp32 on the CPU, the weight and bias contiguous, the input's rows
    contiguous (any row stride)."""
    return _takes_input(x) and _takes(weight, bias, x.shape[1])


def _takes_input(x: Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def _takes(weight: Tensor, bias: Optional[Tensor], k: int) -> bool:
    return (weight.is_cpu and weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[1] == k
            and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu and bias.is_contiguous())))


def row_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """Writes `F.linear(x, weight, bias)` into `out` (`[M, N]`, rows contiguous, any row stride: a column slice of
    a wider output) and returns it. `x` is `[M, K]`; see `supported` for what it takes."""
    if not supported(x, weight, bias):
        raise ValueError("row_gemm takes fp32 CPU tensors: x [M, K] with contiguous rows, a contiguous weight [N, K] "
                         "and bias [N] (use F.linear otherwise)")
    M, K = x.shape
    N = weight.shape[0]
    if out.shape != (M, N) or out.stride(1) != 1 or out.dtype != torch.float32:
        raise ValueError(f"row_gemm: out must be a float32 [{M}, {N}] tensor with contiguous rows")
    if not available():
        raise RuntimeError("row_gemm: the kernel could not be compiled (see the warning above); use F.linear")
    _run(x, weight, bias, out.data_ptr(), out.stride(0))
    return out


def linears(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]]) -> Optional[Tensor]:
    """`cat([F.linear(x, w, b), ...], -1)` for a 2-D `x`, each weight written into its columns of one output; None
    where an operand is not what the kernel takes or it is not built (the caller takes another GEMM)."""
    if not _takes_input(x) or not all(_takes(w, b, x.shape[1]) for w, b in zip(weights, biases)) \
            or _kernel() is None:
        return None
    n = sum(w.shape[0] for w in weights)
    out = x.new_empty(x.shape[0], n)
    ptr = out.data_ptr()
    for w, b in zip(weights, biases):
        _run(x, w, b, ptr, n)
        ptr += 4 * w.shape[0]
    return out


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_ptr: int, ldo: int) -> None:
    M, K = x.shape
    N = weight.shape[0]
    if not (M and N):
        return
    args = (x, weight, 0 if bias is None else bias.data_ptr(), out_ptr, M, N, K, x.stride(0), ldo)
    # a named event for benchmarks/profile_step.py, only while profiling (record_function is an op call itself)
    profiling = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function("dyllm::row_gemm") if profiling else contextlib.nullcontext():
        _kernel()(*args)
