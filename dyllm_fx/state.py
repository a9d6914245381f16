"""Runtime state of one compiled graph: its caches, the step counter, and the reset rules.

A call starts a new sequence (dense warm-up again) when it is the first one, when `reset()` was called,
when an input other than the token ids changed (attention mask, positions), or, with `mask_id` known,
when a token changed at a row that was not `[MASK]` in the previous call. Shape, dtype or device
changes reach a different compiled graph (Dynamo guards) and so a different state.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dyllm_fx.options import Options
from dyllm_fx.passes.saliency_rewrite import BufferSpec


@dataclass
class StepRecord:
    dense: bool
    prompt_pass: bool
    entry_rows: Tensor   # [B] rows entering layer 0 (changed inputs), per sequence
    layer_counts: Tensor  # [layers, 4]: salient, exact, incremental, query rows


class SequenceState:
    def __init__(self, buffers: list[BufferSpec], device, options: Options, token_index: int,
                 other_input_indices: list[int]):
        self.options = options
        self.token_index = token_index
        self.other_input_indices = other_input_indices
        self.buffers = buffers
        self.tensors = [_allocate(b, device) for b in buffers]
        self.storages = frozenset(t.untyped_storage().data_ptr() for t in self.tensors)  # see outputs.py
        self.by_role = {}
        for b, t in zip(buffers, self.tensors):
            self.by_role.setdefault(b.role, []).append(t)
        self.history: list[StepRecord] = []
        self.sequences = 0
        self.reset()

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b, t in zip(self.buffers, self.tensors)
                   if b.role in ("k_cache", "v_cache", "context", "lse", "cache"))

    def reset(self) -> None:
        self.step = 0
        self.prev_tokens: Optional[Tensor] = None
        self.prev_others: list = []
        self.response_rows: Optional[Tensor] = None

    def _starts_new_sequence(self, tokens: Tensor, others: list) -> bool:
        if self.prev_tokens is None:
            return True
        if len(others) != len(self.prev_others) or any(
            not (a is b or (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)))
            for a, b in zip(others, self.prev_others)
        ):
            return True
        mask_id = self.options.mask_id
        if mask_id is not None:
            return bool(((self.prev_tokens != mask_id) & _row_changed(tokens, self.prev_tokens)).any())
        return False

    def prepare(self, args) -> list[Tensor]:
        """Fills the control inputs for this call and returns every runtime-owned graph input."""
        tokens = args[self.token_index]
        others = [args[i] for i in self.other_input_indices]
        if self._starts_new_sequence(tokens, others):
            self.reset()
            self.sequences += 1
            mask_id = self.options.mask_id
            self.response_rows = (tokens == mask_id) if mask_id is not None and tokens.dim() == 2 else None
        dense = self.step < self.options.dense_steps
        sparse_step = self.step - self.options.dense_steps
        prompt_pass = dense or self.response_rows is None or (
            sparse_step % self.options.prompt_period == self.options.prompt_period - 1)
        entry = self.by_role["entry_rows"][0]
        query = self.by_role["query_rows"][0]
        if dense:
            entry.fill_(True)
        else:
            entry.copy_(_row_changed(tokens, self.prev_tokens))
        if prompt_pass:
            query.fill_(True)
        else:
            query.copy_(self.response_rows)
        self.by_role["dense"][0].fill_(dense)
        self.prev_tokens = tokens.detach().clone()
        self.prev_others = [a.detach().clone() if isinstance(a, Tensor) else a for a in others]
        self._pending = (dense, prompt_pass, entry.sum(1))
        return self.tensors

    def record(self) -> None:
        dense, prompt_pass, entry = self._pending
        self.history.append(StepRecord(dense, prompt_pass, entry, self.by_role["stats"][0].clone()))
        self.step += 1


def _allocate(spec: BufferSpec, device) -> Tensor:
    if spec.order is None:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    stored = torch.zeros([spec.shape[d] for d in spec.order], dtype=spec.dtype, device=device)
    return stored.permute([spec.order.index(d) for d in range(len(spec.order))])


def _row_changed(tokens: Tensor, prev: Tensor) -> Tensor:
    changed = tokens != prev
    return changed.flatten(2).any(-1) if changed.dim() > 2 else changed
