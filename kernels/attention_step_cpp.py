"""`dyllm::attention_step`: one attention layer of a sparse step as one C++ call on the CPU.

Same contract and rule as `incremental_attention_step` (`incremental_attention.py`, which documents them) and the
same arguments: exact rows (the changed ones, stale ones, and those whose update would cancel) over every key;
the other query rows updated over the changed columns only, old terms out and new terms in, both channels, in
fp32; the saliency test; the context, lse and previous-K/V caches written in place; `stats` filled.

Why C++: on a sparse step the attention's arithmetic is tiny (a few changed columns per row), and as torch ops it
is dozens of small calls per layer whose fixed costs dominate; one SDPA over every row (the exact form) costs
about 1 ms a layer on the default model. This kernel does the whole step in one pass over the rows: a thread takes
a row `(b, l)` and all its heads, so the saliency test (over all heads) needs no second pass. A row's new context
is made in the thread's scratch (L1), tested, and copied into the context cache; into the output too, unless
`rows_only` and the row is not salient (at the default model's 3 % salient rows that skips writing most of a
590 KB output per layer).

It takes fp32 CPU operands with a contiguous last axis (`supported`); the mask is made additive fp32.
A dense step is one call of the CPU flash-attention kernel over every row (`_dense_step`, which also gives the
lse); operands it does not take run `incremental_attention_step` eagerly. The C++ is built by `cpp_build.py`,
once per head dim (a constant in the source, so the loops over it are unrolled; the backend builds the model's
head dims with the graph); where it cannot be, `available()` is False and the backend traces the torch forms into
the graph instead.
"""
import functools
import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from . import cpp_build
from .delta_attention import CANCELLATION_FLOOR, _additive, _output
from .exact_attention import update_context
from .incremental_attention import incremental_attention_step

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using Vec = at::vec::Vectorized<float>;
static constexpr int64_t V = Vec::size();
// the head dim: a constant, one build per head dim (`_kernel`), so the loops over it are unrolled
static constexpr int64_t D = HEAD_DIM;
static constexpr float INF = std::numeric_limits<float>::infinity();
// up to this many changed keys, scores are dot products and the softmax bookkeeping runs in vectors over the heads
// (faster than vectors over the keys, whose FMA chains run the length of D, at 1-16 keys: a sparse step's usual count)
static constexpr int64_t FEW_KEYS = 16;

static inline int64_t padded(int64_t n) { return (n + V - 1) / V * V; }

struct Rows {  // a [B, H, L, D] tensor with a contiguous last axis
    float* p;
    int64_t sb, sh, sl;
    float* at(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

// The keys of one (sequence, KV head) with the values' row pointers; the changed keys, where more than FEW_KEYS, also
// transposed: kt[d * W + j] = key j's d-th element, W a multiple of V, zero past the keys. Scores are then vector
// FMAs along j, with no horizontal sums.
struct Keys {
    std::vector<float> kt;  // empty where not transposed: scores are then dot products over the key rows
    std::vector<const float*> keys, values;
    int64_t W = 0;
    template <class Key, class Value> void fill(int64_t n, Key key, Value value, bool transpose = true) {
        W = padded(std::max<int64_t>(n, 1));
        keys.resize(n);
        values.resize(n);
        for (int64_t j = 0; j < n; ++j) {
            keys[j] = key(j);
            values[j] = value(j);
        }
        kt.clear();
        if (n <= FEW_KEYS || !transpose) return;
        kt.assign(D * W, 0.f);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t d = 0; d < D; ++d) kt[d * W + j] = keys[j][d];
    }
};

// the sums of 8 vectors' lanes: s[j] = sum of acc[j]'s lanes for j < m
static inline void sums8(const Vec* acc, float* s, int64_t m) {
#if defined(CPU_CAPABILITY_AVX2)
    // pairwise horizontal adds: one vector of the 8 sums, no per-vector reduction
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: 0 1 2 3 | 4 5 6 7
    const Vec all = Vec(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    all.store(s, m);
#else
    for (int64_t j = 0; j < m; ++j) s[j] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[j]);
#endif
}

// s[j] = q . rows[j] for j < n, 8 rows at a time: each chunk of q is loaded once for the 8 rows, 8 independent FMA
// chains, and one horizontal pass for the 8 sums
static inline void dots(const float* q, const float* const* rows, int64_t n, float* s) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        const int64_t m = std::min<int64_t>(8, n - j0);
        const float* r[8];
        for (int64_t j = 0; j < 8; ++j) r[j] = rows[j0 + std::min(j, m - 1)];  // padding repeats the last row
        Vec acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = Vec(0.f);
        for (int64_t d = 0; d < D; d += V) {
            const int64_t cnt = std::min<int64_t>(V, D - d);  // a partial load fills the other lanes with 0
            const Vec qv = Vec::loadu(q + d, cnt);
            for (int j = 0; j < 8; ++j) acc[j] = at::vec::fmadd(qv, Vec::loadu(r[j] + d, cnt), acc[j]);
        }
        sums8(acc, s + j0, m);
    }
}

