"""A fast tokenizer built from a GGUF file's tokenizer metadata, with ``gguf`` and ``tokenizers`` only.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``), the
merges, token types, special-token ids, the pre-tokenizer's name (``tokenizer.ggml.pre``) and the chat
template as metadata. This module turns them into a ``tokenizers.Tokenizer`` and wraps it in
``transformers.PreTrainedTokenizerFast`` (tokenizer files and chat-template rendering; no torch import).

Two vocabulary kinds (``tokenizer.ggml.model``) are understood:

- ``gpt2``: byte-level BPE. The text is split by the regular expression llama.cpp uses for the file's
  ``pre`` value (a table below; the split decides which merges can apply, so a wrong one gives a wrong
  tokenization silently), then bytes are mapped to the GPT-2 byte alphabet.
- ``llama``: SentencePiece BPE with byte fallback (Llama 2, Mistral): spaces become ``\u2581``, a ``\u2581`` is
  prepended to the text, merges come from the file or are recovered from the tokens' scores.

Anything else raises :class:`~jaxinfer.errors.UnsupportedModelError` naming the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from jaxinfer.errors import UnsupportedModelError, WeightLoadError

# llama.cpp's token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _Split:
    """How a ``pre`` value splits text before BPE: every digit apart first (or not), then one regex."""

    regex: str
    digits_apart: bool = False


# tokenizer.ggml.pre -> the split llama.cpp applies for it (llama-vocab.cpp's pre-tokenizer table)
PRE_TOKENIZER_SPLITS: dict[str, _Split] = {
    "gpt-2": _Split(_GPT2_SPLIT),
    "gpt2": _Split(_GPT2_SPLIT),
    **{name: _Split(_GPT2_SPLIT, digits_apart=True)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: _Split(_LLAMA3_SPLIT) for name in ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe")},
    **{name: _Split(_QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}

_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.ggml.scores")
_SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                 "pad_token": "padding_token_id"}


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF file, as plain Python values."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None
    scores: list[float] | None
    special_ids: dict[str, int]  # "bos_token" / "eos_token" / "unk_token" / "pad_token" -> id
    add_bos: bool | None
    add_eos: bool
    chat_template: str | None

    @classmethod
    def read(cls, path: str | Path, fields: dict | None = None) -> GGUFVocab:
        """Read the tokenizer metadata of the GGUF file at ``path`` (``fields``: the file's already parsed
        ``gguf.GGUFReader(path).fields``, which saves parsing it again)."""
        import gguf

        if fields is None:
            try:
                fields = gguf.GGUFReader(str(path)).fields
            except Exception as e:  # the reader raises assorted errors on damaged files
                raise WeightLoadError(f"{path}: corrupted or truncated GGUF file ({e})") from e

        def get(key, default=None):
            field = fields.get(key)
            return default if field is None else field.contents()

        model = get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in fields:
            raise UnsupportedModelError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.model / tokens)")
        tokens = get("tokenizer.ggml.tokens")
        ids = {name: get(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_KEYS.items()}
        return cls(model=model, pre=get("tokenizer.ggml.pre"), tokens=tokens,
                   token_types=get("tokenizer.ggml.token_type") or [1] * len(tokens),
                   merges=get("tokenizer.ggml.merges"), scores=get("tokenizer.ggml.scores"),
                   special_ids={k: int(v) for k, v in ids.items() if v is not None and 0 <= v < len(tokens)},
                   add_bos=get("tokenizer.ggml.add_bos_token"), add_eos=bool(get("tokenizer.ggml.add_eos_token")),
                   chat_template=get("tokenizer.chat_template"))


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _byte_level_backend(vocab: GGUFVocab):
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with the split of ``tokenizer.ggml.pre``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    split = PRE_TOKENIZER_SPLITS.get(vocab.pre or "gpt-2")
    if split is None:
        known = ", ".join(sorted(PRE_TOKENIZER_SPLITS))
        raise UnsupportedModelError(f"GGUF tokenizer.ggml.pre = {vocab.pre!r} is not supported (known: {known})")
    if vocab.merges is None:
        raise UnsupportedModelError("GGUF byte-level BPE vocabulary without tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # llama.cpp keeps some added tokens in raw UTF-8; BPE needs every token in the byte alphabet
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in vocab.tokens]
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split.digits_apart else []
    steps += [pre_tokenizers.Split(Regex(split.regex), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok, letters


def _scored_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary pieces,
    the merge of higher-scored results first (ties: shorter left piece, then vocabulary order)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for tok, score in zip(tokens, scores):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in index and right in index:
                found.append((-score, len(left), len(right), index[left], index[right], left, right))
    found.sort()
    return [(f[5], f[6]) for f in found]


def _sentencepiece_backend(vocab: GGUFVocab):
    """SentencePiece BPE with byte fallback (``tokenizer.ggml.model == "llama"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab.merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    elif vocab.scores is not None:
        merges = _scored_merges(vocab.tokens, vocab.scores)
    else:
        raise UnsupportedModelError("GGUF SentencePiece vocabulary with neither merges nor scores")
    unk = vocab.tokens[vocab.special_ids["unk_token"]] if "unk_token" in vocab.special_ids else None
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab.tokens)}, merges=merges, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    return tok, None


_BACKENDS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def build_gguf_tokenizer(path: str | Path, fields: dict | None = None):
    """A ``transformers.PreTrainedTokenizerFast`` for the GGUF file at ``path`` (its chat template included);
    ``fields``: the file's parsed ``GGUFReader`` fields, if the caller has them.

    Raises:
      UnsupportedModelError: unknown ``tokenizer.ggml.model`` or ``tokenizer.ggml.pre``, or no tokenizer.
      WeightLoadError: the file cannot be read.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    vocab = GGUFVocab.read(path, fields)
    backend = _BACKENDS.get(vocab.model)
    if backend is None:
        raise UnsupportedModelError(
            f"GGUF tokenizer.ggml.model = {vocab.model!r} is not supported (known: {', '.join(sorted(_BACKENDS))})"
        )
    tok, letters = backend(vocab)
    # control tokens match whole and are special; user-defined ones match whole but are plain text.
    # In a byte-level vocabulary a control token outside the byte alphabet is a converter's mislabel.
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(vocab.tokens, vocab.token_types)
               if kind == _CONTROL and (letters is None or set(t) <= letters)]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(vocab.tokens, vocab.token_types)
            if kind == _USER_DEFINED and tok.token_to_id(t) is not None]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    special = {name: vocab.tokens[i] for name, i in vocab.special_ids.items()}
    add_bos = vocab.add_bos if vocab.add_bos is not None else vocab.model == "llama"  # llama.cpp's default
    bos = [special["bos_token"]] if add_bos and "bos_token" in special else []
    eos = [special["eos_token"]] if vocab.add_eos and "eos_token" in special else []
    template = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pairs = {t: tok.token_to_id(t) for t in bos + eos}
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=list(pairs.items()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=vocab.chat_template,
                                   clean_up_tokenization_spaces=False, **special)
