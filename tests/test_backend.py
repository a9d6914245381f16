"""The dyllm backend: exact at tau=1.0 over denoising trajectories, sparse below, state rules, options."""
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import dyllm_fx
from dyllm_fx.models import dream_like, llada_like, tiny_dllm
from trajectories import left_padded, left_to_right, logits_of, rows_seen_by_gated_linears, run_both, trajectory
from dyllm_fx.passes.saliency_rewrite import DELTA_OP, EVERY_ROW_EXACT, INCREMENTAL_CPP
from dyllm_fx.report import where

FAST = dict(lowering="eager", dense_steps=1)


def build(kind, layers, heads, gqa, head_dim, seed):
    if kind == "llada":
        return llada_like(hidden_size=heads * head_dim, num_layers=layers, num_heads=heads, head_dim=head_dim,
                          vocab_size=97, seed=seed)
    if kind == "dream":
        return dream_like(hidden_size=heads * gqa * head_dim, num_layers=layers, num_kv_heads=heads,
                          gqa_ratio=gqa, head_dim=head_dim, vocab_size=97, seed=seed)
    return tiny_dllm(vocab_size=97, dim=heads * head_dim, n_layers=layers, n_heads=heads)


@settings(max_examples=14, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_tau_one_reproduces_eager_over_trajectories(data):
    draw = data.draw
    torch._dynamo.reset()
    kind = draw(st.sampled_from(["llada", "dream", "tiny"]))
    model = build(kind, draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                  draw(st.sampled_from([4, 6, 8])), draw(st.integers(0, 9)))
    options = dict(FAST, tau=1.0, policy=draw(st.sampled_from(["paper", "full"])),
                   exact_attention_below=draw(st.sampled_from([0, 256])), compact_rows=draw(st.booleans()))
    compiled = torch.compile(model, backend=dyllm_fx.backend(**options), dynamic=False)
    steps = trajectory(draw, draw(st.integers(1, 3)), draw(st.integers(6, 14)), model.config.mask_token_id)
    run_both(model, compiled, steps)
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps >= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind,policy,exact_below,compact,kv_heads", [
    ("llada", "full", 0, True, 2), ("tiny", "paper", 0, True, 2), ("dream", "paper", 256, True, 2),
    ("dream", "full", 0, False, 2), ("dream", "full", 0, True, 1)])
def test_tau_one_reproduces_eager_under_inductor(kind, policy, exact_below, compact, kv_heads):
    """exact_below=0 on the compact path: the incremental attention step compiled by Inductor (one KV head: a
    size-1 axis beside the data-dependent ones)."""
    torch._dynamo.reset()
    model = build(kind, 2, kv_heads, 2, 8, 0)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, policy=policy, dense_steps=1, compact_rows=compact,
                                                             exact_attention_below=exact_below), dynamic=False)
    steps = left_to_right(model.config.mask_token_id)
    run_both(model, compiled, steps)


@pytest.mark.slow
def test_compiling_the_same_graph_again_reuses_aotautograd_cache():
    from torch._dynamo.utils import counters

    model = build("llada", 1, 2, 1, 8, 0)
    steps = left_to_right(model.config.mask_token_id)
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, dense_steps=1), dynamic=False)
        with torch.no_grad():
            for ids in steps:
                compiled(ids)
    # every compile of the second run (one per distinct layer segment) comes from the cache
    aot = dict(counters["aot_autograd"])
    assert aot["autograd_cache_hit"] == aot["total"] >= 1, aot
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps >= 1


def _decode_steps(model, compiled, length=24, batch=2, n=10):
    mask_id = model.config.mask_token_id
    torch.manual_seed(0)
    ids = torch.full((batch, length), mask_id)
    ids[:, :6] = torch.randint(0, mask_id - 1, (batch, 6))
    with torch.no_grad():
        for pos in range(6, 6 + n):
            compiled(ids)
            ids = ids.clone()
            ids[:, pos] = torch.randint(0, mask_id - 1, (batch,))


