"""Tiny random-init configs of real transformers 5.x architectures, made bidirectional through their config.

Each factory takes keyword arguments with tiny defaults (vocab 128, hidden 32, 2 layers), `seed` and `dtype`,
and returns an eval-mode model whose `config` carries `mask_token_id` (int) and `shift_logits` (bool), like
the factories of `dyllm_fx.models` (where they are registered in `MODELS`). Offline: configs only, no weights.

How each one is made bidirectional (checked per model by `tests/test_zoo.py`: a late token changes early logits):
- llama, qwen2, qwen3, mixtral, gpt_neox: `config.is_causal = False`, read at every forward by transformers'
  mask creation (`create_causal_mask` -> bidirectional mask) and by SDPA's `is_causal`.
- gemma2, gemma3: `use_bidirectional_attention=True` (sets the attention modules' `is_causal = False`; gemma3
  also overlays a full / windowed-bidirectional mask) and `config.is_causal = False`. The sliding window is
  larger than any test sequence (gemma3's config stores `window // 2 + 1` when bidirectional).
- modernbert: a masked LM, bidirectional by construction (`create_bidirectional_mask`).
- diffusion_gemma: a real block-diffusion LM. Its decoder attends bidirectionally over the encoder's KV cache
  (the prompt) plus the canvas; the encoder is causal (`use_bidirectional_attention=None`, as released).
"""
import torch
from torch import nn

from dyllm_fx._factory import _mark_diffusion, _seeded_init


def llama(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
          seed=0, dtype=torch.float32) -> nn.Module:
    """LlamaForCausalLM, GQA, bidirectional through `config.is_causal`. [MASK] = vocab_size - 1, no shift."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads, intermediate_size=intermediate_size,
        tie_word_embeddings=False, is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: LlamaForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def qwen2(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, intermediate_size=64,
          seed=0, dtype=torch.float32) -> nn.Module:
    """Qwen2ForCausalLM as Dream runs it: q/k/v bias, GQA, logits shifted by one. [MASK] = vocab_size - 1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: Qwen2ForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=True)


