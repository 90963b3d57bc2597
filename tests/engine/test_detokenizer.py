"""Incremental detokenizer against ``tokenizer.decode`` of the whole sequence, with tokenizers trained here
(byte-level BPE like GPT-2 / SmolLM2; SentencePiece-style BPE with "▁" and byte fallback like Llama)."""

from __future__ import annotations

import json
import random

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.sampling_params import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Héllo wörld, ça va? Naïve café. Straße und Übermut.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji time 😀🎉🚀 and 👍🏽 thumbs, 🦀 crabs.",
    "def f(x):\n    return x * 2\n\n",
    "STOP stop Stop. The end. ### Answer: 42",
] * 20
# Text pieces for valid token streams: ASCII, accents, CJK, emoji (several bytes per character).
PIECES = [
    "Hello",
    " world",
    ",",
    " the",
    " quick",
    " fox",
    "\n",
    " 你好",
    "世界",
    " 😀",
    "🎉🚀",
    " 👍🏽",
    " café",
    " Straße",
    " STOP",
    " stop",
    "###",
    " 42",
    "  ",
    "é",
    "漢字",
    " 🦀",
    "x",
]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


def _sentencepiece_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, limit_alphabet=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # Llama-style byte fallback: characters outside the vocabulary become <0xNN> tokens
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


TOKENIZERS = {"byte_level": _byte_level(), "sentencepiece": _sentencepiece_style()}


def _multibyte_split(tok, ids) -> bool:
    """True when some character's bytes are spread over several tokens (the case that needs holding)."""
    return any("\ufffd" in tok.decode([i]) for i in ids)


def _stream(detok: IncrementalDetokenizer, ids, chunks, final=True):
    """Feed ``ids`` in chunks of the given sizes; returns the deltas."""
    deltas, i = [], 0
    for size in chunks:
        if i >= len(ids):
            break
        part = ids[i : i + size]
        i += size
        u = detok.update(part, final=final and i >= len(ids))
        deltas.append(u.text)
        if u.finished:
            break
    return deltas


def _text_ids(tok, rng: random.Random, n_pieces: int, specials: float = 0.0) -> list[int]:
    """Tokens of random text; with probability ``specials`` a special token between two pieces."""
    ids: list[int] = []
    text = ""
    for _ in range(n_pieces):
        text += rng.choice(PIECES)
        if rng.random() < specials:
            ids += tok.encode(text, add_special_tokens=False) + [rng.choice(tok.all_special_ids)]
            text = ""
    return ids + (tok.encode(text, add_special_tokens=False) if text else [])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), skip=st.booleans(), chunk=st.integers(1, 4))
def test_byte_level_random_ids_concatenate_to_decode(seed, skip, chunk):
    """Any token ids, broken UTF-8 and special tokens included: deltas concatenate to decode(all ids)."""
    tok = TOKENIZERS["byte_level"]
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = _stream(detok, ids, [rng.randint(1, chunk) for _ in ids])
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_valid_text_streams_never_show_broken_characters(name):
    tok = TOKENIZERS[name]
    rng = random.Random(0)
    split_seen = 0
    for _ in range(60):
        ids = _text_ids(tok, rng, rng.randint(1, 12), specials=0.2)
        split_seen += _multibyte_split(tok, ids)
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            deltas = _stream(detok, ids, [rng.randint(1, 3) for _ in ids])
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas), deltas
    assert split_seen > 10, "the samples must include characters split across tokens"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_prompt_context_keeps_the_leading_space(name):
    tok = TOKENIZERS[name]
    rng = random.Random(1)
    for _ in range(40):
        prompt = _text_ids(tok, rng, rng.randint(1, 6), specials=0.2)
        if rng.random() < 0.3:
            prompt = prompt + [tok.eos_token_id] * rng.randint(1, 6)  # prompt ends in skipped specials
        out = _text_ids(tok, rng, rng.randint(1, 6), specials=0.2)
        detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
        text = "".join(_stream(detok, out, [1] * len(out)))
        full, head = (
            tok.decode(prompt + out, skip_special_tokens=True),
            tok.decode(prompt, skip_special_tokens=True),
        )
        assert full.startswith(head)
        assert text == full[len(head) :]
    # SentencePiece-style: " world" after a prompt keeps its space; decoded alone it is stripped.
    if name == "sentencepiece":
        prompt, out = (
            tok.encode("Hello", add_special_tokens=False),
            tok.encode(" world", add_special_tokens=False),
        )
        assert IncrementalDetokenizer(tok, prompt_token_ids=prompt).update(out, final=True).text == " world"
        assert IncrementalDetokenizer(tok).update(out, final=True).text == "world"