@pytest.mark.parametrize("policy", ["paper", "full"])
def test_below_one_the_graph_is_sparse(policy):
    torch._dynamo.reset()
    model = llada_like(num_layers=2, hidden_size=32, num_heads=4, vocab_size=97)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy=policy, lowering="eager"), dynamic=False)
    with rows_seen_by_gated_linears() as seen:
        _decode_steps(model, compiled)
    (g,) = dyllm_fx.stats(model)
    assert g.dense_steps == 4 and g.sparse_steps == 6
    assert (g.salient[~g.dense_mask] < 1).all()
    assert g.mean_salient_fraction < 1
    assert any(n < total for n, total in seen), f"sparse_rows_linear never ran on fewer rows than the sequence {seen}"
    assert g.ideal_speedup > 1


def test_ideal_speedup_counts_what_the_policy_needs_whichever_attention_form_runs():
    """Recomputing every row (one SDPA) or updating incrementally: same salient rows, same ideal."""
    model = llada_like(num_layers=2, hidden_size=32, num_heads=4, vocab_size=97)
    ideals = []
    for exact_below in (0, 1024):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager", dense_steps=1,
                                                                 exact_attention_below=exact_below), dynamic=False)
        _decode_steps(model, compiled)
        (g,) = dyllm_fx.stats(model)
        ideals.append((g.salient.tolist(), g.ideal_speedup))
        dyllm_fx.reset(model)
    (salient_a, ideal_a), (salient_b, ideal_b) = ideals
    assert salient_a == salient_b and min(min(s) for s in salient_a) < 0.5 and ideal_a > 1
    assert ideal_a == pytest.approx(ideal_b, rel=0.02)


def test_no_recompilation_across_generate():
    from dyllm_fx.generate import generate

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager"), dynamic=False)
    prompt = torch.randint(0, 90, (2, 5))
    generate(compiled, prompt, gen_length=8, steps=8, block_length=4, mask_id=model.config.mask_token_id)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1
    (g,) = dyllm_fx.stats(model)
    assert g.dense_steps + g.sparse_steps == 8


def test_every_decode_is_a_new_sequence_without_mask_id():
    """Without `mask_id` the backend cannot see that a same-shaped input is a new sequence; `generate` and
    `teacher_forced_agreement` say so (reset): each starts dense, and a repeated decode is the same decode."""
    from dyllm_fx.generate import generate, teacher_forced_agreement

    torch._dynamo.reset()
    model = dream_like(num_layers=2, hidden_size=32, num_kv_heads=2, gqa_ratio=1, head_dim=16, vocab_size=97)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager", dense_steps=2),
                             dynamic=False)
    prompt = torch.randint(0, 90, (2, 5))
    kwargs = dict(gen_length=8, steps=8, block_length=4, mask_id=model.config.mask_token_id, shift_logits=True)
    first = generate(compiled, prompt, **kwargs)
    second = generate(compiled, prompt, **kwargs)
    teacher_forced_agreement(compiled, first, mask_id=kwargs["mask_id"], shift_logits=True)
    assert torch.equal(first.tokens, second.tokens)
    (g,) = dyllm_fx.stats(model)
    assert g.dense_mask.tolist() == 3 * ([True] * 2 + [False] * 6)


def test_generate_over_prompt_lengths_rewrites_each_without_dynamic_false():
    """`torch.compile(model, backend="dyllm")` as the README's one-liner (no `dynamic=False`): Dynamo would make
    the second length's graph dynamic, which the backend runs unchanged; `generate` keeps every length static,
    and a length seen before reuses its graph."""
    from dyllm_fx.generate import generate

    torch._dynamo.reset()
    model = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97)
    compiled = torch.compile(model, backend="dyllm", options={"tau": 0.99, "lowering": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        for P in (5, 7, 9, 5):
            generate(compiled, torch.randint(0, 90, (2, P)), gen_length=4, steps=4, block_length=4,
                     mask_id=model.config.mask_token_id, attention_mask=torch.ones(2, P, dtype=torch.long))
    graphs = dyllm_fx.stats(model)
    assert sorted((g.seq_len, g.dense_steps) for g in graphs) == [(9, 8), (11, 4), (13, 4)]


def test_new_sequence_rules():
    torch._dynamo.reset()
    model = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97)
    mask_id = model.config.mask_token_id
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager", dense_steps=1, mask_id=mask_id),
                             dynamic=False)
    ids = torch.full((1, 8), mask_id)
    ids[0, :3] = torch.tensor([1, 2, 3])
    with torch.no_grad():
        compiled(ids)
        ids[0, 3] = 5  # a mask row committed: same sequence
        compiled(ids)
        ids[0, 0] = 7  # a prompt row changed: new sequence
        compiled(ids)
        ids[0, 4] = 6
        compiled(ids)
        dyllm_fx.reset(compiled)
        compiled(ids)
    (g,) = dyllm_fx.stats(model)
    assert g.dense_mask.tolist() == [True, False, True, False, True]


