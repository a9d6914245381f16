"""`logits_scan`: the decoding loop's greedy read of the logits on CPU, one pass per row.

`scan(logits, mask_id, scored)` takes fp32 logits `[B, G, V]` (any strides, the last axis contiguous) and returns,
per row, the first argmax over the vocabulary without `mask_id`, and where `scored` `[B, G]` is set its
low-confidence score: the softmax probability of that argmax, the mask token left out of the softmax (0 elsewhere).
`reference` is the same in torch ops: what `generate` computes otherwise (`first_argmax` with the mask token left
out, then a softmax over every candidate row).

Why: on CPU the decoding loop's own work on a step of the default benchmark (argmax of the generated rows' logits,
a copy of the candidate rows, their softmax) is several milliseconds, as much as a tenth of a sparse dyllm step.
Here each row is read once for its maximum and first argmax (per-lane maxima and their first columns, no copy) and,
where scored, once more from the caches for the sum of `exp(l - max)`: the probability of the argmax is its inverse.
The sum runs in another order than torch's softmax, so a score may differ from it by fp32 rounding.

Where a row holds a NaN or its maximum is not finite, `scan` returns None and the caller runs the torch ops, which
define those cases. The C++ is built by `cpp_build.py` (once per process); where it cannot be, `scan` returns None.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from . import cpp_build

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cmath>
#include <limits>

using Vec = at::vec::Vectorized<float>;
static constexpr int64_t V = Vec::size();

// running maxima per lane and the first column holding each (columns as floats: exact below 2^24)
struct Best {
    Vec value = Vec(-std::numeric_limits<float>::infinity());
    Vec column = Vec(0.f);
    Vec seen_nan = Vec(0.f);
    void over(const float* row, int64_t j0, int64_t j1) {
        Vec lane = Vec::arange(0.f, 1.f);
        int64_t j = j0;
        for (; j + V <= j1; j += V) {
            const Vec x = Vec::loadu(row + j);
            const Vec greater = x > value;
            value = Vec::blendv(value, x, greater);
            column = Vec::blendv(column, lane + Vec(float(j)), greater);
            seen_nan = seen_nan | (x != x);
        }
        for (; j < j1; ++j) {  // the tail, one column at a time (into lane 0)
            float v[V], c[V];
            value.store(v);
            column.store(c);
            seen_nan = seen_nan | (Vec(row[j]) != Vec(row[j]));
            if (row[j] > v[0]) {
                v[0] = row[j];
                c[0] = float(j);
            }
            value = Vec::loadu(v);
            column = Vec::loadu(c);
        }
    }
};

static inline float sum_exp(const float* row, int64_t j0, int64_t j1, float mx) {
    Vec acc0(0.f), acc1(0.f);
    int64_t j = j0;
    for (; j + 2 * V <= j1; j += 2 * V) {
        acc0 = acc0 + (Vec::loadu(row + j) - Vec(mx)).exp_u20();
        acc1 = acc1 + (Vec::loadu(row + j + V) - Vec(mx)).exp_u20();
    }
    float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
    for (; j < j1; ++j) s += std::exp(row[j] - mx);
    return s;
}

// rows r = b * G + g at x + b * sb + g * sg, those where `rows` is set (every row where all_rows); *ok false where one
// holds a NaN or a maximum that is not finite
extern "C" void kernel(const float* x, int64_t B, int64_t G, int64_t sb, int64_t sg, int64_t n_cols,
                       int64_t mask_id, const bool* scored, const bool* rows, int64_t all_rows, int64_t* argmax,
                       float* score, bool* ok_out) {
    bool ok = true;
    #pragma omp parallel for schedule(static) reduction(&& : ok)
    for (int64_t r = 0; r < B * G; ++r) {
        if (!all_rows && !rows[r]) continue;
        const float* row = x + (r / G) * sb + (r % G) * sg;
        Best best;
        const int64_t m = std::clamp<int64_t>(mask_id, 0, n_cols);  // the mask column is left out
        best.over(row, 0, m);
        best.over(row, std::min(m + 1, n_cols), n_cols);
        float v[V], c[V], nan[V];
        best.value.store(v);
        best.column.store(c);
        best.seen_nan.store(nan);
        float mx = v[0], col = c[0];
        bool any_nan = false;
        for (int64_t i = 0; i < V; ++i) {
            any_nan |= nan[i] != 0.f;
            if (v[i] > mx || (v[i] == mx && c[i] < col)) {
                mx = v[i];
                col = c[i];
            }
        }
        if (any_nan || !std::isfinite(mx)) {
            ok = false;
            continue;
        }
        argmax[r] = int64_t(col);
        score[r] = 0.f;
        if (scored[r])
            score[r] = 1.f / (sum_exp(row, 0, m, mx) + sum_exp(row, std::min(m + 1, n_cols), n_cols, mx));
    }
    *ok_out = ok;
}
"""
_ARGTYPES = (["const float*"] + ["int64_t"] * 6 +
             ["const bool*", "const bool*", "int64_t", "int64_t*", "float*", "bool*"])


