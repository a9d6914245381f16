"""dyllm-fx: saliency-gated incremental inference for masked-diffusion LMs, as a torch.compile backend."""