// s[0:W] = q . key_j for every j of `a` (0 past its keys), and t[0:W] the same over `b` (same W), when given
static inline void scores(const float* q, const Keys& a, float* s, const Keys* b = nullptr,
                          float* t = nullptr) {
    const int64_t W = a.W;
    if (a.kt.empty()) {  // keys not transposed (`exact`; `incremental_few` calls `dots` itself)
        dots(q, a.keys.data(), a.keys.size(), s);
        return;
    }
    for (int64_t w = 0; w < W; w += V) {
        Vec s0(0.f), s1(0.f), t0(0.f), t1(0.f);
        const float* ka = a.kt.data() + w;
        const float* kb = b ? b->kt.data() + w : nullptr;
        int64_t d = 0;
        for (; d + 2 <= D; d += 2) {
            const Vec q0(q[d]), q1(q[d + 1]);
            s0 = at::vec::fmadd(q0, Vec::loadu(ka + d * W), s0);
            s1 = at::vec::fmadd(q1, Vec::loadu(ka + (d + 1) * W), s1);
            if (kb) {
                t0 = at::vec::fmadd(q0, Vec::loadu(kb + d * W), t0);
                t1 = at::vec::fmadd(q1, Vec::loadu(kb + (d + 1) * W), t1);
            }
        }
        if (d < D) {
            s0 = at::vec::fmadd(Vec(q[d]), Vec::loadu(ka + d * W), s0);
            if (kb) t0 = at::vec::fmadd(Vec(q[d]), Vec::loadu(kb + d * W), t0);
        }
        (s0 + s1).store(s + w);
        if (kb) (t0 + t1).store(t + w);
    }
}

static inline float reduce_max(const float* s, int64_t W) {
    Vec m(-INF);
    for (int64_t w = 0; w < W; w += V) m = at::vec::clamp_min(Vec::loadu(s + w), m);  // no NaN to propagate
    return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::clamp_min(x, y); }, m);
}

static inline float reduce_sum(Vec x) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}

// s[j] = exp(s[j] - mx) in place; returns their sum
static inline float exp_sum(float* s, int64_t W, float mx) {
    Vec sum(0.f);
    for (int64_t w = 0; w < W; w += V) {
        Vec e = (Vec::loadu(s + w) - Vec(mx)).exp();
        e.store(s + w);
        sum = sum + e;
    }
    return reduce_sum(sum);
}

static inline void scale_by(float* s, int64_t W, float f) {
    for (int64_t w = 0; w < W; w += V) (Vec::loadu(s + w) * Vec(f)).store(s + w);
}

