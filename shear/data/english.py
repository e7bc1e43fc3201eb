"""General English for calibrating pretrained models: the docstrings of the Python standard library.

Shakespeare is out of domain for every real model; calibration on it empties whole layers of a
pretrained LLM (docs/BENCHMARKS.md). This source needs no download: the English prose of the
module, class and function docstrings (at least ``MIN_CHARS`` characters) of the running
interpreter's own standard library (``Lib/*.py`` and one package level below, tests, demos and
``pydoc_data`` excluded), in a fixed order: about 1,300 documents and 0.97 M characters on
CPython 3.11 (about 220k SmolLM2 tokens). Every 20th document forms ``validation``. Python
documentation prose under the PSF license, read from the installed interpreter, never shipped.

``pydoc_data`` (the language reference's topics) is left out on purpose: benchmarks evaluate on it,
so calibration on this source stays disjoint from that evaluation text.
"""
from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

MIN_CHARS = 300
EVERY = 20  # every EVERY-th document is held out
SKIP = {"test", "tests", "idlelib", "pydoc_data", "lib2to3", "site-packages", "turtledemo", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _documents() -> tuple[str, ...]:
    lib = stdlib_dir()
    docs: list[str] = []
    for f in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if SKIP & set(f.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= MIN_CHARS:
                    docs.append(d)
    if len(docs) < 2 * EVERY:
        raise FileNotFoundError(f"the 'english' calibration text needs the Python standard library's sources; "
                                f"{lib} has {len(docs)} docstrings of >= {MIN_CHARS} characters")
    return tuple(docs)


def load_english(split: str) -> list[str]:
    """The documents of one split (``train`` or ``validation``), in a fixed order."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected train or validation")
    docs = _documents()
    held_out = docs[EVERY - 1::EVERY]
    if split == "validation":
        return list(held_out)
    held = set(held_out)  # a docstring repeated in the library stays out of train when a copy is held out
    return [d for i, d in enumerate(docs) if i % EVERY != EVERY - 1 and d not in held]
