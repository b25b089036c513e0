"""Progress bars for the long commands: tqdm on stderr, shown only on a terminal.

A bar says what is being done, how far along it is and the time left. It is off with a
command's --no-progress, with tqdm's own TQDM_DISABLE=1, and whenever stderr is not a
terminal (a pipe, a log file, a job scheduler), so logs hold lines, not carriage returns.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

_wanted = True


def set_wanted(wanted: bool) -> None:
    """--no-progress: no bars in this process."""
    global _wanted
    _wanted = wanted


def stream():
    """Where bars go: stderr, as it is now (a test may stand a terminal in for it)."""
    return sys.stderr


def shown() -> bool:
    return _wanted and stream().isatty()


def bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled where bars are not shown (or show is False); iterate
    it or call update(). kwargs go to tqdm (leave, initial, ...)."""
    options = {"file": stream(), "dynamic_ncols": True, "leave": False, **kwargs}
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (show and shown()), **options)
