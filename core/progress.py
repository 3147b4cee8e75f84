"""Progress bars that stay readable where stderr is not a terminal.

On a terminal a tqdm bar redraws itself in place. In a log file, a pipe, `tee` or CI those redraws
are carriage returns: one endless line, or nothing until the end. There `bar` writes a plain line
(`extract:  41%|####      | 262/640 [03:10<04:35, 1.4prompt/s]`) every `every` seconds instead.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Lines:
    """A file for tqdm that turns its in-place redraws into whole lines (repeats dropped)."""

    def __init__(self, stream):
        self.stream, self.last = stream, ""

    def write(self, s: str) -> None:
        text = s.replace("\r", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, desc: str, unit: str, *, disable: bool = False, every: float = 30.0, stream=None, **kw) -> tqdm:
    """A tqdm bar over `total` units on stderr: redrawn in place on a terminal, else one line at most
    every `every` seconds (and the first and last state)."""
    stream = stream if stream is not None else sys.stderr
    if disable or getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=stream, **kw)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=every, ncols=100, ascii=True,
                **kw)
