"""Shared test helpers: denoising trajectories and running a compiled model against eager over them.

Imported as a top-level module (`from trajectories import ...`): pytest's default `prepend` import mode puts
this folder on `sys.path` for the test files in it (there is no `tests/__init__.py`).
"""
import contextlib
import importlib
from unittest import mock

import torch
from hypothesis import strategies as st


def left_padded(prompts):
    """Prompts `[1, n]` of different lengths as one left-padded batch: `(ids, attention_mask)`, both `[B, max n]`."""
    length = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - p.shape[1]:], mask[i, length - p.shape[1]:] = p[0], 1
    return ids, mask


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def trajectory(draw, batch, length, mask_id):
    """A denoising trajectory: prompt + masks, 1-4 tokens committed per step, sometimes a new sequence."""
    prompt = draw(st.integers(1, length - 2))
    ids = torch.full((batch, length), mask_id)
    ids[:, :prompt] = torch.randint(0, mask_id - 1, (batch, prompt))
    steps = [ids.clone()]
    for _ in range(draw(st.integers(2, 5))):
        if draw(st.integers(0, 5)) == 0:
            ids = torch.randint(0, mask_id - 1, (batch, length))
            ids[:, prompt:] = mask_id
        else:
            for b in range(batch):
                masked = (ids[b] == mask_id).nonzero().squeeze(1)
                if len(masked):
                    pick = masked[torch.randperm(len(masked))[: draw(st.integers(1, 4))]]
                    ids[b, pick] = torch.randint(0, mask_id - 1, (len(pick),))
        steps.append(ids.clone())
    return steps


def left_to_right(mask_id):
    """A short fixed trajectory for the Inductor tests: 2 sequences of 10 tokens, 3 prompt tokens, then positions
    3-6 committed one per step."""
    ids = torch.full((2, 10), mask_id)
    ids[:, :3] = torch.arange(6).view(2, 3)
    steps = [ids.clone()]
    for pos in range(3, 7):
        ids[:, pos] = pos
        steps.append(ids.clone())
    return steps


def run_both(model, compiled, steps, atol=1e-4, **kwargs):
    """Every step through the eager model and the compiled one (same extra kwargs): logits within `atol`,
    same argmax."""
    with torch.no_grad():
        for i, ids in enumerate(steps):
            ref, out = logits_of(model(ids, **kwargs)), logits_of(compiled(ids, **kwargs))
            diff = (ref - out).abs().max().item()
            assert diff <= atol, f"step {i}: max |eager - compiled| = {diff:.3g} > {atol}"
            assert torch.equal(ref.argmax(-1), out.argmax(-1)), f"step {i}: argmax differs"


@contextlib.contextmanager
def rows_seen_by_gated_linears():
    """Yields a list that receives `(selected rows, all rows)` for every row set a gated linear ran on inside
    the block: each `sparse_rows_linear` call (masked rows, reference path) and each region's `select_rows`
    (compact rows: every gated linear of the region runs on these)."""
    seen = []
    masked = importlib.import_module("dyllm_fx.kernels.sparse_rows_linear")
    compact = importlib.import_module("dyllm_fx.kernels.compact_rows")
    sparse_rows_linear, flat_index = masked.sparse_rows_linear_reference, compact.flat_index

    def counting_linear(x, weight, bias, rows, *args):
        seen.append((int(rows.sum()), rows.numel()))
        return sparse_rows_linear(x, weight, bias, rows, *args)

    def counting_index(rows):
        seen.append((int(rows.sum()), rows.numel()))
        return flat_index(rows)

    with mock.patch.object(masked, "sparse_rows_linear_reference", counting_linear), \
            mock.patch.object(compact, "flat_index", counting_index):
        yield seen
