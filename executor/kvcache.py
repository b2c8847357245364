"""Where KV rows live (host or device memory) and how they move between the two."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.executor.link import EmulatedLink, Handle
from infinisim.executor.timing import Recorder

if TYPE_CHECKING:
    from infinisim.executor.model import Transformer


@dataclass(frozen=True)
class Measurement:
    """What a run measures beyond its timing. None of it changes what attention runs over; each
    costs time outside the timed phases."""

    forced: list[list[int]] | None = None  # teacher forcing: per sequence the tokens fed instead of sampled
    quality: bool = False  # selective policies: recall and top-k overlap against exact attention
    record_selection: bool = False  # selective policies: the fetched positions go into the trace
    # speculating policies: the uncapped counts at alpha 1..9 (what the simulator re-derives other alphas'
    # shares from), every n-th decode step from the first (0: never). None: every step when measuring
    # quality (the share varies 2x from step to step: a 32-step run sampled at 4 steps was 15% off), else
    # every 8th (timing runs, which feed no alpha axis)
    alpha_counts_every: int | None = None
    keep_logits: bool = False  # keep each step's last-position logits in the Generation

    def __post_init__(self) -> None:
        if self.alpha_counts_every is None:
            object.__setattr__(self, "alpha_counts_every", 1 if self.quality else 8)


TIMING_ONLY = Measurement()


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(what: str, nbytes: int, device: torch.device) -> None:
    free = available_bytes(device)
    if nbytes > free:
        raise InfinisimError(f"{what} needs {nbytes / 1e9:.1f} GB but the {device.type} has "
                             f"{free / 1e9:.1f} GB available")


class KVStore:
    """K and V of every layer for a batch, [batch, kv_heads, capacity, head_dim] each, in one memory."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, pin_memory: bool = False):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory) for _ in range(n_layers)]
        self.token_bytes = 2 * batch * n_kv_heads * head_dim * self.k[0].element_size()  # one position, one layer

    def write(self, layer: int, start: int, k: Tensor, v: Tensor, non_blocking: bool = False) -> None:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end].copy_(k, non_blocking=non_blocking)
        self.v[layer][:, :, start:end].copy_(v, non_blocking=non_blocking)


class CopyEngine:
    """Host<->device copies. On CUDA: their own streams, ordered with events; on CPU: a timed memcpy,
    or, over an emulated link (executor/link.py), copy-engine threads ordered the same way.

    Every copy is timed as its own phase ("h2d"/"d2h"); the compute stream's wait for a copy is
    timed as "wait" (zero on a CPU without a link, where copies are synchronous).
    """

    def __init__(self, device: torch.device, link: EmulatedLink | None = None):
        self.cuda, self.link = device.type == "cuda", link
        self.one_memory = not self.cuda and link is None  # a CPU without a link: "device" rows are host rows
        self.h2d_stream = torch.cuda.Stream(device) if self.cuda else None
        self.d2h_stream = torch.cuda.Stream(device) if self.cuda else None

    def _on_link(self, direction: str, pairs: list[tuple[Tensor, Tensor]], layer: int, rec: Recorder) -> Handle:
        assert self.link is not None
        after = [self.link.tail["d2h"]] if direction == "h2d" else []  # as the H2D stream waits for the D2H one
        return self.link.submit(direction, pairs, after,
                                lambda h: rec.add_copy(layer, direction, h.start, h.end, h.busy))

    def to_device(self, dst: list[Tensor], src: list[Tensor], layer: int, rec: Recorder) -> object:
        """Copy host tensors into device tensors; returns a handle for `wait`."""
        if self.link is not None:
            return self._on_link("h2d", list(zip(dst, src, strict=True)), layer, rec)
        if not self.cuda:
            with rec.span(layer, "h2d"):
                for d, s in zip(dst, src, strict=True):
                    d.copy_(s)
            return None
        stream = self.h2d_stream
        stream.wait_stream(torch.cuda.current_stream())  # the destination is free to overwrite
        stream.wait_stream(self.d2h_stream)  # rows written back last step have landed on the host
        with torch.cuda.stream(stream), rec.span(layer, "h2d", stream):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def wait(self, handle: object, layer: int, rec: Recorder) -> None:
        if handle is None:
            return
        with rec.span(layer, "wait"):
            if isinstance(handle, Handle):
                handle.synchronize()  # the compute thread blocks until the copy has landed
            else:
                torch.cuda.current_stream().wait_event(handle)

    def to_host(self, store: KVStore, layer: int, start: int, k: Tensor, v: Tensor, rec: Recorder) -> object:
        """Write rows back to the host store at positions [start, start + n), asynchronously on CUDA
        and over an emulated link; returns a handle whose `synchronize()` waits for them (or None)."""
        if self.link is not None:
            end = start + k.shape[2]
            return self._on_link("d2h", [(store.k[layer][:, :, start:end], k), (store.v[layer][:, :, start:end], v)],
                                 layer, rec)
        if not self.cuda:
            with rec.span(layer, "d2h"):
                store.write(layer, start, k, v)
            return None
        stream = self.d2h_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), rec.span(layer, "d2h", stream):
            store.write(layer, start, k, v, non_blocking=True)
        k.record_stream(stream)
        v.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done


@dataclass
class PolicyContext:
    """What a policy needs to place a run's KV cache."""

    n_layers: int
    batch: int
    n_kv_heads: int
    head_dim: int
    capacity: int  # positions per sequence: longest prompt + new tokens
    dtype: torch.dtype
    device: torch.device
    model: Transformer  # policies that speculate use later layers' weights
    measure: Measurement = TIMING_ONLY
    link: EmulatedLink | None = None  # CPU runs: host<->device copies over an emulated link

    def copy_engine(self) -> CopyEngine:
        return CopyEngine(self.device, self.link)

    def store(self, device: torch.device, pin_memory: bool = False, n_layers: int | None = None) -> KVStore:
        n_layers = self.n_layers if n_layers is None else n_layers
        nbytes = 2 * n_layers * self.batch * self.n_kv_heads * self.capacity * self.head_dim * self.dtype.itemsize
        check_fits(f"a KV cache of {self.batch} x {self.capacity} positions x {n_layers} layers", nbytes, device)
        return KVStore(n_layers, self.batch, self.n_kv_heads,
                       self.capacity, self.head_dim, self.dtype, device, pin_memory)

    @property
    def host_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def host_pinned(self) -> bool:
        return self.device.type == "cuda"
