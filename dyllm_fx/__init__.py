"""dyllm-fx: saliency-gated incremental inference for masked-diffusion LMs, as a torch.compile backend."""
from dyllm_fx.backend import backend
from dyllm_fx.options import Options

__all__ = ["backend", "Options"]