def test_other_input_change_starts_new_sequence():
    torch._dynamo.reset()
    model = tiny_dllm(vocab_size=50, dim=16, n_layers=1, n_heads=2)
    compiled = torch.compile(model, backend=dyllm_fx.backend(lowering="eager", dense_steps=1), dynamic=False)
    ids = torch.randint(0, 40, (1, 6))
    mask = torch.zeros(1, 1, 6, 6)
    with torch.no_grad():
        compiled(ids, attention_mask=mask)
        compiled(ids, attention_mask=mask)
        mask2 = mask.clone()
        mask2[..., 0] = torch.finfo(torch.float32).min
        compiled(ids, attention_mask=mask2)
    (g,) = dyllm_fx.stats(model)
    assert g.dense_mask.tolist() == [True, False, True]


def test_two_compiled_models_do_not_share_state():
    torch._dynamo.reset()
    a = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97, seed=0)
    b = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97, seed=1)
    ca = torch.compile(a, backend=dyllm_fx.backend(lowering="eager", tau=1.0, dense_steps=1), dynamic=False)
    cb = torch.compile(b, backend=dyllm_fx.backend(lowering="eager", tau=1.0, dense_steps=1), dynamic=False)
    ids = torch.randint(0, 90, (1, 8))
    run_both(a, ca, [ids])
    run_both(b, cb, [ids, ids])
    run_both(a, ca, [ids])
    assert len(dyllm_fx.stats(a)[0].dense_mask) == 2 and len(dyllm_fx.stats(b)[0].dense_mask) == 2


@pytest.mark.parametrize("kind,heads,lowering", [("llada", 4, "eager"), ("dream", 2, "eager"), ("tiny", 2, "eager"),
                                                 pytest.param("dream", 2, "inductor", marks=pytest.mark.slow)])
def test_a_padded_batch_decodes_each_sequence_as_alone_below_tau_one(kind, heads, lowering):
    """Saliency, caches and row selection are per row: below tau=1, where some rows of every layer are skipped, a
    left-padded batch of prompts of different lengths decodes each one exactly as it decodes alone."""
    torch._dynamo.reset()
    model = build(kind, 2, heads, 2, 16, 0)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 90, (1, n), generator=generator) for n in (5, 2, 8)]
    ids, mask = left_padded(prompts)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.995, dense_steps=1, lowering=lowering))
    kw = dict(gen_length=16, steps=16, block_length=8, mask_id=model.config.mask_token_id,
              shift_logits=model.config.shift_logits)
    batch = dyllm_fx.generate(compiled, ids, attention_mask=mask, **kw)
    (g,) = [g for g in dyllm_fx.stats(model) if g.batch == 3]
    assert 0.2 < g.mean_salient_fraction < 0.95  # sparse, and more than the committed rows
    for i, p in enumerate(prompts):
        assert torch.equal(dyllm_fx.generate(compiled, p, **kw).generated[0], batch.generated[i])


def _two_calls(lowering):
    """Outputs of two calls of a compiled model whose logits are a cache (gated LM head), the second call's input
    one token further; the first output as it was right after its call."""
    torch._dynamo.reset()
    model = tiny_dllm(vocab_size=97, dim=16, n_layers=2, n_heads=2)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, policy="full", lowering=lowering,
                                                             dense_steps=1), dynamic=False)
    ids = torch.full((1, 12), model.config.mask_token_id)
    ids[0, :4] = torch.arange(4)
    with torch.no_grad():
        first = logits_of(compiled(ids))
        as_returned = first.clone()
        ids = ids.clone()
        ids[0, 5] = 7
        second = logits_of(compiled(ids))
    return first, as_returned, second


