"""An emulated host<->device link for CPU runs: copies happen on copy-engine threads, each taking
latency + bytes / bandwidth of wall time, so prefetch overlaps compute and a layer that needs its
copy stalls for real, as on a GPU (the only way to measure the mechanism without one).

A copy is one tensor pair: the data moves at memcpy speed first, then the thread sleeps out the
rest of the copy's link time in slices of at most SLICE seconds, each reserved on the link's clock:
one clock for both directions (a shared link: H2D and D2H slices interleave and their times add)
or one per direction (duplex). Sleeping uses no CPU, so the copy threads take only the memcpy from
the compute threads' cores (the link is slower than memcpy by design: a few percent of its time).
The memcpy is numpy's, on the copy thread alone: a torch op there would give that thread its own
OpenMP team, whose workers then slow the compute thread ~2x for as long as the thread lives
(measured beside a streamed weight copy; benchmarks/link_interference.py). And the compute
thread's own OpenMP workers spin while it waits for a copy, not doze (infinisim/__init__.py).

Ordering follows the CUDA path's streams and events: each direction runs its copies in issue
order; a copy may wait for earlier handles (H2D waits for the D2H issued before it, as the H2D
stream waits for the D2H stream); the compute thread blocks on a handle where the CUDA path waits
for an event.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from infinisim.hwprofiles.emulated import LinkSpec

SLICE = 1e-3  # seconds of link time per reservation: copies in both directions interleave at this grain
TIMER_SLACK_NS = 1000  # Linux lets a sleep overshoot by 50 us by default; a copy engine wakes on time
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a same-size integer view of any dtype


def memcpy(dst: Tensor, src: Tensor) -> None:
    """dst[...] = src on the calling thread alone (numpy: no OpenMP team, the GIL released), any
    strides; both CPU tensors of one dtype and shape."""
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise ValueError(f"emulated link: copy of {src.dtype} {tuple(src.shape)} into {dst.dtype} {tuple(dst.shape)}")
    view = _BITS[src.element_size()]
    np.copyto(dst.view(view).numpy(), src.view(view).numpy())


def _precise_sleeps() -> None:
    """Ask Linux to wake this thread within TIMER_SLACK_NS of its deadline (PR_SET_TIMERSLACK)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl: sleeps overshoot a little more
            ctypes.CDLL(None).prctl(29, TIMER_SLACK_NS, 0, 0, 0)


class Handle:
    """A copy on its way: `synchronize()` blocks until it has landed (as a CUDA event would)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.start = self.end = 0.0  # from when it first had the link to when it landed (perf_counter)
        self.busy = 0.0  # seconds it held the link (less than end - start where copies interleaved)
        self.error: BaseException | None = None

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error

    def query(self) -> bool:
        return self._done.is_set()


@dataclass
class _Job:
    pairs: list[tuple[Tensor, Tensor]]  # (destination, source)
    after: list[Handle]
    issued: float  # perf_counter at submit: the copy may have the link from then (as a DMA engine would)
    handle: Handle
    on_done: Callable[[Handle], None] | None


class EmulatedLink:
    """Two copy engines (threads), `h2d` and `d2h`, over one emulated link."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self._clock_lock = threading.Lock()
        self._free = {"h2d": 0.0, "d2h": 0.0}  # when each direction's link is next free (perf_counter)
        self._queues = {direction: queue.Queue() for direction in ("h2d", "d2h")}
        self.tail: dict[str, Handle | None] = {"h2d": None, "d2h": None}
        for direction in self._queues:
            threading.Thread(target=self._engine, args=(direction,), daemon=True, name=f"link-{direction}").start()

    def submit(self, direction: str, pairs: list[tuple[Tensor, Tensor]], after: list[Handle | None] = (),
               on_done: Callable[[Handle], None] | None = None) -> Handle:
        """Queue copies of (destination, source) pairs; `after`: handles they must wait for."""
        handle = Handle()
        self._queues[direction].put(_Job(pairs, [h for h in after if h is not None], time.perf_counter(), handle,
                                            on_done))
        self.tail[direction] = handle
        return handle

    def drain(self) -> None:
        """Block until every copy issued so far has landed."""
        for handle in list(self.tail.values()):
            if handle is not None:
                handle.synchronize()

    def _reserve(self, direction: str, seconds: float, not_before: float) -> float:
        """Book `seconds` of link time for `direction`, from `not_before` or when the link is free;
        returns the booking's end."""
        key = direction if self.spec.duplex else "h2d"  # a shared link: one clock for both
        with self._clock_lock:
            start = max(not_before, self._free[key])
            self._free[key] = start + seconds
            return start + seconds

    def _engine(self, direction: str) -> None:
        _precise_sleeps()
        with torch.inference_mode():  # as the decode loop: its tensors may be inference tensors
            self._run(direction)

    def _run(self, direction: str) -> None:
        jobs = self._queues[direction]
        while True:
            job = jobs.get()
            try:
                for h in job.after:
                    h.synchronize()
                # on the link from submit or when what it waits for landed; pairs follow each other
                not_before = max([job.issued] + [h.end for h in job.after])
                for dst, src in job.pairs:  # a copy per pair: each pays the latency, as on CUDA
                    memcpy(dst, src)  # the memcpy runs inside the copy's link time, not on top of it
                    seconds = self.spec.latency + src.numel() * src.element_size() / self.spec.bandwidth
                    first, not_before = self._pace(direction, seconds, not_before)
                    job.handle.busy += seconds
                    job.handle.start = job.handle.start or first  # the copy's span: from when it first had the link
                job.handle.end = time.perf_counter()
            except BaseException as exc:  # surfaced to the thread that waits on the handle
                job.handle.error = exc
            if job.on_done is not None:
                job.on_done(job.handle)
            job.handle._done.set()

    def _pace(self, direction: str, seconds: float, not_before: float) -> tuple[float, float]:
        """Hold the link for `seconds` from `not_before` (or when it frees), slice by slice; returns
        when the first slice began and when the last one ends."""
        first = None
        while seconds > 0:
            piece = min(seconds, SLICE)
            not_before = self._reserve(direction, piece, not_before)
            first = not_before - piece if first is None else first
            delay = not_before - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            seconds -= piece
        return (not_before if first is None else first), not_before