def _kernel():
    return cpp_build.load("logits_scan", _ARGTYPES, _SOURCE, "the decoding loop reads the logits with torch ops")


def scan(logits: Tensor, mask_id: int, scored: Optional[Tensor] = None, rows: Optional[Tensor] = None,
         out: Optional[tuple[Tensor, Tensor]] = None) -> Optional[tuple[Tensor, Tensor]]:
    """(argmax `[B, G]` int64, score `[B, G]` fp32) of fp32 CPU `logits` `[B, G, V]` (last axis contiguous), or
    None where the kernel does not take them (another dtype or device, a NaN, a maximum that is not finite, no
    build): the caller runs `reference`'s torch ops then. `scored` None: no row scored. `rows` (bool `[B, G]`): read
    only these rows, into `out` (the (argmax, score) of an earlier scan, contiguous, written in place), whose other
    rows keep their values; without `rows`, every row, into `out` or new tensors. After a None, `out` may hold a
    partial result."""
    if not (logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 3 and logits.stride(2) == 1
            and (scored is None or scored.shape == logits.shape[:2])):
        return None
    B, G, n_cols = logits.shape
    if rows is not None and (out is None or rows.shape != (B, G)):
        raise ValueError("logits_scan.scan: `rows` takes `out` (the earlier scan's argmax and score) and the "
                         f"logits' [B, G] = {[B, G]} shape")
    if out is not None and not all(t.shape == (B, G) and t.is_contiguous() for t in out):
        raise ValueError(f"logits_scan.scan: `out` must be two contiguous [B, G] = {[B, G]} tensors")
    kernel = _kernel()
    if kernel is None:
        return None
    if scored is None:
        scored = torch.zeros(B, G, dtype=torch.bool)
    argmax, score = out if out is not None else (torch.empty(B, G, dtype=torch.int64), torch.empty(B, G))
    ok = torch.empty(1, dtype=torch.bool)
    scored = scored.contiguous()
    kernel(logits, B, G, logits.stride(0), logits.stride(1), n_cols, mask_id, scored,
           scored if rows is None else rows.contiguous(), int(rows is None), argmax, score, ok)
    if not ok.item():
        return None
    return argmax, score


def reference(logits: Tensor, mask_id: int, scored: Tensor) -> tuple[Tensor, Tensor]:
    """`scan` in torch ops (any dtype and device): the first argmax without the mask token, and the softmax
    probability of it without the mask token where `scored` is set (0 elsewhere)."""
    masked = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf)
    argmax = masked.argmax(-1)
    probs = torch.softmax(masked, -1).gather(-1, argmax[..., None]).squeeze(-1)
    return argmax, torch.where(scored, probs, 0.0)
