"""The decoding loop: schedules, remasking scores, parallel commits, padding, batching, shift, EOS."""
import copy
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from dyllm_fx.generate import REMASKING, _predicting, first_argmax, generate, teacher_forced_agreement, transfer_schedule
from dyllm_fx.models import dream_like, llada_like, tiny_dllm
from trajectories import left_padded

VOCAB = 41
MASK = VOCAB - 1


@functools.cache
def small(name, seed=0):
    factory = {"llada_like": llada_like, "dream_like": dream_like, "tiny_dllm": tiny_dllm}[name]
    return factory(vocab_size=VOCAB, seed=seed)


@functools.cache
def sharp(name):
    """small(name) with its LM head scaled up: peaked, input-dependent confidences."""
    model = copy.deepcopy(small(name))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


class FixedLogits(nn.Module):
    """Logits that ignore the input: row i of `table` [L, V] at position i, for every sequence."""

    def __init__(self, table, wrap=False):
        super().__init__()
        self.register_buffer("table", table.float())
        self.config = SimpleNamespace(mask_token_id=table.shape[1] - 1, vocab_size=table.shape[1])
        self.wrap = wrap
        self.calls = []

    def forward(self, x, **kwargs):
        self.calls.append(kwargs)
        logits = self.table[: x.shape[1]].expand(x.shape[0], -1, -1)
        return SimpleNamespace(logits=logits) if self.wrap else logits


def peaked(targets, confidences, vocab=8):
    """A [len, vocab] table whose row i puts probability confidences[i] on targets[i], the rest spread
    evenly over the other non-mask tokens (the last id is the mask and gets none)."""
    table = torch.full((len(targets), vocab), -math.inf)
    for i, (t, c) in enumerate(zip(targets, confidences)):
        probs = torch.full((vocab - 1,), (1 - c) / (vocab - 2))
        probs[t] = c
        table[i, :-1] = probs.log()
    return table


def probs_table(rows, vocab=8):
    table = torch.full((len(rows), vocab), -math.inf)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row).log()
    return table


def prompt(n, seed=0):
    return torch.randint(0, MASK, (1, n), generator=torch.Generator().manual_seed(seed))


