"""Evaluation / calibration text for quantization tests: WikiText-2 (test split) when available.

Looked up in order: ``$JAXINFER_WIKITEXT``, ``<repo>/../shared/data/wikitext-2-raw-test.txt`` (the CI
layout), ``<repo>/../../shared/data/...`` (a git worktree one level deeper). When none exists, a
deterministic English-like text is generated instead (seeded sentence templates over a fixed word
list), so the tests always run their assertions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NAME = "wikitext-2-raw-test.txt"
_REPO = Path(__file__).resolve().parents[2]


def wikitext_path() -> Path | None:
    env = os.environ.get("JAXINFER_WIKITEXT")
    candidates = ([Path(env)] if env else []) + [
        _REPO.parent / "shared" / "data" / NAME, _REPO.parent.parent / "shared" / "data" / NAME]
    return next((p for p in candidates if p.is_file()), None)


_NOUNS = ("city river army king song film church team village season war company school game road "
          "island album player station family bridge battle castle museum ship book".split())
_ADJ = "old new large small northern early famous local main second final national long".split()
_VERBS = ("built founded released played won moved opened described recorded destroyed visited "
          "joined wrote led replaced named".split())
_PLACES = "England France the United States Germany London Canada Australia India Scotland Ireland".split()


def generated_text(n_sentences: int = 6000, seed: int = 0) -> str:
    """Deterministic English-like paragraphs."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    out, para = [], []
    for i in range(n_sentences):
        year = int(rng.integers(1800, 2015))
        adj, noun, noun2, verb, place = pick(_ADJ), pick(_NOUNS), pick(_NOUNS), pick(_VERBS), pick(_PLACES)
        kind = int(rng.integers(4))
        if kind == 0:
            s = f"The {adj} {noun} was {verb} in {year} by the {noun2} of {place}."
        elif kind == 1:
            s = f"In {year}, the {noun} {verb} a {adj} {noun2} near the {pick(_NOUNS)}."
        elif kind == 2:
            s = f"It is one of the most {adj} {noun}s in {place}, and it was {verb} again in {year}."
        else:
            s = f"After the {noun}, the {adj} {noun2} {verb} the {pick(_NOUNS)} for {int(rng.integers(2, 40))} years."
        para.append(s)
        if i % 7 == 6:
            out.append(" ".join(para))
            para = []
    return "\n".join(out) + "\n"


def evaluation_text() -> tuple[str, str]:
    """``(text, source description)``."""
    path = wikitext_path()
    if path is not None:
        return path.read_text(encoding="utf-8"), str(path)
    return generated_text(), "generated English-like text (WikiText-2 file not found)"