// c[0:D] = c0_scale * c0 (0 when c0 is null) + sum_i weight[i] * rows[i][0:D] (rows with weight 0 skipped),
// eight vectors of D at a time (in registers)
static inline void weighted_rows(float* c, const float* c0, float c0_scale, int64_t n, const float* weight,
                                 const float* const* rows) {
    constexpr int U = 8;
    for (int64_t d = 0; d < D; d += U * V) {
        int64_t cnt[U];
        Vec acc[U];
        for (int u = 0; u < U; ++u) {
            cnt[u] = std::clamp<int64_t>(D - d - u * V, 0, V);
            acc[u] = c0 && cnt[u] ? Vec::loadu(c0 + d + u * V, cnt[u]) * Vec(c0_scale) : Vec(0.f);
        }
        if (D - d >= U * V) {  // full chunk: no partial loads
            for (int64_t i = 0; i < n; ++i) {
                if (weight[i] == 0.f) continue;
                const Vec w(weight[i]);
                const float* r = rows[i] + d;
                for (int u = 0; u < U; ++u) acc[u] = at::vec::fmadd(w, Vec::loadu(r + u * V), acc[u]);
            }
        } else {
            for (int64_t i = 0; i < n; ++i) {
                if (weight[i] == 0.f) continue;
                const Vec w(weight[i]);
                const float* r = rows[i] + d;
                for (int u = 0; u < U; ++u)
                    if (cnt[u]) acc[u] = at::vec::fmadd(w, Vec::loadu(r + u * V, cnt[u]), acc[u]);
            }
        }
        for (int u = 0; u < U; ++u)
            if (cnt[u]) acc[u].store(c + d + u * V, cnt[u]);
    }
}

// Per-thread scratch of the row loops
struct Scratch {
    std::vector<float> s, t, w, m, heads, row;
    std::vector<const float*> rows;
    Scratch(int64_t L, int64_t H)
        : s(std::max(padded(L), padded(H * FEW_KEYS))), t(s.size()), w(2 * padded(L)), m(s.size()),
          heads(4 * padded(H)), row(H * D), rows(2 * padded(L)) {}
};

static inline void exp_minus(float* s, const float* m, int64_t n) {  // s = exp(s - m) over n entries, in place
    for (int64_t i = 0; i < n; i += V) {
        const int64_t cnt = std::min<int64_t>(V, n - i);
        (Vec::loadu(s + i, cnt) - Vec::loadu(m + i, cnt)).exp().store(s + i, cnt);
    }
}

struct Step {
    Rows q, k, v, kp, vp, ctx, out;
    float* lse;
    int64_t lse_sb, lse_sh, lse_sl;
    const float* bias;  // additive [B, H, L, L] by strides (last one 1), or null
    int64_t bias_sb, bias_sh, bias_sl;
    int64_t H, L, g;
    float scale, floor, tau;

    float& lse_at(int64_t b, int64_t h, int64_t l) const { return lse[b * lse_sb + h * lse_sh + l * lse_sl]; }
    const float* bias_row(int64_t b, int64_t h, int64_t l) const {
        return bias ? bias + b * bias_sb + h * bias_sh + l * bias_sl : nullptr;
    }
    // s[i] = s[i] * scale + bias[cols[i]] (bias[i] when cols is null) for i < n; -inf on the padding up to W
    void finish_scores(float* s, int64_t n, int64_t W, const float* brow, const int64_t* cols) const {
        int64_t i = 0;
        if (brow && !cols)
            for (; i + V <= n; i += V) (Vec::loadu(s + i) * Vec(scale) + Vec::loadu(brow + i)).store(s + i);
        else if (!brow)
            for (; i + V <= n; i += V) (Vec::loadu(s + i) * Vec(scale)).store(s + i);
        for (; i < n; ++i) s[i] = s[i] * scale + (brow ? brow[cols ? cols[i] : i] : 0.f);
        for (; i < W; ++i) s[i] = -INF;
    }