def check_schedule(out, P, gen_length, block_length, steps):
    """Every step commits its scheduled count inside its block, and every mask ends filled."""
    steps_per_block = steps // (gen_length // block_length)
    schedule = transfer_schedule(block_length, steps_per_block)
    assert len(out.records) == out.forward_calls == steps
    for r in out.records:
        start = P + r.block * block_length
        outside = r.committed.clone()
        outside[:, start:start + block_length] = False
        assert not outside.any()
        assert r.num_committed == [schedule[r.step]] * r.inputs.shape[0]
        assert (r.inputs[r.committed] == MASK).all()
    assert [r.block for r in out.records] == [b for b in range(gen_length // block_length) for _ in range(steps_per_block)]
    assert not (out.generated == MASK).any()


@settings(max_examples=25, deadline=None)
@given(block_length=st.integers(1, 6), num_blocks=st.integers(1, 3), data=st.data())
def test_transfer_schedule_and_block_boundaries(block_length, num_blocks, data):
    steps_per_block = data.draw(st.integers(1, block_length))
    remasking = data.draw(st.sampled_from(REMASKING))
    gen_length, steps = block_length * num_blocks, steps_per_block * num_blocks
    schedule = transfer_schedule(block_length, steps_per_block)
    assert sum(schedule) == block_length and max(schedule) - min(schedule) <= 1 and schedule == sorted(schedule, reverse=True)
    ids = prompt(3).repeat(2, 1)
    out = generate(small("tiny_dllm"), ids, gen_length=gen_length, steps=steps, block_length=block_length,
                   remasking=remasking)
    check_schedule(out, 3, gen_length, block_length, steps)
    assert torch.equal(out.tokens[:, :3], ids)


@pytest.mark.parametrize("remasking", REMASKING)
def test_every_remasking_kind_with_several_tokens_per_step(remasking):
    torch.manual_seed(0)
    out = generate(small("llada_like"), prompt(5), gen_length=12, steps=4, block_length=6, remasking=remasking)
    check_schedule(out, 5, 12, 6, 4)
    assert out.records[0].num_committed == [3]


# Predicted distributions of one position each; in each pair the kinds disagree on which is surest.
ROWS = {"A": [0.6, 0.1, 0.1, 0.1, 0.1], "B": [0.55, 0.45], "C": [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
        "D": [0.4, 0.4, 0.2], "X": [0.5, 0.45, 0.05], "Y": [0.45, 0.11, 0.11, 0.11, 0.11, 0.11]}


@pytest.mark.parametrize("positions, remasking, first", [
    ("AB", "low_confidence", 0), ("AB", "entropy", 1), ("AB", "margin", 0),
    ("XY", "low_confidence", 0), ("XY", "entropy", 0), ("XY", "margin", 1),
    ("DC", "low_confidence", 1), ("DC", "entropy", 0), ("DC", "margin", 1),
])
def test_confidence_scores_pick_the_expected_position(positions, remasking, first):
    model = FixedLogits(probs_table([[1.0]] + [ROWS[p] for p in positions]))
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), gen_length=2, steps=2, block_length=2, remasking=remasking)
    assert out.records[0].committed[0, 1:].nonzero().item() == first


def test_random_remasking_and_temperature_follow_the_global_rng():
    model = FixedLogits(probs_table([[0.5, 0.5]] * 33))
    ids = torch.zeros(1, 1, dtype=torch.long)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(generate(model, ids, gen_length=32, steps=32, block_length=32, remasking="random", temperature=1.0))
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert not torch.equal(runs[0].tokens, runs[2].tokens)
    assert set(runs[0].generated.unique().tolist()) == {0, 1}
    commit_order = [r.committed[0].nonzero().item() for r in runs[0].records]
    assert commit_order != sorted(commit_order)


def test_small_temperature_is_greedy():
    model, ids = small("llada_like"), prompt(4)
    greedy = generate(model, ids, gen_length=8, steps=8, block_length=4)
    torch.manual_seed(0)
    cold = generate(model, ids, gen_length=8, steps=8, block_length=4, temperature=1e-9)
    assert torch.equal(greedy.tokens, cold.tokens)


@pytest.mark.parametrize("top_p, tokens", [(1e-9, {0}), (0.5, {0}), (0.8, {0, 1}), (1.0, {0, 1, 2})])
def test_top_p_samples_from_the_nucleus(top_p, tokens):
    model = FixedLogits(probs_table([[0.6, 0.3, 0.1]] * 33))
    ids = torch.zeros(1, 1, dtype=torch.long)
    torch.manual_seed(0)
    kw = dict(gen_length=32, steps=32, block_length=32, temperature=1.0, remasking="random")  # commit order blind
    out = generate(model, ids, top_p=top_p, **kw)
    assert set(out.generated.unique().tolist()) == tokens
    if top_p == 1.0:  # no filtering: the same draws as without top_p
        torch.manual_seed(0)
        plain = generate(model, ids, **kw)
        assert torch.equal(out.tokens, plain.tokens)


def test_top_p_leaves_greedy_decoding_alone():
    model, ids = small("llada_like"), prompt(4)
    kw = dict(gen_length=8, steps=8, block_length=4)
    assert torch.equal(generate(model, ids, **kw).tokens, generate(model, ids, top_p=0.1, **kw).tokens)


def test_confidence_threshold_commits_in_parallel():
    # Prompt column 0, then block 1 = gen positions 0-3, block 2 = gen positions 4-7.
    confidences = [0.9, 0.95, 0.5, 0.97, 0.3, 0.99, 0.99, 0.99, 0.99]
    model = FixedLogits(peaked([0, 1, 2, 3, 4, 5, 6, 1, 2], confidences))
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), gen_length=8, steps=8, block_length=4,
                   confidence_threshold=0.9)
    commits = [r.committed[0, 1:].nonzero().flatten().tolist() for r in out.records]
    assert commits == [[0, 2], [1], [3], [4, 5, 6, 7]]
    assert out.forward_calls == 4
    assert out.generated.tolist() == [[1, 2, 3, 4, 5, 6, 1, 2]]


def test_confidence_threshold_on_a_transformer_fills_every_mask_with_fewer_calls():
    model, ids = small("llada_like"), prompt(6).repeat(2, 1)
    out = generate(model, ids, gen_length=16, steps=16, block_length=8, confidence_threshold=1e-6)
    assert out.forward_calls == 2 and not (out.generated == MASK).any()
    out = generate(model, ids, gen_length=16, steps=16, block_length=8, confidence_threshold=1.0)
    assert out.forward_calls == 16 and all(r.num_committed == [1, 1] for r in out.records)


