"""Backend options, validated: `torch.compile(model, backend="dyllm", options={...})`."""
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

POLICIES = ("paper", "full")
LOWERINGS = ("inductor", "eager")
EXACT_ATTENTION_BELOW_CPU = 1024
# layers per compiled segment of `split_layers=True`: on the default model 3 cost a first compile a few seconds
# longer than 1 and made sparse steps faster (fewer cuts, each a compiled call Inductor fuses nothing across;
# README "Compile time")
LAYERS_PER_SEGMENT = 3


@dataclass(frozen=True)
class Options:
    """`tau`: cosine threshold of the saliency test, in (0, 1]; 1.0 reproduces the model.
    `dense_steps`: dense warm-up steps after a new sequence starts.
    `policy`: "full" (gate every linear: Q, output projection and LM head too) or "paper" (gate K/V and MLP,
    the published schedule). "full" is the default: better on speed x fidelity in the benchmark (README).
    `lowering`: "inductor" (compile the rewritten graph) or "eager" (run it as is: debugging, tests).
    `mask_id`: the [MASK] token id; enables response-only query rows with a prompt pass every
    `prompt_period` steps, and detects a new sequence when a non-mask token changes.
    `exact_attention_below`: up to this key length, attention recomputes every query row exactly (one
    SDPA call) instead of the incremental update (exact rows for the changed ones, the changed keys' terms for
    the others); None: on CPU, 0 below tau = 1.0 where the incremental step's C++ kernel is built
    (`kernels/attention_step_cpp.py`), else 1024 (at tau = 1.0 the SDPA form reproduces the model bit for
    bit; as torch ops the incremental form took as long as SDPA at 320 tokens and compiled 2.6x slower,
    README); 0 on GPU.
    `compact_rows`: run each gated region on its rows alone (data-dependent sizes: the CPU path) instead of
    on full-size tensors under a row mask (static shapes, no host synchronisation: the GPU path); None: True
    on CPU, False on GPU.
    `packed_weights`: on the compact path, gated linears run `packed_linear` instead of `F.linear`: our C++ GEMM
    on a copy of their weights packed once in column panels (`kernels/packed_linear.py`, `panel_gemm.py`):
    faster than MKL at a sparse step's few rows on CPU and as fast at a dense step's (README), one more copy
    of those weights in memory, results off `F.linear`'s by fp32 rounding; None: on below tau = 1.0 (at 1.0 the
    rewritten model reproduces the original bit for bit on CPU).
    `split_layers`: with Inductor, compile the rewritten graph in segments cut at every `split_layers`-th
    attention (True: `LAYERS_PER_SEGMENT`), each distinct segment once (`dyllm_fx/lowering.py`: identical
    segments share one compile; README "Compile time"); False compiles it whole. More layers per segment: fewer
    cuts per step (each costs a little), longer compiles."""

    tau: float = 0.99
    dense_steps: int = 4
    policy: str = "full"
    lowering: str = "inductor"
    mask_id: Optional[int] = None
    prompt_period: int = 4
    exact_attention_below: Optional[int] = None
    compact_rows: Optional[bool] = None
    packed_weights: Optional[bool] = None
    split_layers: Union[bool, int] = True

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"dyllm option {key}={getattr(self, key)!r}: {why}")

        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            bad("tau", "must be a number in (0, 1]; 1.0 reproduces the model, 0.99 is the usual setting")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 1:
            bad("dense_steps", "must be an int >= 1 (the first step of a sequence fills the caches)")
        if self.policy not in POLICIES:
            bad("policy", f"must be one of {POLICIES}")
        if self.lowering not in LOWERINGS:
            bad("lowering", f"must be one of {LOWERINGS}")
        if self.mask_id is not None and (isinstance(self.mask_id, bool) or not isinstance(self.mask_id, int) or self.mask_id < 0):
            bad("mask_id", "must be None or a non-negative token id")
        if self.exact_attention_below is not None and (
                isinstance(self.exact_attention_below, bool) or not isinstance(self.exact_attention_below, int)
                or self.exact_attention_below < 0):
            bad("exact_attention_below", "must be None or an int >= 0")
        if self.compact_rows is not None and not isinstance(self.compact_rows, bool):
            bad("compact_rows", "must be None, True or False")
        if self.packed_weights is not None and not isinstance(self.packed_weights, bool):
            bad("packed_weights", "must be None, True or False")
        if self.packed_weights and self.compact_rows is False:
            bad("packed_weights", "needs the compact path (packed weights serve its gated linears); drop "
                "compact_rows=False or packed_weights=True")
        if not isinstance(self.split_layers, bool) and (not isinstance(self.split_layers, int) or
                                                         self.split_layers < 1):
            bad("split_layers", "must be True, False or an int >= 1 (layers per compiled segment)")
        if isinstance(self.prompt_period, bool) or not isinstance(self.prompt_period, int) or self.prompt_period < 1:
            bad("prompt_period", "must be an int >= 1")

    def layers_per_segment(self) -> int:
        """Layers per compiled segment of `split_layers` (0: the graph whole)."""
        if self.split_layers is True:
            return LAYERS_PER_SEGMENT
        return int(self.split_layers)

    def exact_below(self, device, cpp_attention: bool = False) -> int:
        """`cpp_attention`: whether the incremental step's C++ kernel is built (CPU)."""
        if self.exact_attention_below is not None:
            return self.exact_attention_below
        if torch.device(device).type != "cpu" or (cpp_attention and self.tau < 1.0):
            return 0
        return EXACT_ATTENTION_BELOW_CPU

    def compact(self, device) -> bool:
        if self.compact_rows is not None:
            return self.compact_rows
        return torch.device(device).type == "cpu"

    def packed(self, device) -> bool:
        """Whether the compact path's gated linears use prepacked weights (never off the compact path)."""
        if not self.compact(device):
            return False
        return self.packed_weights if self.packed_weights is not None else self.tau < 1.0

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        valid = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            listing = ", ".join(f"{k} (default {v!r})" for k, v in valid.items())
            raise ValueError(f"unknown dyllm option(s) {unknown}; valid options: {listing}")
        return cls(**options)
