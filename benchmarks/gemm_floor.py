"""The GEMM floor of a sparse step on CPU: every linear of a model at a few rows, against one read of its weights.

    python benchmarks/gemm_floor.py [--model smollm2_dream] [--rows 4 8 16]

At a sparse step's few rows a linear reads its whole weight for little arithmetic, so the step's GEMMs cost about
the time to stream every weight once, whatever the salient fraction. Each figure is one pass over every
`nn.Linear` of the model (each weight once, the LM head included), median of `--repeats`:
- `packed_linear`: the backend's CPU path below tau = 1 (`panel_gemm` on its panel-packed copy, any row count);
- `oneDNN packed`: oneDNN on its own prepacked fp32 weight (`packed_linear`'s path where the C++ is not built);
- `F.linear`: MKL, the path at tau = 1.0;
- `read`: `sum` over every weight, a streaming read of the bytes: the floor;
- `packed bf16` (where the CPU has a bf16 GEMM): a bf16 copy packed the same way, for comparison only (the backend does not use it: it changes
  the numerics), to show what halving the bytes would give.
The last column is the fp32 weights' size over the time (for bf16 too: the same weights, half the bytes read).
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from dyllm_fx.bench import median_ms
from dyllm_fx.kernels.packed_linear import PACK_ROWS_HINT, available, packed_linear
from dyllm_fx.models import get_model


def _packed_bf16(weights):
    """oneDNN-packed bf16 copies of `weights`, or None where this CPU has no bf16 GEMM (no AVX-512 / AVX-NE-CONVERT)."""
    try:
        return [torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), PACK_ROWS_HINT) for w in weights]
    except RuntimeError:
        return None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2_dream")
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model = get_model(args.model).eval()
    weights = [m.weight.detach().float() for m in model.modules() if isinstance(m, nn.Linear)]
    if not weights:
        raise ValueError(f"{args.model} has no nn.Linear")
    gb = sum(w.numel() * w.element_size() for w in weights) / 1e9
    packed = available(torch.float32, "cpu")
    bf16 = _packed_bf16(weights) if packed else None
    results = [dict(path="read", rows=0, ms=median_ms(lambda: [w.sum() for w in weights], args.repeats))]
    with torch.no_grad():
        for n in args.rows:
            xs = [torch.randn(n, w.shape[1]) for w in weights]
            paths = {"F.linear": lambda: [F.linear(x, w) for x, w in zip(xs, weights)]}
            if packed:
                paths["packed_linear"] = lambda: [packed_linear(x, [w], [None]) for x, w in zip(xs, weights)]
                onednn = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in weights]
                paths["oneDNN packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                                  for x, w in zip(xs, onednn)]
                if bf16 is not None:
                    xb = [x.to(torch.bfloat16) for x in xs]
                    paths["packed bf16"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                                    for x, w in zip(xb, bf16)]
            for path, fn in paths.items():
                results.append(dict(path=path, rows=n, ms=median_ms(fn, args.repeats)))
    print(f"{args.model}: {len(weights)} linears, {gb * 1e3:.0f} MB of fp32 weights, {torch.get_num_threads()} threads")
    print("| path | rows | ms per pass | fp32 weight GB / s |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['path']} | {r['rows'] or '-'} | {r['ms']:.1f} | {gb / (r['ms'] / 1e3):.1f} |")
    return results


if __name__ == "__main__":
    main()