    // Row (b, l) over every key (`keys`: its sequence's, per KV head): context into x.row ([H][D]), lse. A head
    // that attends to no key gets context 0 and lse 0 (as the CPU flash kernel of the dense step).
    void exact(int64_t b, int64_t l, const Keys* keys, Scratch& x) const {
        for (int64_t h = 0; h < H; ++h) {
            const Keys& kk = keys[h / g];
            scores(q.at(b, h, l), kk, x.s.data());
            finish_scores(x.s.data(), L, kk.W, bias_row(b, h, l), nullptr);
            const float mx = reduce_max(x.s.data(), kk.W);
            float* c = x.row.data() + h * D;
            if (mx == -INF) {
                std::fill(c, c + D, 0.f);
                lse_at(b, h, l) = 0.f;
                continue;
            }
            const float sum = exp_sum(x.s.data(), kk.W, mx);
            scale_by(x.s.data(), kk.W, 1.f / sum);
            weighted_rows(c, nullptr, 0.f, L, x.s.data(), kk.values.data());
            lse_at(b, h, l) = mx + std::log(sum);
        }
    }

    // Head h of row (b, l): x.row[h] = (base * ctx - sum_i eo_i vp_i + sum_i en_i v_i) / den, one weighted sum over
    // the 2n value rows (eo, en: the old and new columns' exp(score - max); ko, kn: their previous and current K/V)
    void update(int64_t b, int64_t h, int64_t l, int64_t n, const float* eo, const float* en, float base, float den,
                const Keys& ko, const Keys& kn, Scratch& x) const {
        for (int64_t i = 0; i < n; ++i) {
            x.w[i] = -eo[i] / den;
            x.w[n + i] = en[i] / den;
            x.rows[i] = ko.values[i];
            x.rows[n + i] = kn.values[i];
        }
        weighted_rows(x.row.data() + h * D, ctx.at(b, h, l), base / den, 2 * n, x.w.data(), x.rows.data());
    }

    // `incremental` for up to FEW_KEYS changed columns: every head's scores as dot products, then the softmax
    // bookkeeping (exp, log) of all heads at once, in vectors over the heads.
    bool incremental_few(int64_t b, int64_t l, const std::vector<int64_t>& cols, const Keys* old_keys,
                         const Keys* new_keys, Scratch& x) const {
        const int64_t n = cols.size(), Hp = padded(H);
        float *so = x.s.data(), *sn = x.t.data(), *me = x.m.data();  // [H][n]: old, new scores; each head's max
        float *mx = x.heads.data(), *base = mx + Hp, *den = base + Hp, *lse_new = den + Hp;  // [H] each
        const float* both[2 * FEW_KEYS];  // a KV head's previous then current changed keys
        float st[2 * FEW_KEYS];  // their scores
        for (int64_t h = 0; h < H; ++h) {
            const float* brow = bias_row(b, h, l);
            const Keys &ko = old_keys[h / g], &kn = new_keys[h / g];
            if (h % g == 0)
                for (int64_t i = 0; i < n; ++i) {
                    both[i] = ko.keys[i];
                    both[n + i] = kn.keys[i];
                }
            dots(q.at(b, h, l), both, 2 * n, st);
            const float lse0 = lse_at(b, h, l);
            float m = lse0;
            for (int64_t i = 0; i < n; ++i) {
                const float bias_i = brow ? brow[cols[i]] : 0.f;
                so[h * n + i] = st[i] * scale + bias_i;
                sn[h * n + i] = st[n + i] * scale + bias_i;
                m = std::max(m, sn[h * n + i]);
            }
            mx[h] = m;
            base[h] = lse0;
            for (int64_t i = 0; i < n; ++i) me[h * n + i] = m;
        }
        exp_minus(so, me, H * n);
        exp_minus(sn, me, H * n);
        exp_minus(base, mx, H);  // exp(lse0 - max)
        for (int64_t h = 0; h < H; ++h) {
            float w_old = 0.f, w_new = 0.f;
            for (int64_t i = 0; i < n; ++i) {
                w_old += so[h * n + i];
                w_new += sn[h * n + i];
            }
            const float rest = base[h] - w_old;
            if (rest < floor * base[h]) return false;
            den[h] = rest + w_new;
        }
        for (int64_t h = 0; h < H; h += V) {
            const int64_t cnt = std::min<int64_t>(V, H - h);
            (Vec::loadu(mx + h, cnt) + Vec::loadu(den + h, cnt).log()).store(lse_new + h, cnt);
        }
        for (int64_t h = 0; h < H; ++h) {
            update(b, h, l, n, so + h * n, sn + h * n, base[h], den[h], old_keys[h / g], new_keys[h / g], x);
            lse_at(b, h, l) = lse_new[h];
        }
        return true;
    }

