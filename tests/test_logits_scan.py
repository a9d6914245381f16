"""The decoding loop's C++ read of the logits (`kernels/logits_scan.py`) against its torch reference, and its use
in `generate`."""
import math
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dyllm_fx
from dyllm_fx.generate import generate
from dyllm_fx.kernels import logits_scan
from dyllm_fx.models import llada_like

pytestmark = pytest.mark.skipif(logits_scan._kernel() is None, reason="needs a C++ compiler")


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), G=st.integers(1, 5), vocab=st.integers(2, 300), levels=st.integers(1, 5),
       mask_at=st.sampled_from(["first", "last", "inside"]), shift=st.integers(0, 2), seed=st.integers(0, 2**16),
       mask_is_max=st.booleans())
def test_the_scan_is_the_reference(B, G, vocab, levels, mask_at, shift, seed, mask_is_max):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, levels, (B, G + shift, vocab), generator=g).float() / 3  # few levels: many ties
    mask_id = {"first": 0, "last": vocab - 1, "inside": vocab // 2}[mask_at]
    if mask_is_max:
        full[..., mask_id] = 10.0  # the mask token ranks first: left out all the same
    logits = full[:, shift:]  # a view with the rows' strides of `_predicting`
    scored = torch.rand(B, G, generator=g) < 0.5
    argmax, score = logits_scan.scan(logits, mask_id, scored)
    ref_argmax, ref_score = logits_scan.reference(logits, mask_id, scored)
    assert torch.equal(argmax, ref_argmax)
    assert torch.equal(score == 0, ~scored)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=0)


@pytest.mark.parametrize("special", [math.nan, math.inf])
def test_a_nan_or_an_infinite_maximum_goes_to_the_torch_ops(special):
    logits = torch.randn(2, 3, 40)
    logits[1, 2, 17] = special
    assert logits_scan.scan(logits, 5, torch.ones(2, 3, dtype=torch.bool)) is None
    logits[1, 2, 17] = -math.inf  # -inf below a finite maximum is fine
    assert logits_scan.scan(logits, 5, torch.ones(2, 3, dtype=torch.bool)) is not None


def test_other_dtypes_go_to_the_torch_ops():
    assert logits_scan.scan(torch.randn(1, 2, 8, dtype=torch.float64), 0, torch.ones(1, 2, dtype=torch.bool)) is None


def test_generate_decodes_alike_with_and_without_it(monkeypatch):
    model = llada_like(vocab_size=64, hidden_size=32, num_heads=2).eval()  # [MASK] is 63
    prompt = torch.randint(0, 63, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=8, steps=8, block_length=4, mask_id=63)
    calls = []
    scan = logits_scan.scan
    monkeypatch.setattr(logits_scan, "scan", lambda *a: calls.append(1) or scan(*a))
    fast = generate(model, prompt, **kw)
    assert len(calls) == fast.forward_calls
    monkeypatch.setattr(logits_scan, "scan", lambda *a: None)
    slow = generate(model, prompt, **kw)
    assert torch.equal(fast.tokens, slow.tokens)
    assert all(torch.equal(a.argmax, b.argmax) for a, b in zip(fast.records, slow.records))


def test_a_scan_of_some_rows_writes_those_rows_of_the_earlier_scan_alone():
    g = torch.Generator().manual_seed(0)
    logits, scored = torch.randn(2, 4, 50, generator=g), torch.rand(2, 4, generator=g) < 0.5
    earlier = (torch.full((2, 4), -1), torch.full((2, 4), -1.0))
    rows = torch.tensor([[True, False, False, True], [False, True, False, False]])
    argmax, score = logits_scan.scan(logits, 3, scored, rows=rows, out=earlier)
    assert argmax is earlier[0] and score is earlier[1]
    whole = logits_scan.scan(logits, 3, scored)
    assert torch.equal(argmax[rows], whole[0][rows]) and torch.equal(score[rows], whole[1][rows])
    assert (argmax[~rows] == -1).all() and (score[~rows] == -1).all()
    with pytest.raises(ValueError, match="out"):
        logits_scan.scan(logits, 3, scored, rows=rows)
    with pytest.raises(ValueError, match="out"):
        logits_scan.scan(logits, 3, scored, out=(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)))


def test_generate_reads_only_the_rows_a_dyllm_model_wrote_and_decodes_alike(monkeypatch):
    """Over a dyllm decode (sparse steps write a few rows of the logits cache), reading only the written rows (and
    the newly scored ones) gives the same confidences, records and tokens as reading every row."""
    loop = sys.modules["dyllm_fx.generate"]  # the module (`dyllm_fx.generate` is the function)
    model = llada_like(vocab_size=64, hidden_size=32, num_heads=2, seed=3).eval()
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.95, policy="full", lowering="eager",
                                                             dense_steps=1), dynamic=False)
    prompt = torch.randint(0, 63, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(gen_length=16, steps=8, block_length=4, mask_id=63)
    read, confidences = [], []
    select = loop._select
    monkeypatch.setattr(loop, "_select", lambda confidence, candidates, *a: confidences.append(
        torch.where(candidates, confidence, 0)) or select(confidence, candidates, *a))
    scan = logits_scan.scan
    monkeypatch.setattr(logits_scan, "scan", lambda logits, mask_id, scored=None, rows=None, out=None: read.append(
        logits.shape[0] * logits.shape[1] if rows is None else int(rows.sum())) or scan(logits, mask_id, scored,
                                                                                        rows, out))
    fast = generate(compiled, prompt, **kw)
    assert len(read) == fast.forward_calls and min(read) < max(read) == 2 * 16, read
    monkeypatch.setattr(loop, "rows_written", lambda logits: None)
    slow = generate(compiled, prompt, **kw)
    assert torch.equal(fast.tokens, slow.tokens)
    assert all(torch.equal(a.argmax, b.argmax) for a, b in zip(fast.records, slow.records))
    half = len(confidences) // 2
    assert all(torch.equal(a, b) for a, b in zip(confidences[:half], confidences[half:]))
