"""Kernel table: the Triton row kernels against the dense torch ops they replace.

    python benchmarks/kernel_table.py                      # GPU: LLaDA-8B shapes, bf16
    TRITON_INTERPRET=1 python benchmarks/kernel_table.py --tiny --device cpu   # the same code at toy sizes, interpreted

- sparse-row linear at row fractions 1-100 % of `--rows` rows, 4096 -> 12288 and 12288 -> 4096 (LLaDA-8B's MLP),
  against `torch.nn.functional.linear` over every row; *of ideal*: the kernel's time over (dense time x fraction),
  target <= 1.3 at 10 %.
- delta attention's incremental update (every query row, |A| changed key/value columns) at N = 1024 and 2048, 32
  heads of 128, against `scaled_dot_product_attention` over the whole sequence; target <= 0.15x SDPA at 5 %.
Timings on CUDA are `triton.testing.do_bench` medians; under the interpreter one call (only that it runs).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from dyllm_fx.kernels.delta_attention_triton import incremental_update, rows_attention
from dyllm_fx.kernels.row_index import row_index
from dyllm_fx.kernels.sparse_rows_linear_triton import sparse_rows_linear_triton

FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50, 1.00)
CHANGED = (0.01, 0.05, 0.10, 0.25)


def timed(fn, device) -> float:
    """Milliseconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def random_rows(n: int, fraction: float, device, g) -> torch.Tensor:
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, torch.randperm(n, generator=g)[: max(1, round(fraction * n))]] = True
    return mask.to(device)


def linear_table(rows: int, shapes, dtype, device, g) -> list[dict]:
    out = []
    for k, n in shapes:
        x = torch.randn(rows, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype) / math.sqrt(k)
        y = torch.empty(rows, n, device=device, dtype=dtype)
        dense = timed(lambda: F.linear(x, w), device)
        for f in FRACTIONS:
            index, count = row_index(random_rows(rows, f, device, g))
            t = timed(lambda: sparse_rows_linear_triton(x, w, None, index[0], count, y), device)
            out.append(dict(op=f"sparse-row linear {k}->{n}", size=f"{rows} rows", fraction=f, ms=t, dense_ms=dense,
                            of_ideal=t / (dense * f)))
    return out


def attention_table(lengths, heads: int, head_dim: int, dtype, device, g) -> list[dict]:
    out = []
    for n in lengths:
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype) for _ in range(3))
        scale = 1 / math.sqrt(head_dim)
        sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale), device)
        ctx = torch.zeros(1, heads, n, head_dim, device=device)
        lse = torch.zeros(1, heads, n, device=device)
        every_row = row_index(torch.ones(1, n, dtype=torch.bool, device=device))
        rows_attention(q, k, v, None, *every_row, ctx, lse, scale)
        k2, v2 = torch.randn_like(k), torch.randn_like(v)
        for f in CHANGED:
            cols = row_index(random_rows(n, f, device, g))
            c, l = ctx.clone(), lse.clone()
            t = timed(lambda: incremental_update(q, k, v, k2, v2, None, *every_row, *cols, c, l, scale), device)
            out.append(dict(op="delta attention (incremental)", size=f"N={n}", fraction=f, ms=t, dense_ms=sdpa,
                            of_ideal=t / sdpa))
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--rows", type=int, default=16 * 512, help="rows of the linear (batch x sequence)")
    p.add_argument("--tiny", action="store_true", help="toy shapes (for the interpreter)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cpu":
        from dyllm_fx.kernels.dispatch import interpreted

        if not interpreted():
            p.error("on CPU the Triton kernels need the interpreter: run with TRITON_INTERPRET=1 (and --tiny)")
    dtype, g = getattr(torch, args.dtype), torch.Generator().manual_seed(args.seed)
    if args.tiny:
        rows = linear_table(64, [(32, 48), (48, 32)], dtype, args.device, g)
        rows += attention_table([32], 2, 16, dtype, args.device, g)
    else:
        rows = linear_table(args.rows, [(4096, 12288), (12288, 4096)], dtype, args.device, g)
        rows += attention_table([1024, 2048], 32, 128, dtype, args.device, g)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter: timings meaningless)"
    print(f"{device}, {args.dtype}, torch {torch.__version__}")
    print("| op | size | rows or columns | ms | dense ms | time / ideal |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ideal = "x SDPA" if "attention" in r["op"] else "x ideal"
        print(f"| {r['op']} | {r['size']} | {r['fraction']:.0%} | {r['ms']:.3f} | {r['dense_ms']:.3f} | "
              f"{r['of_ideal']:.2f}{ideal} |")
    return rows


if __name__ == "__main__":
    main()
