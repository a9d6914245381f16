"""`panel_gemm`: `x @ w.T (+ b)` on CPU on a weight packed once in column panels, at any row count.

The compact path's CPU GEMM below tau = 1 (`packed_linear.py`), on a sparse step's few rows and a dense step's
every row alike.

Layout (`pack`): the weight `[N, K]` becomes `[ceil(N / 16), K, 16]`, the last panel zero-padded. Panel `p`
holds output columns `16p .. 16p + 15`, the 16 weights of each `k` side by side, so a panel is one sequential
read. The bias is padded the same way.

Kernel: threads take panels. For each panel the rows go in chunks of at most 6 (`chunk_rows`: balanced where
that gives chunks of 5 or 6 rows, else 6s and the rest: 8 rows are 6 + 2). For every `k`, the
panel's 16 weights at `k` (two AVX2 vectors) times `x[i, k]` broadcast go into 12 accumulators (6 rows x 2
vectors: 12 independent FMA chains, 15 of AVX2's 16 registers). There are no horizontal sums. A panel comes from
memory once per block of `ROW_BLOCK` rows, its first chunk prefetching 64 `k` ahead:
- up to `PAIR_ROWS` (6) rows (most calls of a sparse step), a thread reads two of its panels side by side: its
  panels split into two runs, the i-th panel of each read together. A core's prefetchers keep more reads in flight
  for two sequential streams than for one (ad hoc, reading the default model's packed weights on the development
  machine's 2 cores: 35 GB/s against 25). Up to 3 rows the two panels go k by k, both panels' accumulators in
  registers (at 2 rows, the most common count, the pass over the default model's weights took 16 ms instead of
  21); 4 to 6 rows go k-block by k-block as below, the two panels in turn;
- 7 to `KBLOCK_ROWS` rows go k-block by k-block (`KBLOCK` k), one panel at a time: every chunk runs over the
  block while it is in L1, the accumulators kept in memory between blocks, so the weights stream from memory
  without a pause (about 10 % faster than one pass per chunk at 8 to 12 rows, no gain from 24; reading two panels
  side by side was slower here, where the chunks' FMAs already bound the pass);
- more rows (dense steps: compute-bound) run one pass over the panel per chunk, from L1/L2 after the first, the
  last chunk prefetching the next panel into L2.

At a sparse step's few rows the time is about one read of the weights; at a dense step's hundreds of rows the
FMAs bound it. On the development machine (2 AVX2 cores, `benchmarks/gemm_floor.py`) it was faster than oneDNN on
oneDNN's own packed weight at 4-16 rows and as fast as oneDNN and MKL at 256, so one packed copy serves both
steps (README, "The GEMM on packed panels").

Each output is one sum over `k` in order, in one vector lane, plus the bias. A row's result does not depend on
the other rows of its call, at any row count (batch invariant). The order is not BLAS's, so results differ from
`F.linear` by fp32 rounding.

The C++ is compiled once per process (and cached on disk) by Inductor's C++ toolchain (`cpp_build.py`).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import profiler as _profiler

from . import cpp_build

PANEL = 16  # output columns per panel
ROW_BLOCK = 256  # rows per pass over the weight: a dense step of the default model is one pass

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>

using Vec = at::vec::Vectorized<float>;
constexpr int64_t PANEL = 16;
constexpr int NV = PANEL / Vec::size();  // vectors per panel row: 2 with AVX2, 1 with AVX-512
static_assert(PANEL % Vec::size() == 0, "a panel is whole vectors");
constexpr int64_t PREFETCH = 64;

// acc[i] += x[i, k] * wk[0:PANEL] for the MB rows of a chunk
template <int MB>
static inline void step(Vec (&acc)[MB][NV], const float* x, const float* wk, int64_t ldx) {
    Vec w[NV];
    for (int v = 0; v < NV; ++v) w[v] = Vec::loadu(wk + v * Vec::size());
    for (int i = 0; i < MB; ++i) {
        Vec xb(x[i * ldx]);
        for (int v = 0; v < NV; ++v) acc[i][v] = at::vec::fmadd(xb, w[v], acc[i][v]);
    }
}

// acc[i] += sum over k in [k0, k1) of x[i, k] * panel[k, 0:PANEL] for the MB rows of a chunk; for every k, the
// cache line at pf + k * PANEL is prefetched (HINT; not where HINT < 0)
template <int MB, int HINT>
static inline void accumulate(Vec (&acc)[MB][NV], const float* x, const float* panel, int64_t k0, int64_t k1,
                              int64_t ldx, const float* pf) {
    for (int64_t k = k0; k < k1; ++k) {
        if constexpr (HINT >= 0) __builtin_prefetch(pf + k * PANEL, 0, HINT);
        step<MB>(acc, x + k, panel + k * PANEL, ldx);
    }
}

// the first `left` columns of r (all of them where left >= Vec::size()) into o
static inline void store_cols(Vec r, float* o, int64_t left) {
    if (left >= Vec::size()) r.store(o);
    else r.store(o, left);
}

// where row i of a chunk goes: out + i * ldo, or out + orow[i] * ldo where the output rows are scattered
static inline float* out_row(float* out, const int64_t* orow, int64_t i, int64_t ldo) {
    return out + (orow ? orow[i] : i) * ldo;
}

// out_row(i)[0:cols] = bias + sum_k x[i, k] * panel[k, 0:cols] for MB rows, prefetching as `accumulate`
template <int MB, int HINT>
static inline void chunk(const float* x, const float* panel, const float* bias, float* out, const int64_t* orow,
                         int64_t K, int64_t ldx, int64_t ldo, int64_t cols, const float* pf) {
    Vec acc[MB][NV];
    for (int i = 0; i < MB; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = Vec(0.f);
    accumulate<MB, HINT>(acc, x, panel, 0, K, ldx, pf);
    for (int v = 0; v < NV; ++v) {
        const int64_t left = cols - v * Vec::size();
        if (left <= 0) break;
        const Vec b = bias ? Vec::loadu(bias + v * Vec::size()) : Vec(0.f);
        // a copy: taking the accumulators' address would keep them in memory
        for (int i = 0; i < MB; ++i) store_cols(acc[i][v] + b, out_row(out, orow, i, ldo) + v * Vec::size(), left);
    }
}

template <int HINT>
static inline void chunk_of(int64_t mb, const float* x, const float* panel, const float* bias, float* out,
                            const int64_t* orow, int64_t K, int64_t ldx, int64_t ldo, int64_t cols, const float* pf) {
    switch (mb) {
        case 1: chunk<1, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
        case 2: chunk<2, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
        case 3: chunk<3, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
        case 4: chunk<4, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
        case 5: chunk<5, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
        default: chunk<6, HINT>(x, panel, bias, out, orow, K, ldx, ldo, cols, pf); break;
    }
}

// MB rows over k in [k0, k1), the accumulators loaded from and stored back to acc (k-blocked passes), prefetching
// as `accumulate`
template <int MB, int HINT>
static inline void chunk_part(const float* x, const float* panel, Vec* acc, int64_t k0, int64_t k1, int64_t ldx,
                              const float* pf) {
    Vec a[MB][NV];
    for (int i = 0; i < MB; ++i)
        for (int v = 0; v < NV; ++v) a[i][v] = acc[i * NV + v];
    accumulate<MB, HINT>(a, x, panel, k0, k1, ldx, pf);
    for (int i = 0; i < MB; ++i)
        for (int v = 0; v < NV; ++v) acc[i * NV + v] = a[i][v];
}

template <int HINT>
static inline void part_of(int64_t mb, const float* x, const float* panel, Vec* acc, int64_t k0, int64_t k1,
                           int64_t ldx, const float* pf) {
    switch (mb) {
        case 1: chunk_part<1, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
        case 2: chunk_part<2, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
        case 3: chunk_part<3, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
        case 4: chunk_part<4, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
        case 5: chunk_part<5, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
        default: chunk_part<6, HINT>(x, panel, acc, k0, k1, ldx, pf); break;
    }
}

constexpr int64_t KBLOCK = 32;  // k per block of the k-blocked passes: 2 KB of the panel, in L1 for every chunk
constexpr int64_t KBLOCK_ROWS = 18;  // up to this many rows the passes are k-blocked
constexpr int64_t KBLOCK_CHUNKS = (KBLOCK_ROWS + 5) / 6;
constexpr int64_t PAIR_ROWS = 6;  // up to this many rows a thread reads two panels side by side

// The size of chunk c of M rows in `chunks` chunks (at most 6 rows each), starting at row i. Balanced where that gives
// chunks of 5 or 6 rows; else chunks of 6 and the rest last (8 rows are 6 + 2, not 4 + 4): chunks of 3 or 4 rows
// run their FMA chains at about the cost of 6 rows, those of 1 or 2 at less (ad hoc, 7 to 18 rows on the development
// machine: up to 15 % faster at 7-9 and 13-14 rows, the balanced split kept where it was faster)
static inline int64_t chunk_rows(int64_t M, int64_t chunks, int64_t c, int64_t i) {
    return M / chunks >= 5 ? (M - i) / (chunks - c) : std::min<int64_t>(6, M - i);
}

// MB rows (1 to 3) of two panels read side by side, k by k (both panels' accumulators in registers), each
// prefetched PREFETCH k ahead, into its next panel at its end
template <int MB>
static inline void pair(const float* x, const float* const* panel, const float* const* bias, float* const* out,
                        const int64_t* cols, const int64_t* orow, int64_t K, int64_t ldx, int64_t ldo) {
    Vec a0[MB][NV], a1[MB][NV];
    for (int i = 0; i < MB; ++i)
        for (int v = 0; v < NV; ++v) a0[i][v] = a1[i][v] = Vec(0.f);
    const float* p0 = panel[0];
    const float* p1 = panel[1];
    for (int64_t k = 0; k < K; ++k) {
        __builtin_prefetch(p0 + (k + PREFETCH) * PANEL, 0, 3);
        __builtin_prefetch(p1 + (k + PREFETCH) * PANEL, 0, 3);
        step<MB>(a0, x + k, p0 + k * PANEL, ldx);
        step<MB>(a1, x + k, p1 + k * PANEL, ldx);
    }
    for (int s = 0; s < 2; ++s)
        for (int v = 0; v < NV; ++v) {
            const int64_t left = cols[s] - v * Vec::size();
            if (left <= 0) break;
            const Vec b = bias[s] ? Vec::loadu(bias[s] + v * Vec::size()) : Vec(0.f);
            for (int i = 0; i < MB; ++i)
                store_cols((s ? a1[i][v] : a0[i][v]) + b, out_row(out[s], orow, i, ldo) + v * Vec::size(), left);
        }
}

// M rows (1 to KBLOCK_ROWS) of n panels (1 or 2) read side by side: panel s at panel[s], its bias (or null) at
// bias[s], its output columns from out[s], cols[s] of them. Two panels of up to 3 rows go k by k (`pair`);
// otherwise for each block of KBLOCK k, each panel's chunks in turn, the accumulators kept in memory between
// blocks, each panel's first chunk streaming it from memory (PREFETCH k ahead, into its next panel at its end).
static inline void rows_k_blocked(const float* x, const float* const* panel, const float* const* bias,
                                  float* const* out, const int64_t* cols, int64_t n, const int64_t* orow, int64_t M,
                                  int64_t K, int64_t ldx, int64_t ldo) {
    if (n == 2 && M <= 3) {
        if (M == 1) pair<1>(x, panel, bias, out, cols, orow, K, ldx, ldo);
        else if (M == 2) pair<2>(x, panel, bias, out, cols, orow, K, ldx, ldo);
        else pair<3>(x, panel, bias, out, cols, orow, K, ldx, ldo);
        return;
    }
    Vec acc[2][KBLOCK_CHUNKS * 6 * NV];
    int64_t start[KBLOCK_CHUNKS], size[KBLOCK_CHUNKS];
    const int64_t chunks = (M + 5) / 6;
    for (int64_t c = 0, i = 0; c < chunks; i += size[c], ++c) {
        start[c] = i;
        size[c] = chunk_rows(M, chunks, c, i);
    }
    for (int64_t s = 0; s < n; ++s)
        for (int64_t j = 0; j < chunks * 6 * NV; ++j) acc[s][j] = Vec(0.f);
    for (int64_t k0 = 0; k0 < K; k0 += KBLOCK) {
        const int64_t k1 = std::min(K, k0 + KBLOCK);
        for (int64_t s = 0; s < n; ++s) {
            part_of<3>(size[0], x, panel[s], acc[s], k0, k1, ldx, panel[s] + PREFETCH * PANEL);
            for (int64_t c = 1; c < chunks; ++c)
                part_of<-1>(size[c], x + start[c] * ldx, panel[s], acc[s] + c * 6 * NV, k0, k1, ldx, panel[s]);
        }
    }
    for (int64_t s = 0; s < n; ++s)
        for (int v = 0; v < NV; ++v) {
            const int64_t left = cols[s] - v * Vec::size();
            if (left <= 0) break;
            const Vec b = bias[s] ? Vec::loadu(bias[s] + v * Vec::size()) : Vec(0.f);
            for (int64_t c = 0; c < chunks; ++c)
                for (int64_t i = 0; i < size[c]; ++i)
                    store_cols(acc[s][(c * 6 + i) * NV + v] + b,
                               out_row(out[s], orow, start[c] + i, ldo) + v * Vec::size(), left);
        }
}

// M rows (more than KBLOCK_ROWS) of one panel in chunks of at most 6 (`chunk_rows`), one pass per chunk: the first
// chunk streams the panel from memory, prefetching PREFETCH k ahead into L1; the others read it from L1/L2, and the
// last of them prefetches the next panel into L2, so that memory keeps streaming while they compute. A prefetch past
// the packed weight's end is harmless: prefetches never fault.
static inline void rows(const float* x, const float* panel, const float* bias, float* out, const int64_t* orow,
                        int64_t M, int64_t K, int64_t ldx, int64_t ldo, int64_t cols) {
    const int64_t chunks = (M + 5) / 6;
    int64_t i = 0;
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t mb = chunk_rows(M, chunks, c, i);
        float* o = orow ? out : out + i * ldo;  // the chunk's rows: from o, or scattered by orow + i
        const int64_t* r = orow ? orow + i : nullptr;
        if (c == 0)
            chunk_of<3>(mb, x + i * ldx, panel, bias, o, r, K, ldx, ldo, cols, panel + PREFETCH * PANEL);
        else if (c == chunks - 1)
            chunk_of<2>(mb, x + i * ldx, panel, bias, o, r, K, ldx, ldo, cols, panel + K * PANEL);
        else
            chunk_of<3>(mb, x + i * ldx, panel, bias, o, r, K, ldx, ldo, cols, panel);
        i += mb;
    }
}

// out_rows_ptr: 0, row i of the result is out's row i; else an int64 array of M rows of out to write instead
extern "C" void kernel(const float* x, const float* packed, uintptr_t bias_ptr, uintptr_t out_ptr,
                       uintptr_t out_rows_ptr, int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldo,
                       int64_t row_block) {
    const float* bias = reinterpret_cast<const float*>(bias_ptr);
    float* out = reinterpret_cast<float*>(out_ptr);
    const int64_t* orow = reinterpret_cast<const int64_t*>(out_rows_ptr);
    const int64_t panels = (N + PANEL - 1) / PANEL;
    for (int64_t r = 0; r < M; r += row_block) {
        const int64_t m = std::min(row_block, M - r);
        float* o = orow ? out : out + r * ldo;
        const int64_t* rr = orow ? orow + r : nullptr;
        const float* xr = x + r * ldx;
        if (m > KBLOCK_ROWS) {
            #pragma omp parallel for schedule(static)
            for (int64_t p = 0; p < panels; ++p)
                rows(xr, packed + p * PANEL * K, bias ? bias + p * PANEL : nullptr, o + p * PANEL, rr, m, K, ldx,
                     ldo, std::min(PANEL, N - p * PANEL));
            continue;
        }
        // few rows: a thread's panels, up to PAIR_ROWS rows, in two runs whose i-th panels it reads side by side
        // (two sequential streams keep more reads in flight than one)
        const int64_t streams = m <= PAIR_ROWS ? 2 : 1;
        #pragma omp parallel
        {
            const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
            const int64_t run = (p1 - p0 + streams - 1) / streams;
            for (int64_t i = 0; i < run; ++i) {
                const float* pp[2];
                const float* bb[2];
                float* oo[2];
                int64_t cc[2], n = 0;
                for (int64_t s = 0; s < streams; ++s) {
                    const int64_t p = p0 + s * run + i;
                    if (p >= p1) break;
                    pp[n] = packed + p * PANEL * K;
                    bb[n] = bias ? bias + p * PANEL : nullptr;
                    oo[n] = o + p * PANEL;
                    cc[n] = std::min(PANEL, N - p * PANEL);
                    ++n;
                }
                rows_k_blocked(xr, pp, bb, oo, cc, n, rr, m, K, ldx, ldo);
            }
        }
    }
}
"""
_ARGTYPES = ["const float*", "const float*", "uintptr_t", "uintptr_t", "uintptr_t"] + ["int64_t"] * 6


