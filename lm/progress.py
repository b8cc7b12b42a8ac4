"""A progress line for long stages: count / total, rate, elapsed time and ETA, on stderr at most every N seconds.

    progress = Progress("train", total=600, unit="steps", start=200)   # resumed at step 200
    for step in ...:
        progress.update(step, note=f"loss {loss:.3f}")                  # or progress.advance(n)
    progress.close()                                                    # the final line, always written

    train 320/600 steps (53%) | 4.1 steps/s | elapsed 29s | ETA 1m08s | loss 3.214

Without a terminal (CI logs, files) each report is a line of its own, at most one per `every` seconds (default
10). On a terminal (stream.isatty()) the line is redrawn in place, at most once per `every` seconds (default 1),
and the cursor is left at its start so that a log line written in between overwrites it rather than being
appended to it. The rate counts only what happened after the first update (for training: after the first step,
which also compiles), so the ETA is not skewed by start-up. Without a total there is no percentage or ETA.
`enabled=False` (e.g. every process but the first) makes every call a no-op.
"""
import sys
import time

TTY_EVERY, LOG_EVERY = 1.0, 10.0


def duration(seconds: float) -> str:
    """7s, 1m08s, 2h03m: short and fixed-format."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, what: str, total: int | None = None, unit: str = "", start: int = 0,
                 every: float | None = None, stream=None, enabled: bool = True, clock=time.monotonic):
        self.what, self.total, self.unit, self.count = what, total, unit, start
        self.enabled, self.clock = enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else (TTY_EVERY if self.tty else LOG_EVERY)
        self.started = self.last_report = clock()
        self._rate_from = None  # (time, count) of the first update: the rate counts from there
        self.note = ""
        self.closed = False

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.update(self.count + n, note)

    def update(self, count: int, note: str | None = None) -> None:
        """Sets the count (and the note shown at the end of the line); reports if `every` seconds have passed."""
        if not self.enabled:
            return
        now = self.clock()
        if self._rate_from is None:
            self._rate_from = (now, count)
        self.count = count
        if note is not None:
            self.note = note
        if now - self.last_report >= self.every:
            self._write(now, final=False)

    def rate(self, now: float | None = None) -> float | None:
        """Units per second since the first update (None before two distinct times)."""
        if self._rate_from is None:
            return None
        now = self.clock() if now is None else now
        since, first = self._rate_from
        return (self.count - first) / (now - since) if now > since and self.count > first else None

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.what} {self.count:,}{'/' + format(self.total, ',') if self.total else ''}{unit}"
                 + (f" ({100 * self.count / self.total:.0f}%)" if self.total else "")]
        rate = self.rate(now)
        if rate:
            parts.append(f"{rate:.3g}{unit}/s")
        parts.append(f"elapsed {duration(now - self.started)}")
        if rate and self.total and self.count < self.total:
            parts.append(f"ETA {duration((self.total - self.count) / rate)}")
        if self.note:
            parts.append(self.note)
        return " | ".join(parts)

    def close(self) -> None:
        """Writes the final line (ended by a newline on a terminal too). Later calls do nothing."""
        if self.enabled and not self.closed:
            self._write(self.clock(), final=True)
        self.closed = True

    def _write(self, now: float, final: bool) -> None:
        self.last_report = now
        text = self.line(now)
        if self.tty:  # redraw in place; leave the cursor at column 0 (a log line then overwrites the bar)
            self.stream.write(f"\r{text}\033[K" + ("\n" if final else "\r"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
