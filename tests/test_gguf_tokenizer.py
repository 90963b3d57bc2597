"""The torch-free GGUF tokenizer against transformers' own GGUF conversion (which needs torch).

Equality is exact: the same token ids for every text of the corpus, the same rendered chat prompt, and
decode(encode(x)) == x.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import pytest

from jaxinfer.errors import UnsupportedModelError
from jaxinfer.gguf_tokenizer import build_gguf_tokenizer
from tests.quantize.text_data import wikitext_path

_HANDWRITTEN = [
    "", " ", "  ", "hello", " hello", "hello ", "  two  spaces  ", "\n", "\n\n\n", " \n \n", "\t tab\tand\r\nCRLF\r\n",
    "Digits: 1 12 123 1234 12345 3.14159 -0.5e10 2026-12-06 0x1F 1,000,000",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2**n)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }  // C++",
    "中文文本，日本語のテキスト、한국어 텍스트", "Emoji: 🎉🚀👩‍👩‍👧 ❤️ 🇫🇷", "Ünïcödé ñ ß Æ œ ø",
    "I'm, you're, he'll, they've, we'd, it's",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>",
    "inline <|im_end|>special and <|im_start|> again", "<|im_start", "|im_end|>",
    "URL https://example.com/a/b?c=d&e=f#g and email a.b@c.de",
    "    leading and trailing    ", "!!!???...,,,;;;", "\u00a0non-breaking\u2009thin\u200bzero-width",
]


def _wikitext_lines(n: int) -> list[str]:
    path = wikitext_path()
    if path is None:  # the CI layout always has it; a bare checkout still runs the handwritten corpus
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:n]


def _hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    from jaxinfer.model_registry import resolve_model

    return resolve_model(None).path


def _assert_same_tokenization(ours, ref, texts):
    for text in texts:
        got, want = ours(text)["input_ids"], ref(text)["input_ids"]
        assert got == want, f"token ids differ for {text!r}"
        assert ours.decode(got) == text, f"decode(encode(x)) != x for {text!r}"


def test_default_model_tokenizer_equals_transformers(default_gguf):
    ours, ref = build_gguf_tokenizer(default_gguf), _hf_gguf_tokenizer(default_gguf)
    corpus = _HANDWRITTEN + _wikitext_lines(2000)
    _assert_same_tokenization(ours, ref, corpus)
    # the whole text at once too (long inputs, paragraph breaks)
    _assert_same_tokenization(ours, ref, ["\n".join(corpus)])
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.all_special_ids == ref.all_special_ids


def test_default_model_chat_prompt_equals_transformers(default_gguf):
    ours, ref = build_gguf_tokenizer(default_gguf), _hf_gguf_tokenizer(default_gguf)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2 + 2 = ?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 12345 * 6?  \n\n"}],
        [{"role": "user", "content": "日本語で答えて 🎌"}],
    ]
    for conv in conversations:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)[
                "input_ids"]


# --- a SentencePiece ("llama") vocabulary, and files the builder must refuse ---------------------------

_SPM_PIECES = ["\u2581", "e", "h", "l", "o", "w", "r", "d", "t", "\u2581h", "\u2581w", "he", "ll", "lo", "llo",
               "hello", "\u2581hello", "or", "wor", "\u2581wor", "ld", "\u2581world", "th", "\u2581th", "the",
               "\u2581the", "\u2581t", "\u2581\u2581", "\u2581\u2581\u2581"]


def _write_tokenizer_gguf(path: Path, model: str, tokens, types, scores=None, merges=None, pre=None, add_bos=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _spm_gguf(path: Path) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES)  # unknown, control, byte, normal
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_SPM_PIECES))]
    return _write_tokenizer_gguf(path, "llama", tokens, types, scores=scores, add_bos=True)


def test_sentencepiece_vocabulary_equals_transformers(tmp_path):
    path = _spm_gguf(tmp_path / "spm.gguf")
    ours, ref = build_gguf_tokenizer(path), _hf_gguf_tokenizer(path)
    texts = ["hello world", "the world", " hello  world ", "hello\nworld", "tow lord", "héllo wörld 🎉",
             "\u2581hello", "thethe  the", "x", " ", ""]
    for text in texts:
        got, want = ours(text)["input_ids"], ref(text)["input_ids"]
        assert got == want, f"token ids differ for {text!r}"
        assert got[:1] == [1]  # BOS, as llama.cpp adds for a SentencePiece vocabulary
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True)


def test_unknown_tokenizer_model_is_refused(tmp_path):
    path = _write_tokenizer_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]", "a"], [2, 3, 3, 1])
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        build_gguf_tokenizer(path)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
    path = _write_tokenizer_gguf(tmp_path / "pre.gguf", "gpt2", tokens, [2, 3, 3, 1, 1, 1], merges=["a b"],
                                 pre="some-new-pre")
    with pytest.raises(UnsupportedModelError, match="'some-new-pre'"):
        build_gguf_tokenizer(path)


def test_load_tokenizer_caches_the_built_tokenizer(default_gguf, tmp_path, monkeypatch):
    from jaxinfer import gguf_tokenizer
    from jaxinfer.model_registry import resolve_model
    from jaxinfer.tokenizer import load_tokenizer

    source = resolve_model(None)
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))  # a new, empty tokenizer cache
    first = load_tokenizer(source)
    assert list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    monkeypatch.setattr(gguf_tokenizer, "build_gguf_tokenizer", lambda *a: pytest.fail("rebuilt, not cached"))
    second = load_tokenizer(source)
    text = "Cached: 12345 🎉 <|im_end|>"
    assert second(text)["input_ids"] == first(text)["input_ids"]
    assert second.chat_template == first.chat_template and second.eos_token_id == first.eos_token_id
