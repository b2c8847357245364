"""Formatting shared by the verbs' printed tables, and JSON any parser reads."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from infinisim.core.files import strict_json


def size(n: float) -> str:
    """Bytes with a decimal unit: '1.5 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def maybe(x: float, spec: str = ".3f") -> str:
    """A number, or '-' where there is none (NaN)."""
    return "-" if x != x else format(x, spec)


def table(rows: Any) -> str:
    """A DataFrame as text: 3 significant digits, '-' where a value is missing (NaN or None)."""
    shown = rows.astype(object).where(rows.notna(), "-")
    return shown.to_string(index=False, formatters={c: _cell for c in shown.columns})


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_json(data: Any) -> None:
    """Strict JSON on stdout: NaN and infinities as null."""
    print(json.dumps(strict_json(data), indent=1, default=float, allow_nan=False))


class Progress:
    """How far a long wait has come, on stderr, on a terminal or not: a line rewritten in place each
    second on a terminal; otherwise a line every `period` seconds, so a piped log shows the run is
    alive (also while nothing advances: `waiting` says what it waits for, e.g. a long prefill)."""

    def __init__(self, label: str, total: int, unit: str, waiting: str = "", period: float = 10.0,
                 enabled: bool = True):
        self.label, self.total, self.unit, self.waiting = label, total, unit, waiting
        self.enabled = enabled  # False: silent (a tensor-parallel rank other than 0)
        self.done, self.tty, self.shown = 0, sys.stderr.isatty(), False
        self.period = 1.0 if self.tty else period
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        if exc[0] is None and (self.shown or time.perf_counter() - self.start > 2):
            self._show(final=True)
        elif self.tty and self.shown:
            print(file=sys.stderr)

    def update(self, done: int | None = None) -> None:
        self.done = self.done + 1 if done is None else done

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done == 0 and self.waiting:
            return f"{self.label}: {self.waiting} ({elapsed:.0f} s)"
        rate = f", {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.done else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit} ({elapsed:.0f} s{rate})"

    def _show(self, final: bool = False) -> None:
        self.shown = True
        if self.tty:
            print(f"\r\033[K{self.line()}", end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(self.line(), file=sys.stderr, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.period):
            self._show()


class PerPolicy:
    """A progress line per policy, one policy after another: `update(policy, done, total)`; the
    last one closes with `close()` (or when it reaches its total)."""

    def __init__(self, unit: str):
        self.unit, self.bar, self.name = unit, None, ""

    def update(self, name: str, done: int, total: int) -> None:
        if self.bar is None or name != self.name:
            self.close()
            self.name, self.bar = name, Progress(f"[{name}]", total, self.unit).__enter__()
        self.bar.update(done)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def describe_stream(stream: Any) -> str:
    """A request stream in one line: how many, over how long, at what rate, from where (every scaling)."""
    return f"{len(stream)} requests over {stream.duration_s:.0f} s ({stream.rate:.2f}/s): {stream.source}"
