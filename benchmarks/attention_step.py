"""One attention layer of a sparse CPU step: every row exact (one SDPA) against the incremental update over the
changed keys, as torch ops and as one C++ call (the forms `exact_attention_below` chooses between).

    python benchmarks/attention_step.py [--lengths 128 320 1280] [--changed 0.03 0.1] [--repeats 50]

SmolLM2-135M's attention shape by default (batch 2, 9 query heads over 3 KV heads of 64). Per length and changed
fraction: K/V change on that share of rows per sequence (at least one), every row is a query row, caches hold the
previous step's exact state. The torch forms are one `torch.compile`d call of the function the rewrite puts in the
graph (`kernels/exact_attention.py`, `kernels/incremental_attention.py`), the C++ form one call of the op
(`kernels/attention_step_cpp.py`); median ms of `--repeats` calls after three warm-up calls, and the largest
difference of the incremental forms' contexts from SDPA's.
"""
import argparse
import math

import torch

import dyllm_fx.kernels  # noqa: F401  (registers torch.ops.dyllm)
from dyllm_fx.bench import median_ms
from dyllm_fx.kernels.exact_attention import exact_attention_step
from dyllm_fx.kernels.incremental_attention import incremental_attention_step

attention_step = torch.ops.dyllm.attention_step.default


def layer_inputs(B, H, Hk, L, D, changed: float, gen):
    """q, k, v in the rewrite's layouts (rows outer), the changed rows, and the previous step's K/V, context and lse."""
    heads_inner = lambda *shape: torch.randn(B, L, *shape, generator=gen).transpose(1, 2)
    q, k, v, k_prev, v_prev = heads_inner(H, D), heads_inner(Hk, D), heads_inner(Hk, D), heads_inner(Hk, D), \
        heads_inner(Hk, D)
    kv_rows = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        kv_rows[b, torch.randperm(L, generator=gen)[:max(1, round(changed * L))]] = True
    k_prev = torch.where(kv_rows[:, None, :, None], k_prev, k)
    v_prev = torch.where(kv_rows[:, None, :, None], v_prev, v)
    scale = 1 / math.sqrt(D)
    s = q @ k_prev.repeat_interleave(H // Hk, 1).transpose(-1, -2) * scale
    ctx = torch.empty(B, L, H, D).transpose(1, 2).copy_(torch.softmax(s, -1) @ v_prev.repeat_interleave(H // Hk, 1))
    lse = torch.empty(B, L, H).transpose(1, 2).copy_(torch.logsumexp(s, -1))
    return q, k, v, kv_rows, k_prev, v_prev, ctx, lse, scale


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 320, 1280])
    p.add_argument("--changed", type=float, nargs="+", default=[0.03, 0.1])
    p.add_argument("--shape", type=int, nargs=4, default=[2, 9, 3, 64], metavar=("B", "H", "HK", "D"))
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    B, H, Hk, D = args.shape
    exact = torch.compile(exact_attention_step, dynamic=False, fullgraph=True)
    incremental = torch.compile(incremental_attention_step, dynamic=False, fullgraph=True)
    results = []
    for L in args.lengths:
        for changed in args.changed:
            q, k, v, kv_rows, k_prev, v_prev, ctx, lse, scale = layer_inputs(B, H, Hk, L, D, changed,
                                                                              torch.Generator().manual_seed(L))
            query, always = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
            dense, stats = torch.tensor(False), torch.zeros(4, dtype=torch.long)
            # the first call changes the caches: from then on K/V equal their previous step, as in a steady step
            out, _ = incremental(q, k, v, None, kv_rows, query, always, dense, k_prev.clone(), v_prev.clone(),
                                 ctx.clone(), lse.clone(), stats, scale, 0.99)
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=Hk != H)
            row = dict(length=L, changed=changed, error=(out - sdpa).abs().max().item())
            row["incremental_ms"] = median_ms(lambda: incremental(
                q, k, v, None, kv_rows, query, always, dense, k_prev, v_prev, ctx, lse, stats, scale, 0.99),
                args.repeats, warmup=3)
            caches = [k_prev.clone(), v_prev.clone(), ctx.clone(), lse.clone()]
            out, _ = attention_step(q, k, v, None, kv_rows, query, always, dense, *caches, stats, scale, 0.99)
            row["cpp_error"] = (out - sdpa).abs().max().item()
            row["cpp_ms"] = median_ms(lambda: attention_step(
                q, k, v, None, kv_rows, query, always, dense, *caches, stats, scale, 0.99), args.repeats, warmup=3)
            ctx_exact = ctx.clone()
            row["exact_ms"] = median_ms(
                lambda: exact(q, k, v, None, query, always, ctx_exact, stats, scale, 0.99), args.repeats, warmup=3)
            results.append(row)
    print(f"batch {B}, {H} heads over {Hk} KV heads of {D}, {torch.get_num_threads()} threads")
    print("| length | changed rows | every row exact (SDPA) ms | incremental, torch ops ms | incremental, C++ ms | "
          "C++ / exact | max abs diff (torch ops, C++) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['length']} | {100 * r['changed']:.0f} % | {r['exact_ms']:.2f} | {r['incremental_ms']:.2f} | "
              f"{r['cpp_ms']:.2f} | {r['cpp_ms'] / r['exact_ms']:.2f} | {r['error']:.1e}, {r['cpp_error']:.1e} |")
    return results


if __name__ == "__main__":
    main()