    // Row (b, l) updated over the changed columns `cols` (`old_keys`, `new_keys`: their previous and current K/V,
    // per KV head) from its cached (context, lse): context into x.row, lse. False where a head's update would
    // cancel (the changed columns held more than 1 - floor of its softmax mass): the row is then recomputed.
    bool incremental(int64_t b, int64_t l, const std::vector<int64_t>& cols, const Keys* old_keys,
                     const Keys* new_keys, Scratch& x) const {
        const int64_t n = cols.size();
        if (n <= FEW_KEYS) return incremental_few(b, l, cols, old_keys, new_keys, x);
        float* so = x.s.data();
        float* sn = x.t.data();
        for (int64_t h = 0; h < H; ++h) {
            const float* brow = bias_row(b, h, l);
            const Keys &ko = old_keys[h / g], &kn = new_keys[h / g];
            const int64_t W = kn.W;
            scores(q.at(b, h, l), ko, so, &kn, sn);
            finish_scores(so, n, W, brow, cols.data());
            finish_scores(sn, n, W, brow, cols.data());
            const float lse0 = lse_at(b, h, l);
            const float mx = std::max(lse0, reduce_max(sn, W));
            const float base = std::exp(lse0 - mx);
            const float w_old = exp_sum(so, W, mx), w_new = exp_sum(sn, W, mx);
            const float rest = base - w_old;
            if (rest < floor * base) return false;
            const float den = rest + w_new;
            update(b, h, l, n, so, sn, base, den, ko, kn, x);
            lse_at(b, h, l) = mx + std::log(den);
        }
        return true;
    }

    // The saliency test of row (b, l) (its new context `row`, [H][D], against ctx), then ctx takes the new context.
    bool commit(int64_t b, int64_t l, const float* row) const {
        Vec dt(0.f), nn(0.f), oo(0.f), differs(0.f);
        for (int64_t h = 0; h < H; ++h) {
            const float* now = row + h * D;
            float* before = ctx.at(b, h, l);
            for (int64_t d = 0; d < D; d += V) {
                const int64_t cnt = std::min<int64_t>(V, D - d);
                const Vec x = Vec::loadu(now + d, cnt), y = Vec::loadu(before + d, cnt);
                dt = at::vec::fmadd(x, y, dt);
                nn = at::vec::fmadd(x, x, nn);
                oo = at::vec::fmadd(y, y, oo);
                differs = differs | (x != y);
            }
            std::memcpy(before, now, D * sizeof(float));
        }
        if (tau >= 1.f) return reduce_sum(differs & Vec(1.f)) > 0.f;
        return reduce_sum(dt) < tau * std::max(std::sqrt(reduce_sum(nn) * reduce_sum(oo)), 1e-30f);
    }

    // out's row (b, l) from the context cache (`from` null) or from `from` ([H][D])
    void emit(int64_t b, int64_t l, const float* from = nullptr) const {
        for (int64_t h = 0; h < H; ++h)
            std::memcpy(out.at(b, h, l), from ? from + h * D : ctx.at(b, h, l), D * sizeof(float));
    }
};

