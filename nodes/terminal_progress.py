"""The headless progress bar: `label |#####-----| 12/40 3.20 it/s ETA 0:09` on stderr.

What comfy_compat.Progress shows outside ComfyUI (inside it, ComfyUI's own node progress bar), and the CLI's
`sample` bar. Plain Python: it knows nothing of ComfyUI, and checks no interrupt (Progress does).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TerminalProgress:
    """`label |#####-----| 12/40 3.20 it/s ETA 0:09` on stderr.

    On a terminal the line is redrawn in place (at most 10 times a second); in a log file a line is written at
    most every `log_interval` seconds, plus the final one, so logs stay readable.
    """

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 24,
                 log_interval: float = 5.0):
        self.total = max(int(total), 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.log_interval = log_interval
        self.current = 0
        self.started = time.monotonic()
        self._last_draw = float("-inf")
        self._finished = False
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def render(self) -> str:
        total = self.total
        done = min(self.current, total) if total else self.current
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 and done else 0.0
        parts = [self.label] if self.label else []
        if total:
            filled = int(self.width * done / total)
            parts.append("|" + "#" * filled + "-" * (self.width - filled) + "|")
            parts.append(f"{done}/{total}")
        else:
            parts.append(f"{done}")
        if rate:
            parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
            if total and done < total:
                parts.append(f"ETA {_format_duration((total - done) / rate)}")
            else:
                parts.append(f"in {_format_duration(elapsed)}")
        return " ".join(parts)

    def update_absolute(self, value: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 0)
        self.current = int(value)
        finished = bool(self.total) and self.current >= self.total
        now = time.monotonic()
        interval = 0.1 if self._interactive else self.log_interval
        if finished or now - self._last_draw >= interval:
            self._draw(final=finished)
            self._last_draw = now

    def _draw(self, final: bool = False) -> None:
        if self._finished:
            return
        line = self.render()
        try:
            if self._interactive:
                self.stream.write("\r\033[K" + line + ("\n" if final else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):      # closed / broken stderr must never stop training
            pass
        self._finished = final

    def close(self) -> None:
        """Finish the line (an interrupted bar must not leave the cursor mid-line)."""
        if not self._finished and (self.current or self._interactive):
            self._draw(final=True)
        self._finished = True