def test_shift_logits_reads_the_previous_position():
    targets = [3, 1, 4, 1, 5, 2, 6, 0]
    table = peaked(targets[1:] + [0], [0.9 - 0.05 * i for i in range(len(targets))])  # row i predicts i + 1
    model = FixedLogits(table)
    ids = torch.tensor([targets[:2]])
    shifted = generate(model, ids, gen_length=6, steps=6, block_length=3, shift_logits=True)
    assert shifted.generated.tolist() == [targets[2:]]
    assert shifted.records[0].argmax[0].tolist() == targets[2:]
    plain = generate(model, ids, gen_length=6, steps=6, block_length=3)
    assert plain.generated.tolist() != [targets[2:]]


@pytest.mark.parametrize("shift", [False, True])
def test_predicting_columns_are_views_where_consecutive(shift):
    logits = torch.randn(2, 7, 5)
    column = (torch.arange(7) - 1).clamp(min=0) if shift else torch.arange(7)  # position 0 predicted by its own
    for start in range(7):
        for end in range(start + 1, 8):
            got = _predicting(logits, start, end, shift)
            assert torch.equal(got, logits[:, column[start:end]])
            assert (got.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()) == (start >= 1 or not shift)


def test_logits_objects_and_plain_tensors_decode_alike():
    table = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(2, 4, dtype=torch.long)
    kw = dict(gen_length=8, steps=4, block_length=4)
    assert torch.equal(generate(FixedLogits(table), ids, **kw).tokens, generate(FixedLogits(table, wrap=True), ids, **kw).tokens)


@pytest.mark.parametrize("name, shift", [("llada_like", False), ("dream_like", True), ("tiny_dllm", False)])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_padded_batch_equals_single_runs(name, shift, threshold):
    model = sharp(name)
    prompts = [prompt(n, seed=n) for n in (5, 2, 8)]
    ids, mask = left_padded(prompts)
    kw = dict(gen_length=12, steps=6, block_length=4, shift_logits=shift, confidence_threshold=threshold)
    batch = generate(model, ids, attention_mask=mask, **kw)
    singles = [generate(model, p, **kw) for p in prompts]
    for i, single in enumerate(singles):
        assert torch.equal(batch.generated[i], single.generated[0])
    if threshold is not None:
        calls = [s.forward_calls for s in singles]
        assert len(set(calls)) > 1 and max(calls) <= batch.forward_calls  # paces differ; the fast ones wait
    assert len({tuple(s.generated[0].tolist()) for s in singles}) >= 2


def test_eos_finishes_a_sequence():
    # Gen positions, most confident first: 0, 1, 2 (EOS = 7 at 2), then the rest.
    targets = [0, 1, 2, 7, 3, 4, 5, 6, 1]
    confidences = [0.9, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    model = FixedLogits(peaked(targets, confidences, vocab=9))
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), gen_length=8, steps=8, block_length=4, eos_id=7)
    assert out.forward_calls == 3
    assert out.generated.tolist() == [[1, 2, 7, 7, 7, 7, 7, 7]]
    assert out.records[-1].num_committed == [6]
    # EOS committed first: the sequence goes on until the masks before it are filled.
    early = FixedLogits(peaked(targets, [0.9, 0.5, 0.4, 0.95, 0.3, 0.2, 0.2, 0.2, 0.2], vocab=9))
    out = generate(early, torch.zeros(1, 1, dtype=torch.long), gen_length=8, steps=8, block_length=4, eos_id=7)
    assert out.forward_calls == 3 and out.generated.tolist() == [[1, 2, 7, 7, 7, 7, 7, 7]]


def test_eos_in_a_batch_leaves_other_sequences_alone():
    model = small("llada_like")
    prompts = [prompt(n, seed=10 + n) for n in (4, 7)]
    kw = dict(gen_length=12, steps=12, block_length=4)
    eos_id = int(generate(model, prompts[0], **kw).generated[0, 1])
    singles = [generate(model, p, eos_id=eos_id, **kw) for p in prompts]
    ids, mask = left_padded(prompts)
    batch = generate(model, ids, attention_mask=mask, eos_id=eos_id, **kw)
    assert singles[0].forward_calls < 12
    assert (singles[0].generated[0, 1:] == eos_id).all()
    for i, single in enumerate(singles):
        assert torch.equal(batch.generated[i], single.generated[0])


