"""Where the time of a sparse dyllm step goes: torch.profiler over steady-state decode steps.

    python benchmarks/profile_step.py --policy full --tau 0.99 [--model smollm2_dream] [--steps 16] [--kernel-profile]

Decodes the benchmark's default batch (GSM8K prompts) with the dyllm backend, times `--profiled` sparse steps by
the clock, then profiles as many more and prints the top ops by self CPU time, then the same time in groups
(GEMMs, attention, Inductor's kernels, row indexes, the rest), per step and as shares. The clock's step time less
the ops' self time is time outside every op: Python (the graph's wrapper, Dynamo's guards, the backend's state).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import dyllm_fx
from dyllm_fx.bench import left_to_right_steps


# (group, test on an op's name); an op goes to the first group whose test it passes. Self times partition the
# profiled time, so the groups add up to it.
GROUPS = [
    ("GEMMs (aten::mm/addmm, oneDNN linear, panel_gemm)",
     lambda n: n in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "dyllm::panel_gemm")),
    ("attention (SDPA, attention_step)", lambda n: "scaled_dot_product" in n or n == "dyllm::attention_step"),
    ("Inductor's C++ kernels (gathers, norms, RoPE, SwiGLU, cache writes, saliency)",
     lambda n: n.startswith("graph_") and "_cpp_" in n),
    ("row indexes (select_rows, nonzero, sort)",
     lambda n: n in ("dyllm::select_rows", "aten::nonzero", "aten::sort")),
    ("packed_linear's own Python", lambda n: n == "dyllm::packed_linear"),
    ("the rest (graph wrapper, Dynamo guards, views, allocations)", lambda n: True),
]


def grouped(events, steps: int) -> str:
    """Self CPU time of the profiled steps in GROUPS: ms per step and share, one line each."""
    totals = dict.fromkeys([name for name, _ in GROUPS], 0.0)
    for e in events:
        group = next(name for name, test in GROUPS if test(e.key))
        totals[group] += e.self_cpu_time_total / 1000.0
    whole = sum(totals.values()) or 1.0
    lines = [f"{whole / steps:.1f} ms per step (self CPU time):"]
    lines += [f"  {100 * ms / whole:5.1f} %  {ms / steps:6.1f} ms  {name}" for name, ms in totals.items()]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_dream")
    p.add_argument("--policy", default=dyllm_fx.Options.policy)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--exact-attention-below", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=12, help="unprofiled steps first (dense warm-up + compile)")
    p.add_argument("--profiled", type=int, default=4)
    p.add_argument("--prompts", default="gsm8k")
    p.add_argument("--max-prompt-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--kernel-profile", action="store_true",
                   help="name Inductor's C++ kernels in the table (else their time is the compiled graph's own)")
    args = p.parse_args()
    if args.kernel_profile:
        from torch._inductor import config as inductor_config  # `import torch._inductor...` would make torch local

        inductor_config.cpp.enable_kernel_profile = True

    model, step = left_to_right_steps(args, dyllm_fx.backend(
        tau=args.tau, policy=args.policy, exact_attention_below=args.exact_attention_below))

    with torch.no_grad():
        for _ in range(args.steps):
            step()
        start = time.perf_counter()
        for _ in range(args.profiled):
            step()
        wall_ms = 1000 * (time.perf_counter() - start) / args.profiled
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profiled):
                step()
    print(f"{args.model} policy={args.policy} tau={args.tau}, {args.profiled} sparse steps timed, as many profiled")
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(grouped(events, args.profiled))
    ops_ms = sum(e.self_cpu_time_total for e in events) / 1000.0 / args.profiled
    print(f"{wall_ms:.1f} ms per step by the clock (unprofiled steps); outside every op (Python): "
          f"{wall_ms - ops_ms:.1f} ms (the profiler inflates op times: a lower bound)")
    print(f"mean salient fraction over the sparse steps: {dyllm_fx.stats(model)[0].mean_salient_fraction:.3f}")


if __name__ == "__main__":
    main()