extern "C" void kernel(
        float* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
        float* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
        float* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
        float* kp, int64_t kp_sb, int64_t kp_sh, int64_t kp_sl,
        float* vp, int64_t vp_sb, int64_t vp_sh, int64_t vp_sl,
        float* ctx, int64_t c_sb, int64_t c_sh, int64_t c_sl,
        float* out, int64_t o_sb, int64_t o_sh, int64_t o_sl,
        float* lse, int64_t lse_sb, int64_t lse_sh, int64_t lse_sl,
        uintptr_t bias, int64_t bias_sb, int64_t bias_sh, int64_t bias_sl,
        const bool* kv_rows, const bool* query, const bool* always, bool* salient, int64_t* stats,
        int64_t B, int64_t H, int64_t Hk, int64_t L, float scale, float tau, float floor,
        int64_t rows_only) {  // rows_only: out is written at the rows returned salient alone
    const Step st{{q, q_sb, q_sh, q_sl}, {k, k_sb, k_sh, k_sl}, {v, v_sb, v_sh, v_sl},
                  {kp, kp_sb, kp_sh, kp_sl}, {vp, vp_sb, vp_sh, vp_sl}, {ctx, c_sb, c_sh, c_sl},
                  {out, o_sb, o_sh, o_sl}, lse, lse_sb, lse_sh, lse_sl,
                  reinterpret_cast<const float*>(bias), bias_sb, bias_sh, bias_sl, H, L, H / Hk,
                  scale, floor, tau};
    enum : uint8_t { KEPT, EXACT, INCREMENTAL };
    std::vector<std::vector<int64_t>> cols(B);  // per sequence, the changed columns
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < L; ++j)
            if (kv_rows[b * L + j]) cols[b].push_back(j);
    std::vector<Keys> old_keys(B * Hk), new_keys(B * Hk), all_keys(B * Hk);
    std::vector<uint8_t> how(B * L, KEPT);
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * Hk; ++i) {
            const int64_t b = i / Hk, h = i % Hk;
            const auto& c = cols[b];
            old_keys[i].fill(c.size(), [&](int64_t j) { return st.kp.at(b, h, c[j]); },
                             [&](int64_t j) { return st.vp.at(b, h, c[j]); });
            new_keys[i].fill(c.size(), [&](int64_t j) { return st.k.at(b, h, c[j]); },
                             [&](int64_t j) { return st.v.at(b, h, c[j]); });
            // not transposed: the exact rows' scores are dot products over the key rows (transposing every key cost
            // more than it saved, up to 64 exact rows of 640 in `benchmarks/attention_step.py`'s shapes)
            all_keys[i].fill(L, [&](int64_t j) { return st.k.at(b, h, j); },
                             [&](int64_t j) { return st.v.at(b, h, j); }, false);
        }
        // every row: kept, updated incrementally, or exact (an exact row costs as much as many updated ones:
        // dynamic chunks balance them)
        Scratch scratch(L, H);
        #pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < B * L; ++r) {
            const int64_t b = r / L, l = r % L;
            salient[r] = false;
            if (!query[r]) {
                for (int64_t h = 0; h < H; ++h) st.lse_at(b, h, l) = INF;  // misses this step: stale
                if (!rows_only) st.emit(b, l);
                continue;
            }
            bool stale = false;
            for (int64_t h = 0; h < H; ++h) stale |= st.lse_at(b, h, l) == INF;
            uint8_t row = KEPT;
            if (kv_rows[r] || stale) {
                row = EXACT;
            } else if (!cols[b].empty()) {
                row = st.incremental(b, l, cols[b], &old_keys[b * Hk], &new_keys[b * Hk], scratch)
                    ? INCREMENTAL : EXACT;
            }
            if (row == EXACT) st.exact(b, l, &all_keys[b * Hk], scratch);
            if (row != KEPT) salient[r] = st.commit(b, l, scratch.row.data());
            if (!rows_only || salient[r] || always[r]) st.emit(b, l, row == KEPT ? nullptr : scratch.row.data());
            how[r] = row;
        }
    }
    int64_t counts[4] = {0, 0, 0, 0};  // salient, exact, incremental, query
    for (int64_t r = 0; r < B * L; ++r) {
        salient[r] = query[r] && (salient[r] || always[r]);
        counts[0] += salient[r];
        counts[1] += how[r] == EXACT;
        counts[2] += how[r] == INCREMENTAL;
        counts[3] += query[r];
    }
    std::memcpy(stats, counts, sizeof(counts));
    for (int64_t b = 0; b < B; ++b)  // the previous K/V: equal to K/V outside the changed rows
        for (int64_t j : cols[b])
            for (int64_t h = 0; h < Hk; ++h) {
                std::memcpy(st.kp.at(b, h, j), st.k.at(b, h, j), D * sizeof(float));
                std::memcpy(st.vp.at(b, h, j), st.v.at(b, h, j), D * sizeof(float));
            }
}
"""
_ARGTYPES = (["float*"] + ["int64_t"] * 3) * 8 + ["uintptr_t"] + ["int64_t"] * 3 + \
    ["const bool*"] * 3 + ["bool*", "int64_t*"] + ["int64_t"] * 4 + ["float"] * 3 + ["int64_t"]
FALLBACK = "attention on sparse steps runs as torch ops"


@functools.lru_cache(maxsize=None)
def _source(head_dim: int) -> str:
    return _SOURCE.replace("HEAD_DIM;", f"{head_dim};")


def _kernel(head_dim: int):
    """The kernel built for `head_dim` (a constant in its C++), or None where it cannot be built."""
    return cpp_build.load("attention_step", _ARGTYPES, _source(int(head_dim)), FALLBACK, variant=int(head_dim))


def available(head_dims: Iterable[int]) -> bool:
    """Whether the kernel is built for every head dim of `head_dims` (compiles them at the first call, seconds
    each, then from Inductor's cache)."""
    return all(_kernel(d) is not None for d in head_dims)


def _takes(t: Tensor) -> bool:
    return t.is_cpu and t.dtype == torch.float32 and t.dim() == 4 and t.stride()[3] == 1


def supported(q: Tensor, k: Tensor, v: Tensor, k_prev: Tensor, v_prev: Tensor, ctx_cache: Tensor,
              lse_cache: Tensor, stats: Tensor) -> bool:
    """Whether the kernel takes these operands: fp32 CPU tensors with a contiguous last axis (lse: any strides),
    query heads a multiple of the KV heads, `stats` a contiguous int64 row."""
    return (_takes(q) and _takes(k) and _takes(v) and _takes(k_prev) and _takes(v_prev) and _takes(ctx_cache)
            and lse_cache.is_cpu and lse_cache.dtype == torch.float32 and q.shape[1] % k.shape[1] == 0
            and k.shape[3] == v.shape[3] == q.shape[3]
            and stats.dtype == torch.int64 and stats.is_contiguous())


def _bias(mask: Tensor, B: int, L: int) -> Tensor:
    """The mask as an additive fp32 `[B, 1 or H, L, L]` with a contiguous last axis, made once per mask tensor and
    version (every layer of a step passes the same mask; a bool one costs tens of us to convert), kept on the mask."""
    try:
        key = (mask._version, B, L)
    except RuntimeError:  # an inference tensor keeps no version: made every time, not kept
        key = None
    kept = getattr(mask, "_dyllm_additive", None)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    bias = _additive(mask, B, L, L)
    if bias.stride(3) != 1:
        bias = bias.contiguous()
    if key is not None:
        mask._dyllm_additive = (key, bias)
    return bias


def _strided(t: Tensor) -> tuple:
    s = t.stride()
    return t, s[0], s[1], s[2]


torch.library.define(
    "dyllm::attention_step",
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor kv_rows, Tensor query_rows, Tensor always_rows, "
    "Tensor dense, Tensor(a!) k_prev, Tensor(b!) v_prev, Tensor(c!) ctx_cache, Tensor(d!) lse_cache, "
    "Tensor(e!) stats, float scale, float tau, bool rows_only=False) -> (Tensor, Tensor)")


def attention_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kv_rows: Tensor,
                   query_rows: Tensor, always_rows: Tensor, dense: Tensor, k_prev: Tensor, v_prev: Tensor,
                   ctx_cache: Tensor, lse_cache: Tensor, stats: Tensor, scale: float,
                   tau: float, rows_only: bool = False) -> tuple[Tensor, Tensor]:
    """The op (`incremental_attention_step`'s contract). `rows_only`: at a sparse step the output is written at
    the rows it returns as salient alone, the rows its graph reads (`passes/saliency_rewrite.py` sets it
    where every reader gathers those rows); elsewhere it is left unwritten. Every row is written otherwise, and
    always by the fallback and at a dense step."""
    # operands it does not take build no kernel for their head dim
    kernel = _kernel(q.shape[3]) if supported(q, k, v, k_prev, v_prev, ctx_cache, lse_cache, stats) else None
    if kernel is None:
        return incremental_attention_step(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_prev,
                                          v_prev, ctx_cache, lse_cache, stats, scale, tau)
    B, H, L, D = q.shape
    bias = None if attn_mask is None else _bias(attn_mask, B, L)
    if bool(dense):
        return _dense_step(q, k, v, bias, query_rows, always_rows, k_prev, v_prev, ctx_cache, lse_cache, stats,
                           scale, tau)
    bias_args = (0, 0, 0, 0) if bias is None else (
        bias.data_ptr(), bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2))
    out = q.new_empty(B, L, H, D).transpose(1, 2)  # SDPA's output layout
    salient = torch.empty(B, L, dtype=torch.bool)
    kernel(*_strided(q), *_strided(k), *_strided(v), *_strided(k_prev), *_strided(v_prev), *_strided(ctx_cache),
           *_strided(out), *_strided(lse_cache), *bias_args, kv_rows.contiguous(), query_rows.contiguous(),
           always_rows.contiguous(), salient, stats, B, H, k.shape[1], L, scale, tau, CANCELLATION_FLOOR,
           int(rows_only))
    return out, salient