def qwen3(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
          intermediate_size=64, seed=0, dtype=torch.float32) -> nn.Module:
    """Qwen3ForCausalLM: RMSNorm on q and k per head (QK-norm), head_dim independent of hidden_size
    (here num_heads * head_dim = 64 > hidden_size), GQA. [MASK] = vocab_size - 1, no shift."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        tie_word_embeddings=False, is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: Qwen3ForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def gemma2(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           intermediate_size=64, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
           seed=0, dtype=torch.float32) -> nn.Module:
    """Gemma2ForCausalLM as released: sliding / full layers alternating, attention-logit softcapping (50) and
    final-logit softcapping (30), sandwich norms, GeGLU, tied embeddings scaled by sqrt(hidden).

    SDPA cannot softcap attention logits, so with `attn_logit_softcapping` set the model runs transformers'
    hand-written ("eager") attention: matmul -> tanh softcap -> mask -> softmax -> matmul. Pass
    `attn_logit_softcapping=None` for SDPA. [MASK] = vocab_size - 1, no shift."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        query_pre_attn_scalar=head_dim, sliding_window=sliding_window, use_bidirectional_attention=True,
        attn_logit_softcapping=attn_logit_softcapping, final_logit_softcapping=final_logit_softcapping,
        is_causal=False, attn_implementation="sdpa" if attn_logit_softcapping is None else "eager",
    )
    model = _seeded_init(lambda: Gemma2ForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def gemma3(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
           intermediate_size=64, sliding_window=4096, seed=0, dtype=torch.float32) -> nn.Module:
    """Gemma3ForCausalLM (text): QK-norm, sliding / full layers (layer 0 sliding, the last full) with their own
    RoPE bases, sandwich norms, bidirectional through `use_bidirectional_attention` (as EmbeddingGemma).
    [MASK] = vocab_size - 1, no shift."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
        query_pre_attn_scalar=head_dim, sliding_window=sliding_window, use_bidirectional_attention=True,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: Gemma3ForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def mixtral(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            num_experts=4, experts_per_token=2, seed=0, dtype=torch.float32) -> nn.Module:
    """MixtralForCausalLM: sparse MoE FFN (router + top-k of `num_experts` SwiGLU experts), GQA, no sliding
    window. Experts run as transformers' `batched_mm` (`experts_implementation`): each row repeated top-k times,
    its experts' weights gathered per row, one `bmm`, summed back per row, which the token-axis analysis proves
    row-wise. The default `grouped_mm` sorts rows by expert: the layers after it would stay dense.
    [MASK] = vocab_size - 1, no shift."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token, sliding_window=None, tie_word_embeddings=False,
        is_causal=False, attn_implementation="sdpa", experts_implementation="batched_mm",
    )
    model = _seeded_init(lambda: MixtralForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def gpt_neox(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, rotary_pct=0.25,
             seed=0, dtype=torch.float32) -> nn.Module:
    """GPTNeoXForCausalLM (Pythia): parallel residual (attention and MLP read the same input), fused QKV
    projection with bias, LayerNorm, partial rotary (`rotary_pct` of each head). [MASK] = vocab_size - 1."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary_pct},
        is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: GPTNeoXForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def modernbert(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
               local_attention=128, seed=0, dtype=torch.float32) -> nn.Module:
    """ModernBertForMaskedLM: a bidirectional masked LM. Global / local (sliding, `local_attention` wide) layers,
    RoPE, GeGLU, LayerNorm without bias, prediction head (dense + norm) tied to the embeddings.
    ModernBERT's config has no mask token id: [MASK] = vocab_size - 1 (special ids moved below it), no shift."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, local_attention=local_attention, global_attn_every_n_layers=2,
        pad_token_id=vocab_size - 2, bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 4,
        cls_token_id=vocab_size - 3, sep_token_id=vocab_size - 4, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: ModernBertForMaskedLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


def diffusion_gemma(*, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    global_head_dim=16, intermediate_size=64, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                    canvas_length=24, sliding_window=4096, seed=0, dtype=torch.float32) -> nn.Module:
    """DiffusionGemmaForBlockDiffusion: a real block-diffusion LM (Gemma 4 text layers, MoE branch next to the
    dense MLP, QK-norm, attention scale 1.0, a shared-KV full-attention layer type with its own head dim, a tiny
    Gemma 4 vision tower that a text-only call never runs).

    Inputs, as its `generate` drives it: `input_ids` (the prompt, [B, P]) go through the causal encoder once,
    which fills a KV cache; every denoising step then calls
    `model(decoder_input_ids=canvas [B, C], cache=cache, self_conditioning_logits=previous logits or None)`
    and gets logits over the canvas only, `[B, C, V]`. The decoder attends bidirectionally over the cached
    prompt keys plus the canvas keys (query length C, key length P + C). Its own sampler starts from uniformly
    random tokens and re-noises every non-accepted position each step; it has no [MASK] token. For the backend's
    harness `mask_token_id` is set to vocab_size - 1 (a token the canvas holds until it is committed)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    num_layers = max(num_layers, 1)
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
        intermediate_size=intermediate_size, num_experts=num_experts, top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size, sliding_window=sliding_window,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  boi_token_id=vocab_size - 4, eoi_token_id=vocab_size - 3,
                                  image_token_id=vocab_size - 2, attn_implementation="sdpa",
                                  experts_implementation="batched_mm")
    model = _seeded_init(lambda: DiffusionGemmaForBlockDiffusion(config), seed, dtype)
    # Not `_mark_diffusion`: any `config.is_causal` is forwarded by transformers' `merge_with_config_defaults` as
    # an `is_causal` kwarg that collides with the one DiffusionGemma's attention passes itself (TypeError), and
    # the decoder is bidirectional anyway.
    model.config.use_cache = False
    model.config.mask_token_id = vocab_size - 1
    model.config.shift_logits = False
    model.config.vocab_size = vocab_size  # generate() checks mask ids against config.vocab_size
    return model


# Models whose denoising step is not `model(ids)` over one sequence: `dyllm_fx.generate` (and the bench) cannot
# decode them (its logits would cover another tensor than the sequence it passes). Name -> why.
NOT_DECODABLE = {
    "diffusion_gemma": "a denoising step is model(decoder_input_ids=canvas, cache=prompt_kv_cache) and returns "
                       "logits over the canvas only (see dyllm_fx.zoo.diffusion_gemma)",
}

ZOO = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "mixtral": mixtral,
    "gpt_neox": gpt_neox,
    "modernbert": modernbert,
    "diffusion_gemma": diffusion_gemma,
}
