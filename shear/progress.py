"""One progress bar for every long loop: redrawn in a terminal; in a log file (stderr not a TTY), plain
ASCII lines at most every 30 s, each with the count, rate and ETA."""
from __future__ import annotations

import sys


def progress(it, desc: str, total: int | None = None, disable: bool = False):
    """``it`` wrapped in a tqdm bar named ``desc`` (with an ETA)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(it, desc=desc, total=total, disable=disable, mininterval=0.5 if tty else 30.0,
                dynamic_ncols=tty, ascii=not tty)