@pytest.mark.parametrize("lowering", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_outputs_stay_valid_after_the_next_call(lowering):
    first, as_returned, second = _two_calls(lowering)
    assert torch.equal(first, as_returned)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_borrowed_outputs_are_the_cache_without_a_copy():
    with dyllm_fx.borrowed_outputs():
        first, as_returned, second = _two_calls("eager")
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert torch.equal(first, second) and not torch.equal(first, as_returned)


@pytest.mark.parametrize("kind,lowering", [("llada", "eager"), ("dream", "eager"), ("tiny", "eager"),
                                           pytest.param("dream", "inductor", marks=pytest.mark.slow)])
def test_rows_written_names_every_row_a_call_changed(kind, lowering):
    """A borrowed logits cache says which rows its call wrote: every other row holds the previous call's bits. The
    first call writes every row, sparse steps fewer; "paper" (its LM head reads every row) and copies say nothing."""
    model = build(kind, 2, 2, 2, 8, seed=1)
    mask_id = 96
    for policy in ("full", "paper"):
        compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.98, policy=policy, lowering=lowering,
                                                                 dense_steps=1), dynamic=False)
        counts, beyond, previous, previous_ids = [], 0, None, None
        with torch.no_grad(), dyllm_fx.borrowed_outputs():
            for ids in left_to_right(mask_id):
                logits = logits_of(compiled(ids))
                written = dyllm_fx.rows_written(logits)
                if policy == "paper":
                    assert written is None
                    continue
                assert written.shape == ids.shape and written.dtype == torch.bool
                if previous is not None:
                    assert torch.equal(logits[~written], previous[~written])
                    beyond += int((written & (ids == previous_ids)).sum())  # rows whose token did not change
                counts.append(int(written.sum()))
                previous, previous_ids = logits.clone(), ids
        if policy == "full":
            assert counts[0] == ids.numel() and min(counts[1:]) < ids.numel() and beyond > 0, (counts, beyond)
        with torch.no_grad():
            assert dyllm_fx.rows_written(logits_of(compiled(ids))) is None  # not borrowed: a copy


@pytest.mark.parametrize("options,match", [
    ({"tua": 0.9}, "unknown dyllm option"),
    ({"tau": 0.0}, "tau"),
    ({"tau": 1.5}, "tau"),
    ({"policy": "fast"}, "policy"),
    ({"lowering": "cuda"}, "lowering"),
    ({"dense_steps": 0}, "dense_steps"),
    ({"mask_id": -1}, "mask_id"),
    ({"compact_rows": 1}, "compact_rows"),
])
def test_option_validation(options, match):
    with pytest.raises(ValueError, match=match):
        dyllm_fx.backend(**options)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match="tau.*dense_steps.*policy.*lowering.*mask_id.*prompt_period"):
        dyllm_fx.Options.from_dict({"taux": 1})


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.fc = torch.nn.Linear(8, 20)

    def forward(self, ids):
        return self.fc(torch.relu(self.emb(ids)))


