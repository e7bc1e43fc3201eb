"""The embedded corpus: Shakespeare's complete works (Project Gutenberg, public domain).

Shipped as ``shakespeare.jsonl.xz`` (42 works, 5.06 MB of text, 1.6 MB compressed), one JSON object
per work: ``{"work": "hamlet", "text": "..."}``. The held-out split is fixed by work, not by random
lines, so no sentence of a held-out play is ever seen in training: ``macbeth`` and ``tempest``
(0.20 MB, 4.0% of the characters) form ``validation``; the other 40 works form ``train``.
"""
from __future__ import annotations

import json
import lzma
from functools import lru_cache
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("shakespeare.jsonl.xz")
HELD_OUT = ("macbeth", "tempest")
SPLITS = ("train", "validation")
DOC_SEPARATOR = "\n\n"


@lru_cache(maxsize=1)
def _works() -> tuple[tuple[str, str], ...]:
    if not CORPUS_FILE.exists():
        raise FileNotFoundError(f"embedded corpus missing: {CORPUS_FILE} (reinstall shear)")
    with lzma.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        return tuple((d["work"], d["text"]) for d in map(json.loads, f))


def load_corpus(split: str) -> list[dict]:
    """The works of one split as ``[{"work": name, "text": text}, ...]``, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; expected one of {SPLITS}")
    held = split == "validation"
    return [{"work": w, "text": t} for w, t in _works() if (w in HELD_OUT) == held]


def load_corpus_text(split: str) -> str:
    """One split as a single string, works joined by a blank line."""
    return DOC_SEPARATOR.join(d["text"] for d in load_corpus(split))
