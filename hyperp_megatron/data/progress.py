"""A throttled progress line for preprocessing (documents, tokens, MB/s of input, ETA) and the summary."""

from __future__ import annotations

import time
from typing import TextIO


def _human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts documents, tokens and input bytes; ``update`` redraws at most every ``interval`` seconds.

    On a terminal the line is redrawn in place (``\\r``); in a log file it is a new line each time (use a
    longer interval there). ``total_bytes``: the input to do; ``done_bytes``: already done (resumed shards),
    counted in the percentage but not in the rate.
    """

    def __init__(self, stream: TextIO | None, total_bytes: int, done_bytes: int = 0, interval: float = 1.0) -> None:
        self.stream = stream
        self.total_bytes = max(1, total_bytes)
        self.documents = self.tokens = 0
        self.bytes = done_bytes
        self._resumed_bytes = done_bytes
        self._start = self._last_draw = time.monotonic()
        self.interval = interval
        self._in_place = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def update(self, documents: int, tokens: int, num_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += num_bytes
        if self.stream is not None and time.monotonic() - self._last_draw >= self.interval:
            self.draw()

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self._start)
        rate = (self.bytes - self._resumed_bytes) / elapsed
        remaining = max(0, self.total_bytes - self.bytes)
        eta = _duration(remaining / rate) if rate > 0 else "?"
        percent = min(100.0, 100.0 * self.bytes / self.total_bytes)
        return (f"{percent:5.1f}% | {_human(self.documents)} docs | {_human(self.tokens)} tokens | "
                f"{rate / 1e6:.1f} MB/s | {_human(self.tokens / elapsed)} tok/s | "
                f"{_duration(elapsed)} elapsed, ETA {eta}")

    def draw(self) -> None:
        self._last_draw = time.monotonic()
        if self.stream is None:
            return
        self.stream.write(("\r" + self.line() + "\033[K") if self._in_place else self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.draw()
            if self._in_place:
                self.stream.write("\n")
            self.stream.flush()