def test_attention_inputs_are_built_once_in_the_model_dtype():
    model = FixedLogits(torch.randn(12, 8))
    model.scale = nn.Parameter(torch.ones((), dtype=torch.bfloat16))
    ids, mask = left_padded([prompt(2), prompt(4)])
    generate(model, ids % 7, attention_mask=mask, gen_length=8, steps=4, block_length=4)
    assert len(model.calls) == 4 and all(c["attention_mask"] is model.calls[0]["attention_mask"] for c in model.calls)
    mask4d, positions = model.calls[0]["attention_mask"], model.calls[0]["position_ids"]
    assert mask4d.shape == (2, 1, 12, 12) and mask4d.dtype == torch.bfloat16
    assert (mask4d[0, 0, :, :2] == torch.finfo(torch.bfloat16).min).all() and (mask4d[0, 0, :, 2:] == 0).all()
    assert (mask4d[1] == 0).all()
    assert positions.tolist() == [[0, 0] + list(range(10)), list(range(12))]
    model.calls.clear()
    generate(model, ids % 7, gen_length=8, steps=4, block_length=4)
    assert model.calls[0] == {}


def test_no_grad_and_mode_untouched():
    model = llada_like(vocab_size=VOCAB).train()
    out = generate(model, prompt(3), gen_length=4, steps=4, block_length=4, progress=True)
    assert model.training and not out.tokens.requires_grad
    assert out.num_generated_tokens == 4 and out.generated.shape == (1, 4)


def test_teacher_forced_agreement():
    model, other = small("dream_like"), small("dream_like", seed=1)
    ids, mask = left_padded([prompt(3), prompt(6, seed=1)])
    kw = dict(gen_length=8, steps=8, block_length=4, shift_logits=True, attention_mask=mask)
    out = generate(model, ids, **kw)
    assert teacher_forced_agreement(model, out, mask_id=MASK, shift_logits=True, attention_mask=mask) == 1.0
    agreement = teacher_forced_agreement(other, out, mask_id=MASK, shift_logits=True, attention_mask=mask)
    assert 0.0 <= agreement < 1.0


KW = dict(gen_length=8, steps=8, block_length=4)


@pytest.mark.parametrize("override, match", [
    (dict(gen_length=10), "multiple of block_length"),
    (dict(steps=3), "multiple of the number of blocks"),
    (dict(steps=1), "multiple of the number of blocks"),
    (dict(steps=16), "exceeds gen_length"),
    (dict(remasking="topk"), "low_confidence, random, entropy, margin"),
    (dict(confidence_threshold=0.0), r"\(0, 1\]"),
    (dict(confidence_threshold=1.5), r"\(0, 1\]"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), r"top_p \(0.0\) must be in \(0, 1\]"),
    (dict(top_p=1.5), "Dream uses 0.95"),
    (dict(mask_id=VOCAB), "outside the vocabulary"),
    (dict(attention_mask=torch.ones(1, 2, dtype=torch.long)), "attention_mask has shape"),
    (dict(eos_id=MASK), "eos_id equals mask_id"),
])
def test_bad_arguments_raise(override, match):
    with pytest.raises(ValueError, match=match):
        generate(small("llada_like"), prompt(3), **{**KW, **override})


def test_mask_id_resolution():
    plain = lambda x: torch.zeros(*x.shape, 8)  # noqa: E731
    with pytest.raises(ValueError, match="pass mask_id="):
        generate(plain, torch.zeros(1, 2, dtype=torch.long), **KW)
    with pytest.raises(ValueError, match="logits' last dimension"):
        generate(plain, torch.zeros(1, 2, dtype=torch.long), mask_id=8, **KW)
    out = generate(plain, torch.zeros(1, 2, dtype=torch.long), mask_id=7, **KW)
    assert (out.generated == 0).all()
    assert generate(small("llada_like"), prompt(2), **KW).records[0].inputs[0, 2:].eq(MASK).all()


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(1, 1400), rows=st.integers(0, 4), levels=st.integers(1, 6), specials=st.lists(
    st.tuples(st.integers(0, 10_000), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3),
    seed=st.integers(0, 2**16), chunk=st.sampled_from([1, 7, 64, 512]))
def test_first_argmax_equals_argmax_ties_and_nan_included(vocab, rows, levels, specials, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, 3, vocab), generator=g).float()  # few levels: many ties
    for position, value in specials:
        if x.numel():
            x.view(-1)[position % x.numel()] = value
    assert torch.equal(first_argmax(x, chunk), x.argmax(-1))


@pytest.mark.parametrize("vocab", [1000, 1024, 49152 + 5])
def test_first_argmax_finds_a_maximum_in_the_last_column(vocab):
    x = torch.zeros(2, vocab)
    x[0, -1], x[1, -2] = 1.0, 1.0
    assert first_argmax(x).tolist() == [vocab - 1, vocab - 2]
