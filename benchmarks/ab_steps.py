"""Two sets of dyllm options on the same sparse steps, timed alternately in one process (an A/B comparison).

    python benchmarks/ab_steps.py --b exact_attention_below=0 [--a KEY=VALUE ...] [--pairs 40] [--model smollm2_dream]

On a shared machine one run of the benchmark varies by 10-20 % from the next, more than many changes are worth.
Here two dyllm-compiled copies of the model (A: `--a` options, B: `--b` options; both start from tau=0.99 and the
default policy) decode the benchmark's default batch left to right, one token per sequence per step, and their
sparse steps alternate (A then B, then B then A, ...), so both see the same load. Prints the median and mean ms per
sparse step of each and B / A. A first call and `--warmup` steps per copy (dense steps and compiles) are not timed.

`--dispatched a` (or `b`) compiles that copy with our ops called through the dispatcher, as without
`kernels/direct_calls.py` (`direct_calls.dispatched`, which turns the compile caches off for that copy's compile).
"""
import argparse
import contextlib
import statistics
import time

import torch

import dyllm_fx
from dyllm_fx.bench import left_to_right_steps, parse_options
from dyllm_fx.kernels.direct_calls import dispatched


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="options of A (default: tau=0.99)")
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="options of B")
    p.add_argument("--model", default="smollm2_dream")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--prompts", default="gsm8k")
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=12, help="untimed steps per copy (dense warm-up, compile)")
    p.add_argument("--pairs", type=int, default=40, help="timed sparse steps per copy")
    p.add_argument("--dispatched", choices=["a", "b"], default=None,
                   help="compile this copy with our ops called through the dispatcher (no direct calls)")
    args = p.parse_args(argv)
    try:
        options = {name: {"tau": 0.99, **parse_options(items)} for name, items in (("A", args.a), ("B", args.b))}
    except ValueError as bad:
        p.error(str(bad))
    steps = {name: left_to_right_steps(args, dyllm_fx.backend(**opts))[1] for name, opts in options.items()}
    for _ in range(args.warmup):
        for name, step in steps.items():
            with dispatched() if args.dispatched == name.lower() else contextlib.nullcontext():
                step()
    times = {"A": [], "B": []}
    for i in range(args.pairs):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            start = time.perf_counter()
            steps[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    result = {name: dict(options=options[name], median_ms=statistics.median(t), mean_ms=statistics.mean(t))
              for name, t in times.items()}
    result["b_over_a"] = result["B"]["median_ms"] / result["A"]["median_ms"]
    print(f"{args.model}, batch {args.batch}, {args.pairs} sparse steps each, alternating, "
          f"{torch.get_num_threads()} threads")
    for name in ("A", "B"):
        r = result[name]
        print(f"{name} {r['options']}: median {r['median_ms']:.1f} ms, mean {r['mean_ms']:.1f} ms per step")
    print(f"B / A (medians): {result['b_over_a']:.3f}")
    return result


if __name__ == "__main__":
    main()
