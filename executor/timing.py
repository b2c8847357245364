"""Per-phase timing on the clock that matches the device.

CPU: perf_counter around synchronous work; copies over an emulated link are timed by their
copy-engine thread (`add_span`). CUDA: event pairs on the stream that does the work, resolved
once per step after a synchronize, so timing never stalls the pipeline mid-step. Each copy's
start and end (from the step's start) are kept too, so overlap can be read off a trace.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

COPY_PHASES = ("h2d", "d2h")  # their index is a copy's direction in a trace's `copies` column
STEP_PHASES = ("embed", "head")


@dataclass
class Timings:
    """Resolved times of one step, in seconds."""

    wall_s: float
    step_phases: dict[str, float]
    layer_phases: dict[int, dict[str, float]]
    layer_counts: dict[int, dict[str, int]]
    step_counts: dict[str, int]
    copies: dict[int, list[float]] = field(default_factory=dict)  # per layer: direction (0 h2d, 1 d2h), start, end
    done: dict[int, float] = field(default_factory=dict)  # per layer: when its compute (the FFN) ended


class Span:
    """One timed block of a Recorder (a plain class, not a generator: a decode step opens hundreds)."""

    __slots__ = ("host", "layer", "phase", "recorder", "start", "stream")

    def __init__(self, recorder: Recorder, layer: int | None, phase: str, stream: torch.cuda.Stream | None,
                 host: bool):
        self.recorder, self.layer, self.phase, self.stream, self.host = recorder, layer, phase, stream, host

    def __enter__(self) -> None:
        self.start = self.recorder._mark(self.stream, self.host)

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is not None:
            return  # the block failed: nothing to time
        rec, start = self.recorder, self.start
        end = rec._mark(self.stream, self.host)
        rec._spans.append((self.layer, self.phase, start, end))
        if self.phase in COPY_PHASES and self.layer is not None:
            rec._copies.append((self.layer, self.phase, start, end))


@dataclass
class Recorder:
    """Collects spans of one step; `finish()` turns them into seconds."""

    cuda: bool
    drain: Callable[[], None] | None = None  # waits for copies still in flight (an emulated link)
    _spans: list[tuple[int | None, str, object, object]] = field(default_factory=list)
    _copies: list[tuple[int, str, object, object]] = field(default_factory=list)  # each copy's start and end
    _counts: dict[int | None, dict[str, int]] = field(default_factory=dict)
    _start: object = None

    def _mark(self, stream: torch.cuda.Stream | None = None, host: bool = False) -> object:
        if not self.cuda or host:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def begin(self) -> None:
        self._spans.clear()
        self._copies.clear()
        self._counts = {}
        self._start = self._mark()

    def span(self, layer: int | None, phase: str, stream: torch.cuda.Stream | None = None,
             host: bool = False) -> Span:
        """Time the work issued inside the block: on `stream` (default: the current one), or, with
        host=True, work the CPU does itself (a gather) on perf_counter even when CUDA is present."""
        return Span(self, layer, phase, stream, host)

    def add_copy(self, layer: int, phase: str, start: float, end: float, busy: float) -> None:
        """A copy another thread timed itself on perf_counter (a copy engine of an emulated link): it
        ran from start to end and held the link for `busy` seconds of that (its phase time)."""
        self._spans.append((layer, phase, start, start + busy))  # list.append is atomic: safe from any thread
        self._copies.append((layer, phase, start, end))

    def count(self, layer: int | None, **counts: int) -> None:
        """Per-layer (or, with layer None, per-step) quantities: bytes moved, tokens fetched, ...
        Whole numbers add up over the step's calls (a live server's sequences each count their own);
        lists (per-head measurements) are replaced."""
        mine = self._counts.setdefault(layer, {})
        for name, value in counts.items():
            mine[name] = mine[name] + value if isinstance(value, int) and name in mine else value

    def finish(self) -> Timings:
        end = self._mark()
        if self.drain is not None:  # as CUDA synchronises below: copies of this step land before it is resolved
            self.drain()
        if self.cuda:
            torch.cuda.synchronize()

            def elapsed(a: object, b: object) -> float:
                if isinstance(a, float):
                    return b - a  # type: ignore[operator]
                return a.elapsed_time(b) / 1e3  # type: ignore[attr-defined]
        else:
            def elapsed(a: object, b: object) -> float:
                return b - a  # type: ignore[operator]
        step: dict[str, float] = defaultdict(float)
        layers: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        copies: dict[int, list[float]] = defaultdict(list)
        done: dict[int, float] = {}
        for layer, phase, a, b in self._spans:
            if layer is None:
                step[phase] += elapsed(a, b)
            else:
                layers[layer][phase] += elapsed(a, b)
                if phase == "ffn":
                    done[layer] = elapsed(self._start, b)
        for layer, phase, a, b in self._copies:
            copies[layer] += [COPY_PHASES.index(phase), elapsed(self._start, a), elapsed(self._start, b)]
        step_counts = self._counts.pop(None, {})
        return Timings(elapsed(self._start, end), dict(step), {k: dict(v) for k, v in layers.items()},
                       self._counts, step_counts, dict(copies), done)