def run_twice_compiled(model):
    """(the dyllm warnings of two compiled calls, the first call's output, the model's own output)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=dyllm_fx.backend(lowering="eager"), dynamic=False)
    ids = torch.randint(0, 20, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = compiled(ids)
            compiled(ids)
            ref = model(ids)
    return [w for w in caught if "dyllm" in str(w.message)], out, ref


def test_model_without_attention_runs_unchanged_with_one_warning():
    dyllm_warnings, out, ref = run_twice_compiled(NoAttention().eval())
    assert len(dyllm_warnings) == 1 and "no attention" in str(dyllm_warnings[0].message)
    assert torch.allclose(out, ref)


def test_entry_point_registers_backend():
    assert "dyllm" in torch._dynamo.list_backends()
    torch._dynamo.reset()
    model = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97)
    compiled = torch.compile(model, backend="dyllm", options={"tau": 1.0, "lowering": "eager"}, dynamic=False)
    ids = torch.randint(0, 90, (1, 6))
    run_both(model, compiled, [ids])
    assert len(dyllm_fx.stats(model)) == 1


def test_grad_mode_runs_original_graph():
    torch._dynamo.reset()
    model = llada_like(num_layers=1, hidden_size=32, num_heads=2, vocab_size=97)
    compiled = torch.compile(model, backend=dyllm_fx.backend(lowering="eager"), dynamic=False)
    ids = torch.randint(0, 90, (1, 6))
    with pytest.warns(UserWarning, match="gradients are enabled"):
        out = logits_of(compiled(ids))
    out.sum().backward()
    assert model.lm_head.weight.grad is not None


class WithGraphBreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        return h.squeeze(1) @ self.emb.weight.T


def test_graph_break_runs_unchanged_with_one_warning():
    torch._dynamo.reset()
    model = WithGraphBreak().eval()
    compiled = torch.compile(model, backend=dyllm_fx.backend(lowering="eager"), dynamic=False)
    ids = torch.randint(0, 20, (2, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = compiled(ids)
    dyllm_warnings = [w for w in caught if "dyllm" in str(w.message)]
    assert len(dyllm_warnings) == 1 and "graph break" in str(dyllm_warnings[0].message)
    assert torch.allclose(out, model(ids), atol=1e-6)


def test_model_with_kv_cache_enabled_is_still_rewritten():
    """transformers' default `use_cache=True` concatenates K/V onto an empty cache and returns them: still sparse."""
    torch._dynamo.reset()
    model = llada_like(num_layers=2, hidden_size=32, num_heads=2, vocab_size=97)
    model.config.use_cache = True
    compiled = torch.compile(model, backend=dyllm_fx.backend(**FAST, tau=1.0), dynamic=False)
    ids = torch.full((2, 10), model.config.mask_token_id)
    ids[:, :4] = torch.randint(0, 90, (2, 4))
    steps = [ids.clone()]
    for pos in range(4, 7):
        ids[:, pos] = pos
        steps.append(ids.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        run_both(model, compiled, steps)
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps == 3


def test_explain_reports_rewrite_and_fallback_and_leaves_compiled_models_alone():
    torch._dynamo.reset()
    model = llada_like(num_layers=2, hidden_size=32, num_heads=2, vocab_size=97)
    compiled = torch.compile(model, backend=dyllm_fx.backend(lowering="eager", dense_steps=1), dynamic=False)
    ids = torch.randint(0, 90, (1, 6))
    with torch.no_grad():
        compiled(ids)
    (report,) = dyllm_fx.explain(compiled, ids)
    assert report.fallback is None and [s.supported for s in report.sites] == [True, True]
    text = str(report)
    assert text.count("delta attention") == 2 and "saliency of attention 0" in text and "KiB per token" in text
    assert report.attention == {0: INCREMENTAL_CPP, 1: INCREMENTAL_CPP}
    (exact,) = dyllm_fx.explain(model, ids, options=dict(exact_attention_below=256))
    assert set(exact.attention.values()) == {EVERY_ROW_EXACT}
    (masked,) = dyllm_fx.explain(model, ids, options=dict(compact_rows=False))
    assert set(masked.attention.values()) == {DELTA_OP}
    with torch.no_grad():
        compiled(ids)
    (g,) = dyllm_fx.stats(model)  # the explained graph is not the model's: one graph, both calls recorded
    assert g.dense_mask.tolist() == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (dense,) = dyllm_fx.explain(NoAttention().eval(), torch.randint(0, 20, (2, 5)))
    assert "no attention" in dense.fallback and "runs unchanged" in str(dense)


def test_explain_reports_after_dynamo_reached_its_recompile_limit_and_says_when_nothing_was_compiled():
    torch._dynamo.reset()
    model = llada_like(num_layers=1, hidden_size=16, num_heads=2, vocab_size=37)
    ids = torch.randint(0, 30, (1, 5))
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for _ in range(3):  # another backend each time: the third compile is past the limit, it runs uncompiled
            torch.compile(model, backend=lambda gm, _: gm.forward, dynamic=False)(ids)
        (report,) = dyllm_fx.explain(model, ids)
        for _ in range(3):  # explain after explain: each traces afresh
            assert len(dyllm_fx.explain(model, ids)) == 1
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    assert not _debug_get_cache_entry_list(sys.modules["dyllm_fx.explain"]._call.__code__)  # Dynamo kept none
    assert report.fallback is None and report.sites
    with pytest.raises(RuntimeError, match="compiled no graph"):
        dyllm_fx.explain(NotForDynamo(), ids)


class NotForDynamo(torch.nn.Module):
    @torch.compiler.disable
    def forward(self, ids):
        return ids.float()


def test_explain_names_a_graph_break():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = dyllm_fx.explain(WithGraphBreak().eval(), torch.randint(0, 20, (2, 5)))
    assert len(explanation) == 2 and explanation.graph_breaks and "graph breaks" in str(explanation)


class TokenMixing(torch.nn.Module):
    """Attention, then an MLP-Mixer style linear over the token axis: it mixes rows, so it must stay dense."""

    def __init__(self, length=6, dim=8, vocab=20):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.mix = torch.nn.Linear(length, length)
        self.mlp = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1)
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x + self.mlp(x))