def _dense_step(q, k, v, bias, query_rows, always_rows, k_prev, v_prev, ctx_cache, lse_cache, stats, scale,
                tau) -> tuple[Tensor, Tensor]:
    """A dense step: every query row exact, by the CPU flash-attention kernel over every row (it returns the lse the
    next steps' updates start from); the rest of the step as `incremental_attention_step` does it."""
    g = q.shape[1] // k.shape[1]
    keys, values = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    ctx, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, keys, values, 0.0, False,
                                                                           attn_mask=bias, scale=scale)[:2]
    # no cosines where every query row is salient whatever its cosine (a dense step: every row is in `always_rows`)
    ctx, salient = update_context(ctx, ctx_cache, query_rows, always_rows, stats, tau,
                                  test=not bool((always_rows | ~query_rows).all()))
    lse_cache.copy_(torch.where(query_rows[:, None, :], lse, math.inf))
    k_prev.copy_(k)
    v_prev.copy_(v)
    return _output(ctx, q.dtype, copy=False), salient


torch.library.impl("dyllm::attention_step", "CompositeExplicitAutograd")(attention_step)


@torch.library.register_fake("dyllm::attention_step")
def _(q, k, v, attn_mask, kv_rows, query_rows, always_rows, dense, k_prev, v_prev, ctx_cache, lse_cache, stats,
      scale, tau, rows_only=False):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, L, dtype=torch.bool)
