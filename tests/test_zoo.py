"""Real transformers architectures (`dyllm_fx.zoo`, tiny random configs) under the dyllm backend: bidirectional,
exact at tau=1.0 over a denoising trajectory with both policies, rewritten (no fallback, every attention
replaced by delta attention, every K/V and MLP linear gated),
and sparse below tau=1. A model the rewrite cannot handle fails here; it is not skipped."""
import copy
import functools
import warnings

import pytest
import torch

import dyllm_fx
from dyllm_fx import zoo
from dyllm_fx.models import MODELS
from trajectories import rows_seen_by_gated_linears

NAMES = list(zoo.ZOO)
WITH_REAL = NAMES + [pytest.param("smollm2_dream", marks=pytest.mark.slow)]
# (policy, exact_attention_below): the backend's default (exact attention, one SDPA call, at these lengths on CPU)
# under both policies, and the incremental softmax update (tiny models only: it is not bitwise SDPA's math, and
# 30 real-weight layers amplify the last-ulp differences beyond 1e-4)
EXACT_CASES = [(name, policy, None) for name in NAMES for policy in ("paper", "full")] + [
    (name, "full", 0) for name in NAMES] + [
    pytest.param("smollm2_dream", policy, None, marks=pytest.mark.slow) for policy in ("paper", "full")]
BATCH, LENGTH, PROMPT = 2, 24, 8


@functools.cache
def _base(name):
    return MODELS[name]()


@functools.cache
def _prompt_cache(name):
    """DiffusionGemma's encoder KV cache of a fixed prompt (the decoder's read-only memory)."""
    model = _base(name)
    prompt = torch.randint(3, model.config.mask_token_id - 4, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.model.encoder(input_ids=prompt).cache


def fresh(name):
    """A private copy of the factory's model: compiled state never leaks between tests."""
    return copy.deepcopy(_base(name))


def inputs(name, ids) -> dict:
    """The keyword arguments of one denoising step. Causal-LM / masked-LM zoo models take the whole sequence;
    DiffusionGemma takes the canvas (`decoder_input_ids`) and the prompt's encoder KV cache, as its `generate`."""
    if name == "diffusion_gemma":
        return {"decoder_input_ids": ids, "cache": _prompt_cache(name)}
    return {"input_ids": ids}


def logits(model, name, ids):
    out = model(**inputs(name, ids))
    return out.logits if hasattr(out, "logits") else out


def start(name, mask_id, generator):
    """The first step's tokens: prompt + masks, or (DiffusionGemma: the prompt lives in the cache) an all-mask canvas."""
    ids = torch.full((BATCH, LENGTH), mask_id)
    if name != "diffusion_gemma":
        ids[:, :PROMPT] = torch.randint(0, mask_id - 4, (BATCH, PROMPT), generator=generator)
    return ids


def trajectory(name, mask_id, steps, per_step=(1, 2), seed=0):
    """A denoising trajectory: `steps + 1` inputs, each committing `per_step[i % len]` masked positions per row."""
    generator = torch.Generator().manual_seed(seed)
    ids = start(name, mask_id, generator)
    out = [ids.clone()]
    for i in range(steps):
        for b in range(BATCH):
            masked = (ids[b] == mask_id).nonzero().squeeze(1)
            pick = masked[torch.randperm(len(masked), generator=generator)[: per_step[i % len(per_step)]]]
            ids[b, pick] = torch.randint(0, mask_id - 4, (len(pick),), generator=generator)
        out.append(ids.clone())
    return out


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_is_bidirectional_and_configured(name):
    model = _base(name)
    config = model.config
    assert isinstance(config.mask_token_id, int) and 0 <= config.mask_token_id < config.get_text_config().vocab_size
    assert isinstance(config.shift_logits, bool) and not model.training
    ids = start(name, config.mask_token_id, torch.Generator().manual_seed(0))
    ids[:, -1] = 5
    changed = ids.clone()
    changed[:, -1] = 6
    with torch.no_grad():
        moved = (logits(model, name, ids)[:, 0] - logits(model, name, changed)[:, 0]).abs().max().item()
    assert moved > 1e-5, f"{name}: position 0 ignores the last token: the model is causal"


def test_zoo_factories_take_seed_and_dtype():
    for factory in zoo.ZOO.values():
        a, b = factory(seed=3), factory(seed=4)
        assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in zoo.llama(dtype=torch.bfloat16).parameters())


@pytest.mark.parametrize("name,policy,exact_below", EXACT_CASES)
def test_tau_one_reproduces_eager_and_rewrites(name, policy, exact_below):
    torch._dynamo.reset()
    model = fresh(name)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=1.0, lowering="eager", dense_steps=1, policy=policy,
                                                             exact_attention_below=exact_below), dynamic=False)
    steps = trajectory(name, model.config.mask_token_id, steps=6)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for i, ids in enumerate(steps):
            ref, out = logits(model, name, ids), logits(compiled, name, ids)
            diff = (ref - out).abs().max().item()
            assert diff <= 1e-4, f"{name} {policy}: step {i}: logits differ by {diff:.3g}"
            assert torch.equal(ref.argmax(-1), out.argmax(-1)), f"{name} {policy}: step {i}: argmax differs"
    fallbacks = [str(w.message) for w in caught if "dyllm" in str(w.message)]
    assert not fallbacks, f"{name}: {fallbacks}"
    (g,) = dyllm_fx.stats(model)
    assert g.sparse_steps == len(steps) - 1
    if policy == "paper":  # once per model
        (report,) = dyllm_fx.explain(model, **inputs(name, steps[0]))
        assert report.fallback is None, f"{name}: {report.fallback}"
        assert report.sites and all(s.supported for s in report.sites), f"{name}: an attention stays dense\n{report}"
        assert all(l.region is not None for l in report.linears if l.cls in ("kv", "mlp")), f"{name}:\n{report}"


@pytest.mark.parametrize("name", WITH_REAL)
def test_below_one_the_graph_is_sparse(name):
    torch._dynamo.reset()
    model = fresh(name)
    compiled = torch.compile(model, backend=dyllm_fx.backend(tau=0.99, lowering="eager", dense_steps=2, policy="paper"),
                             dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), rows_seen_by_gated_linears() as rows_seen:
        warnings.simplefilter("always")
        for ids in trajectory(name, model.config.mask_token_id, steps=7, per_step=(1,)):
            logits(compiled, name, ids)
    fallbacks = [str(w.message) for w in caught if "dyllm" in str(w.message)]
    assert not fallbacks, f"{name}: {fallbacks}"
    (g,) = dyllm_fx.stats(model)
    assert (g.dense_steps, g.sparse_steps) == (2, 6)
    sparse = g.salient[~g.dense_mask]
    assert (sparse < 1).all(), f"{name}: salient fractions on sparse steps\n{sparse}"
    assert any(n < total for n, total in rows_seen), f"{name}: no linear ran on fewer rows than the sequence"


def test_bench_accepts_zoo_names_and_refuses_what_it_cannot_decode():
    from dyllm_fx.bench import parse_args

    tiny = ["--gen-length", "8", "--steps", "8", "--block-length", "4"]
    assert parse_args(["--model", "llama", *tiny]).model == "llama"
    for name in zoo.NOT_DECODABLE:
        with pytest.raises(SystemExit):
            parse_args(["--model", name, *tiny])
