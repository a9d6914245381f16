"""The decoding loop's C++ read of the logits (`kernels/logits_scan.py`) against its torch reference, and its use
in `generate`."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

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