def _expected_stop(full: str, stops, include: bool):
    """Reference: the match that ends first (then starts first) ends the text."""
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    if best is None:
        return full, None
    i, s = best
    return (full[: i + len(s)] if include else full[:i]), s


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(name, include):
    tok = TOKENIZERS[name]
    rng = random.Random(2)
    across_tokens = hits = 0
    for _ in range(150):
        ids = _text_ids(tok, rng, rng.randint(2, 14))
        full = tok.decode(ids)
        if rng.random() < 0.8 and len(full) > 1:
            a = rng.randrange(len(full) - 1)
            stops = [full[a : a + rng.randint(1, 6)]]
        else:
            stops = ["zzz"]
        stops.append(rng.choice(["STOP", "###", "qq", "好世"]))
        want, want_stop = _expected_stop(full, stops, include)
        detok = IncrementalDetokenizer(tok, stop=stops, include_stop_str_in_output=include)
        shown, stop_seen = "", None
        for i, t in enumerate(ids):
            u = detok.update([t], final=i == len(ids) - 1)
            shown += u.text
            assert want.startswith(shown), "text shown that is not in the final output"
            if not include:
                assert not any(s in shown for s in stops)
            if u.stop_string is not None:
                stop_seen = u.stop_string
                assert u.finished
                # split across tokens: the stop string is not inside this token's own text
                across_tokens += u.stop_string not in tok.decode([t])
                break
        assert shown == want and detok.output_text == want
        assert stop_seen == want_stop
        hits += want_stop is not None
    assert hits > 50 and across_tokens > 10


def test_prefix_of_a_stop_string_is_held_until_disambiguated():
    tok = TOKENIZERS["byte_level"]
    detok = IncrementalDetokenizer(tok, stop=["</answer>"])
    shown = ""
    for piece in ["The", " result", " </", "ans", "w", "x", " ok"]:
        u = detok.update(tok.encode(piece, add_special_tokens=False))
        shown += u.text
        if piece == "ans":
            assert shown == "The result "  # " </ans" could still become the stop string
    assert shown == "The result </answx ok" and u.stop_string is None
    # A held prefix is released by the final flush when the sequence ends for another reason.
    detok = IncrementalDetokenizer(tok, stop=["</answer>"])
    assert detok.update(tok.encode("hi </ans", add_special_tokens=False)).text == "hi "
    u = detok.update([], final=True)
    assert (u.text, u.finished, u.stop_string) == ("</ans", True, None)


def test_min_tokens_delays_stop_strings_and_drop_last_token():
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode("ab STOP cd STOP", add_special_tokens=False)
    n_first = len(tok.encode("ab STOP", add_special_tokens=False))
    detok = IncrementalDetokenizer(tok, stop=["STOP"], min_tokens=n_first)
    text = "".join(detok.update([t]).text for t in ids)
    assert detok.stop_string == "STOP" and text == "ab STOP cd "
    # A stop string shown before min_tokens was reached is not matched afterwards (a long stop string
    # widens the search window back over it).
    head = tok.encode("xxab", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["STOPPING", "ab"], min_tokens=len(head))
    text = "".join(detok.update([t]).text for t in head + tok.encode("c ok", add_special_tokens=False))
    assert text == "xxabc ok" and detok.output_text == text and detok.stop_string is None
    # The EOS that stopped the sequence is not decoded even when special tokens are shown.
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    u = detok.update(
        tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id], final=True, drop_last_token=True
    )
    assert u.text == "ok" and u.finished
    assert detok.update([5]).text == ""  # finished: nothing more


def test_from_sampling_params():
    tok = TOKENIZERS["byte_level"]
    params = SamplingParams(stop=["fox"], include_stop_str_in_output=True, skip_special_tokens=False)
    detok = IncrementalDetokenizer.from_sampling_params(tok, params)
    ids = tok.encode("the quick fox jumps", add_special_tokens=False) + [tok.eos_token_id]
    text = "".join(detok.update([t]).text for t in ids)
    assert text == "the quick fox" and detok.stop_string == "fox" and detok.finished