def test_explain_names_what_stays_dense_and_why():
    torch._dynamo.reset()
    model = TokenMixing().eval()
    ids = torch.randint(0, 20, (2, 6))
    (report,) = dyllm_fx.explain(model, ids, options={"policy": "full"})
    assert report.fallback is None and [s.supported for s in report.sites] == [True]
    dense = dict(report.dense)  # everything after the token mix: its rows all moved, no saliency gates them
    assert {"mix", "mlp", "head"} <= set(dense) and "token axis" in dense["mix"], report.dense
    assert {where(l.node) for l in report.gated} == {"qkv"}
    assert "| mix " in str(report) and "KiB per token" in str(report)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, policy="full", lowering="eager", dense_steps=1),
                             dynamic=False)
    steps = [ids, torch.where(torch.arange(6) == 3, 7, ids), torch.where(torch.arange(6) == 1, 5, ids)]
    run_both(model, compiled, steps)


class CausalOnly(torch.nn.Module):
    def __init__(self, dim=8, vocab=20):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1))


def test_causal_only_model_runs_unchanged_with_one_warning_naming_the_fix():
    (w,), out, ref = run_twice_compiled(CausalOnly().eval())
    assert "causal" in str(w.message) and "is_causal" in str(w.message)
    assert torch.equal(out, ref)


class CausalThenBidirectional(torch.nn.Module):
    """A causal attention (left dense) before a bidirectional one (rewritten)."""

    def __init__(self, dim=8, vocab=20):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.mlp = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for i, qkv in enumerate(self.qkv):
            q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
            x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=i == 0).squeeze(1)
            x = x + self.mlp(x)
        return self.head(x)


def test_a_dense_attention_before_a_rewritten_one():
    torch._dynamo.reset()
    model = CausalThenBidirectional().eval()
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, lowering="eager", dense_steps=1), dynamic=False)
    ids = torch.randint(0, 19, (2, 6))
    steps = [ids, torch.where(torch.arange(6) == 3, 19, ids), torch.where(torch.arange(6) == 1, 5, ids)]
    run_both(model, compiled, steps)
    (report,) = dyllm_fx.explain(model, ids)
    assert [s.supported for s in report.sites] == [False, True]
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps == 2 and (g.salient[:, 0] == 1).all()  # the dense attention counts every row


def test_token_ids_are_found_when_the_model_reads_position_ids_first():
    """TinyDLLM reads `position_ids` before `input_ids`, so Dynamo lists it first: both are integer [B, L]."""
    from dyllm_fx.generate import generate

    torch._dynamo.reset()
    model = tiny_dllm(vocab_size=97, dim=32, n_layers=1, n_heads=2)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager"), dynamic=False)
    prompt, real = torch.randint(0, 90, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    real[0, :2] = 0
    generate(compiled, prompt, gen_length=8, steps=8, block_length=8, mask_id=96, attention_mask=real)
    (g,) = dyllm_fx.stats(model)
    assert (g.dense_steps, g.sparse_steps) == (4, 4)  # not a new sequence at every step


class BiasInsideScale(torch.nn.Module):
    """softmax((q k^T + bias) / sqrt(d)): a real-valued additive bias inside the scaling (ALiBi-like)."""

    def __init__(self, d=8, vocab=20, length=8, softcap=None):
        super().__init__()
        self.emb, self.qkv, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, vocab)
        self.register_buffer("bias", torch.randn(length, length, generator=torch.Generator().manual_seed(0)) * 3)
        self.softcap = softcap

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        s = q @ k.transpose(-2, -1) + self.bias
        s = s / q.shape[-1] ** 0.5 if self.softcap is None else self.softcap * torch.tanh(s / self.softcap)
        return self.head((torch.softmax(s, dim=-1) @ v).squeeze(1))


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_mask_inside_the_scaling_is_scaled_and_inside_a_softcap_stays_dense(softcap):
    torch._dynamo.reset()
    model = BiasInsideScale(softcap=softcap).eval()
    ids = torch.randint(0, 19, (2, 8))
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, lowering="eager", dense_steps=1), dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the soft-capped case runs unchanged, with a warning
        run_both(model, compiled, [ids, torch.where(torch.arange(8) == 5, 3, ids)])
        (report,) = dyllm_fx.explain(model, ids)
    assert report.sites[0].supported == (softcap is None), report.sites[0].reason
