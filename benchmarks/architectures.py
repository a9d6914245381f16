"""The supported-architecture table: every decodable model of `dyllm_fx.models.MODELS` through the benchmark.

    python benchmarks/architectures.py [--models llama qwen3 ...] [--json results/architectures.json]

Per model: what `dyllm_fx.explain` finds (attentions rewritten, linears gated under each policy), then
`python -m dyllm_fx.bench --model NAME` at a small setting (builtin prompts, batch 2, 32 prompt + 32 generated
tokens, 32 steps, block 16, inductor vs dyllm "full" at tau 1.0 and 0.99). The random-init models are tiny:
their speedups say nothing about real sizes; the columns that matter are the rewrite and the agreement.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

import dyllm_fx
from dyllm_fx import bench
from dyllm_fx.models import MODELS, get_model
from dyllm_fx.zoo import NOT_DECODABLE

SKIP = {"smollm2_dream", "llada_8b"}  # the default model (the main benchmark measures it); 8B, for GPUs
BENCH_ARGS = ["--prompts", "builtin", "--batch", "2", "--max-prompt-tokens", "32", "--gen-length", "32", "--steps", "32",
              "--block-length", "16", "--modes", "inductor", "dyllm", "--tau", "1.0", "0.99", "--policy", "full"]


def rewrite_summary(name: str) -> dict:
    model = get_model(name)
    ids = torch.randint(0, model.config.mask_token_id, (2, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for policy in ("paper", "full"):
        (report,) = dyllm_fx.explain(model, ids, options={"policy": policy})
        out[policy] = f"{len(report.gated)}/{len(report.linears)}"
        out["attentions"] = f"{sum(s.supported for s in report.sites)}/{len(report.sites)}"
        out["fallback"] = report.fallback
    torch._dynamo.reset()  # another input shape next: no automatic dynamic shapes from this trace
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if m not in NOT_DECODABLE and m not in SKIP])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=BENCH_ARGS,
                   help="arguments for dyllm_fx.bench (last option)")
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        summary = rewrite_summary(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.json"
            bench.main(["--model", name, *args.bench_args, "--json", str(path)])
            result = json.loads(path.read_text())
        by_mode = {r["mode"]: r for r in result["results"]}
        inductor = by_mode.get("inductor")
        for mode, r in by_mode.items():
            if mode == "inductor":
                continue
            rows.append(dict(model=name, mode=mode, **summary, command=result["command"],
                             speedup=inductor["steady_s"] / r["steady_s"] if inductor else None,
                             token_agreement=r["token_agreement"], teacher_forced=r["teacher_forced_agreement"],
                             salient=r["extras"].get("salient fraction", "-")))
    print("| model | attentions rewritten | linears gated (paper / full) | mode | salient fraction | "
          "token agreement | teacher-forced top-1 | speedup vs inductor |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    for r in rows:
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['model']} | {r['attentions']} | {r['paper']} / {r['full']} | {r['mode']} | {r['salient']} | "
              f"{pct(r['token_agreement'])} | {pct(r['teacher_forced'])} | {speedup} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
