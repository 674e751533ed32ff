"""A progress line on stderr: redrawn in place (\\r) on a terminal, a line per 10% otherwise."""

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and (now - self._last_draw >= 0.1 or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif not self.tty and (decile := self.done * 10 // max(self.total, 1)) > self._last_decile:
            self._last_decile = decile
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.label} [{bar}] {self.done}/{self.total}{failed} {now - self.t0:6.1f}s"

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
