"""dyllm-fx: saliency-gated incremental inference for masked-diffusion LMs, as a torch.compile backend.

    model = torch.compile(model, backend="dyllm", options={"tau": 0.99})
    out = dyllm_fx.generate(model, ids, gen_length=128, steps=128, block_length=32, mask_id=m)
"""
from dyllm_fx.backend import backend
from dyllm_fx.explain import explain
from dyllm_fx.generate import generate
from dyllm_fx.options import Options
from dyllm_fx.outputs import borrowed_outputs, rows_written
from dyllm_fx.stats import reset, stats

__all__ = ["backend", "borrowed_outputs", "explain", "generate", "Options", "reset", "rows_written", "stats"]