def kernel():
    """The compiled kernel, or None (with one warning) where it cannot be built: callers take another GEMM."""
    return cpp_build.load("panel_gemm", _ARGTYPES, _SOURCE, "gated linears use oneDNN")


def available() -> bool:
    """Whether the kernel is built (compiles it at the first call, a few seconds, then from Inductor's cache)."""
    return kernel() is not None


def pack(weight: Tensor) -> Tensor:
    """`weight` `[N, K]` (fp32) as `[ceil(N / PANEL), K, PANEL]` column panels, the last one zero-padded."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"panel_gemm.pack takes a 2-D float32 weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def pack_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    """`bias` `[N]` zero-padded to whole panels (None stays None)."""
    return None if bias is None else F.pad(bias.detach().float(), (0, -bias.shape[0] % PANEL)).contiguous()


def takes(x: Tensor) -> bool:
    """Whether the kernel takes `x` as its input: fp32 on the CPU, 2-D, rows contiguous (any row stride)."""
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def linear(x: Tensor, packed: Tensor, bias: Optional[Tensor], n: int, row_block: int = ROW_BLOCK) -> Tensor:
    """`F.linear(x, w, b)` as a new `[M, n]` tensor, from `packed = pack(w)` and `bias = pack_bias(b)`; the
    kernel reads the weight once per `row_block` rows."""
    if not takes(x):
        raise ValueError("panel_gemm takes a float32 CPU input [M, K] with contiguous rows (use F.linear otherwise)")
    if packed.dim() != 3 or packed.shape[1] != x.shape[1] or packed.shape[2] != PANEL or \
            packed.shape[0] != -(-n // PANEL) or not packed.is_contiguous() or packed.dtype != torch.float32:
        raise ValueError(f"panel_gemm: packed must be pack(w) of a float32 [{n}, {x.shape[1]}] weight, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bias is not None and (bias.shape != (packed.shape[0] * PANEL,) or not bias.is_contiguous()):
        raise ValueError("panel_gemm: bias must be pack_bias(b) of a [n] bias")
    built = kernel()
    if built is None:
        raise RuntimeError("panel_gemm: the kernel could not be compiled (see the warning above); use F.linear")
    return call(built, x, packed, 0 if bias is None else bias.data_ptr(), n, row_block)


def call(built, x: Tensor, packed: Tensor, bias_ptr: int, n: int, row_block: int = ROW_BLOCK,
         out: Optional[Tensor] = None, out_rows: Optional[Tensor] = None) -> Tensor:
    """`linear` without its checks, for `packed_linear`, which made `packed` and the bias (at `bias_ptr`, 0 for
    none) itself and checked `x`'s width against the weight's: `built` is `kernel()`, `x` fp32 on the CPU with
    contiguous rows. `out`: an fp32 `[M, n]` with contiguous rows to write into (any row stride), else a new one;
    with `out_rows` (contiguous int64, one per row of `x`, each a row of `out`: the caller checks) row i of the
    result goes to `out[out_rows[i]]` instead."""
    m = x.shape[0]
    if out is None:
        out = x.new_empty(m, n)
    if m and n:
        args = (x, packed, bias_ptr, out.data_ptr(), 0 if out_rows is None else out_rows.data_ptr(), m, n,
                x.shape[1], x.stride(0), out.stride(0), row_block)
        # a named event for benchmarks/profile_step.py, only while profiling (record_function is an op call itself)
        if _profiler._is_profiler_enabled:
            with torch.profiler.record_function("dyllm::panel_gemm"):
                built(*args)
        else:
            built(*args)
    return out
