"""Helpers shared by the model factories of `models.py` and `zoo.py` (no imports of either: no cycle)."""
from collections.abc import Callable

import torch
from torch import nn


def _seeded_init(build: Callable[[], nn.Module], seed: int, dtype: torch.dtype) -> nn.Module:
    """build() under torch.manual_seed(seed) without touching the caller's RNG state; eval mode, dtype."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(dtype).eval()


def _mark_diffusion(model: nn.Module, mask_token_id: int, shift_logits: bool) -> nn.Module:
    model.config.is_causal = False
    model.config.use_cache = False  # a diffusion LM re-reads the whole sequence: no KV cache outputs
    model.config.mask_token_id = int(mask_token_id)
    model.config.shift_logits = bool(shift_logits)
    return model
