"""Hardware profiles: one YAML file per machine, loaded into a validated `Profile`.

Quantities carry their unit in the YAML ("48 GB", "12.5 GB/s", "10 us", "154.8 TFLOP/s"), or are
plain numbers in the base unit (bytes, bytes/s, seconds, FLOP/s). The loader checks each field's
unit, its range, and that no unknown key is present, and names the file and field when it fails.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_mapping, read_yaml, write_text_atomic
from infinisim.hwprofiles.units import format_quantity, parse_quantity

BUILTIN_DIR = Path(__file__).resolve().parent / "data"
# the weight of wide_stream_sweep, (inner, outer): an output projection's shape (the LM head's, vocabulary-wide),
# whose streaming rate at a few rows differs from the square-ish projections' of stream_sweep (k x 2k)
WIDE_PROJECTION = (1024, 32768)


def _q(dimension: str, low: float = 0.0, high: float = math.inf, doc: str = "", optional: bool = False) -> Any:
    meta = {"dimension": dimension, "range": (low, high), "doc": doc}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def _n(low: float, high: float, doc: str = "", default: Any = MISSING) -> Any:
    return field(default=default, metadata={"dimension": "number", "range": (low, high), "doc": doc})


@dataclass(frozen=True)
class Device:
    """The accelerator (or, on a CPU-only machine, the CPU acting as one)."""

    name: str
    memory: float = _q("bytes", 1e6, doc="device memory")
    matmul_flops: float = _q("flops", 1e9, doc="peak dense 16-bit (fp16/bf16) matmul throughput")
    matmul_flops_fp32: float = _q("flops", 1e9, doc="peak dense float32 matmul throughput")
    memory_bandwidth: float = _q("bandwidth", 1e9, doc="peak device memory bandwidth")
    launch_overhead: float = _q("time", 0, 1e-2, doc="host time to issue one kernel")
    matmul_efficiency: float = _n(0.01, 1.0, "share of peak FLOP/s a matmul reaches")
    bandwidth_efficiency: float = _n(0.01, 1.0, "share of peak bandwidth a streaming kernel reaches")
    attention_efficiency: float = _n(0.01, 1.0, "share of peak bandwidth decode attention reaches over the KV")
    # Measured by calibrate; when absent, the simulator derives them from the fields above.
    matmul_sweep: tuple[tuple[float, float, float], ...] = ()  # (inner size, float32 FLOP/s, 16-bit FLOP/s)
    stream_sweep: tuple[tuple[float, float, float], ...] = ()  # (rows, inner size, B/s of weights): a grid
    # (rows, B/s of weights) of a WIDE_PROJECTION weight, more of them than the caches hold
    wide_stream_sweep: tuple[tuple[float, float], ...] = ()
    # prompt attention with a causal mask, FLOP/s counting all T x T scores, by prompt length T
    prefill_attention_sweep: tuple[tuple[float, float], ...] = ()
    # InfiniGen's speculation of one layer, measured on the executor's own code on a narrow model (so
    # its projections cost nothing): seconds by speculated scores (batch x query heads x cached keys)
    speculation_sweep: tuple[tuple[float, float], ...] = ()
    # the executor's own prefill of traces.spec.CALIBRATION_BLOCK, batch 1, in the calibration's dtype: seconds
    # per layer of its attention phase (projections, RoPE, masked attention) and of its FFN, by prompt length
    prefill_block_sweep: tuple[tuple[float, float, float], ...] = ()
    # the same block's decode steps: seconds per layer of its FFN (weights streamed), by rows in the batch
    decode_block_sweep: tuple[tuple[float, float], ...] = ()
    block_shards: int = _n(1, 64, "the block sweeps ran on one of this many tensor-parallel shards of the block "
                                  "(calibrate --tp), between its all-reduces", default=1)
    # a one-row projection by a weight just read (in cache): B/s of weights by weight bytes
    cached_stream_sweep: tuple[tuple[float, float], ...] = ()
    selection_per_score: float | None = _q("time", 0, 1e-3, doc="InfiniGen's count-and-choose per speculated score",
                                           optional=True)
    skew_per_row: float | None = _q("time", 0, 1e-3, doc="building InfiniGen's skew: per query row per KV head",
                                    optional=True)
    decode_layer_host: float | None = _q("time", 0, 1e-2, doc="host time per decode layer outside its timed phases "
                                         "(the layer's Python, the policy's hooks, the timing itself), in the "
                                         "executor's own one-row decode of the calibration block, resident",
                                         optional=True)
    skew_per_head: float | None = _q("time", 0, 1.0, doc="building InfiniGen's skew: fixed cost per KV head (the "
                                     "SVD's and column choice's own), beside the per-row cost", optional=True)


@dataclass(frozen=True)
class Link:
    """The host<->device interconnect. Copy time = latency + bytes / bandwidth, or, where a
    measured sweep is given, the sweep's effective bandwidth at that size (log-interpolated)."""

    name: str
    h2d_bandwidth: float = _q("bandwidth", 1e6, doc="host->device, pinned host memory, large copies")
    d2h_bandwidth: float = _q("bandwidth", 1e6, doc="device->host, pinned, large copies")
    pageable_bandwidth: float = _q("bandwidth", 1e6, doc="either direction from pageable host memory")
    latency: float = _q("time", 0, 1e-2, doc="fixed cost of one copy")
    duplex: bool = True  # both directions at full bandwidth at once
    emulated: bool = False  # a CPU machine's emulated link: copies on threads, beside the compute thread
    sweep: tuple[tuple[float, float, float], ...] = ()  # (bytes, h2d B/s, d2h B/s), ascending sizes


@dataclass(frozen=True)
class Host:
    name: str
    cores: int = _n(1, 4096, "CPU cores")
    memory: float = _q("bytes", 1e6, doc="host memory")
    memory_bandwidth: float = _q("bandwidth", 1e8, doc="peak host memory bandwidth")
    gather_bandwidth: float = _q("bandwidth", 1e6, doc="gathering scattered KV rows into a staging buffer")


@dataclass(frozen=True)
class Node:
    """Several identical GPUs in one machine (tensor parallelism): how they talk to each other, and how
    many share one upstream host link (a PCIe switch). Each GPU has the profile's device and link."""

    gpus: int = _n(2, 64, "GPUs in the node")
    interconnect: str
    interconnect_bandwidth: float = _q("bandwidth", 1e8, doc="GPU-to-GPU bus bandwidth per GPU per direction "
                                                             "(what a ring all-reduce moves at)")
    interconnect_latency: float = _q("time", 0, 1e-3, doc="one step of a ring all-reduce")
    gpus_per_host_link: int = _n(1, 64, "GPUs behind one upstream host link (a PCIe switch); 1: each its own")
    # the link's and host's figures were measured with every GPU copying at once (`calibrate --tp`: all ranks
    # calibrate together), so they are one GPU's share already; False: one GPU's alone (datasheets), shared here
    measured_together: bool = False


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # "gpu", or "cpu": a CPU-only machine (the executor's "device" is a second buffer in RAM)
    description: str
    sources: tuple[str, ...]
    device: Device
    link: Link
    host: Host
    path: str = ""
    memcpy: Profile | None = None  # with an emulated link: the profile as calibrated (copies within RAM)
    node: Node | None = None  # a multi-GPU machine (tensor parallelism); None: one GPU

    @property
    def host_computes(self) -> bool:
        """CPU-only: the host thread does the compute and the speculation itself."""
        return self.kind == "cpu"

    @property
    def synchronous(self) -> bool:
        """CPU-only without an emulated link: copies are memcpys on the compute thread, nothing overlaps."""
        return self.kind == "cpu" and not self.link.emulated

    def serial_phases(self) -> tuple[str, ...]:
        """Phases beside the compute stream that the compute thread does in turn (not overlapped)."""
        if self.synchronous:
            return ("spec", "gather", "h2d", "d2h")
        return ("spec", "gather") if self.host_computes else ()

    def with_link(self, bandwidth: float, latency: float, duplex: bool, name: str) -> Profile:
        """This machine's profile with its copies over an emulated link (executor/link.py)."""
        link = Link(name=f"emulated {name}", h2d_bandwidth=bandwidth, d2h_bandwidth=bandwidth,
                    pageable_bandwidth=bandwidth, latency=latency, duplex=duplex, emulated=True)
        return replace(self, link=link, name=f"{self.name}+link", memcpy=self.memcpy or self)

    def for_tensor_parallel(self, tp: int) -> Profile:
        """What one of `tp` GPUs offloading at once sees: its link's share of a shared upstream link
        and of the host's memory bandwidth (all GPUs copy and gather at the same time). A profile
        measured with its GPUs copying together has those shares in its figures already."""
        if tp == 1:
            return self
        if self.node is None or tp > self.node.gpus:
            have = self.node.gpus if self.node else 1
            raise InfinisimError(f"tensor parallelism {tp} needs {tp} GPUs; profile {self.name} has {have}",
                                 field="--tp")
        if self.node.measured_together:
            return self
        sharing = min(tp, self.node.gpus_per_host_link)
        dram = self.host.memory_bandwidth / tp

        def share(bandwidth: float) -> float:
            return min(bandwidth / sharing, dram)

        link = replace(self.link, h2d_bandwidth=share(self.link.h2d_bandwidth),
                       d2h_bandwidth=share(self.link.d2h_bandwidth),
                       pageable_bandwidth=share(self.link.pageable_bandwidth),
                       sweep=tuple((b, share(h), share(d)) for b, h, d in self.link.sweep))
        host = replace(self.host, gather_bandwidth=min(self.host.gather_bandwidth, dram))
        return replace(self, link=link, host=host)

    def all_gather_seconds(self, nbytes: Any, tp: int) -> Any:
        """A ring all-gather of `nbytes` in all (each GPU contributes nbytes / tp) over `tp` GPUs: tp-1
        steps of latency, (tp-1)/tp of the bytes over the interconnect."""
        if tp == 1 or self.node is None:
            return 0.0
        node = self.node
        return (tp - 1) * node.interconnect_latency + (tp - 1) / tp * nbytes / node.interconnect_bandwidth

    def all_reduce_seconds(self, nbytes: Any, tp: int) -> Any:
        """A ring all-reduce of `nbytes` over `tp` GPUs: a reduce-scatter, then an all-gather, each as
        long as `all_gather_seconds`: 2(tp-1) steps of latency, 2(tp-1)/tp of the bytes each way."""
        return 2 * self.all_gather_seconds(nbytes, tp)

    def matmul_rate(self, dtype: str) -> float:
        peak = self.device.matmul_flops_fp32 if dtype == "float32" else self.device.matmul_flops
        return peak * self.device.matmul_efficiency

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, quantities with their units (as the shipped profiles are written)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description,
                               "sources": list(self.sources)}
        for part in ("device", "link", "host", "node"):
            obj = getattr(self, part)
            if obj is None:
                continue
            section: dict[str, Any] = {}
            for f in fields(obj):
                value, dimension = getattr(obj, f.name), f.metadata.get("dimension")
                if f.name in SWEEPS:
                    keys, dims = SWEEPS[f.name]
                    value = [{k: format_quantity(v, d) for k, v, d in zip(keys, point, dims, strict=True)}
                             for point in value]
                elif dimension is not None and value is not None:
                    value = format_quantity(value, dimension)
                elif f.type == "bool" and f.default is False and not value:
                    continue  # a flag off by default is written only when on (emulated link, node measured together)
                section[f.name] = value
            out[part] = {k: v for k, v in section.items() if v not in (None, [])}
        return out


# the measured tables: their keys and each key's dimension
SWEEPS = {"sweep": (("bytes", "h2d", "d2h"), ("bytes", "bandwidth", "bandwidth")),
          "matmul_sweep": (("size", "float32", "bfloat16"), ("number", "flops", "flops")),
          "prefill_attention_sweep": (("tokens", "flops"), ("number", "flops")),
          "speculation_sweep": (("scores", "seconds"), ("number", "time")),
          "prefill_block_sweep": (("tokens", "attn", "ffn"), ("number", "time", "time")),
          "decode_block_sweep": (("rows", "ffn"), ("number", "time")),
          "cached_stream_sweep": (("bytes", "bandwidth"), ("bytes", "bandwidth")),
          "wide_stream_sweep": (("rows", "bandwidth"), ("number", "bandwidth")),
          "stream_sweep": (("rows", "inner", "bandwidth"), ("number", "number", "bandwidth"))}


def _section(cls: type, data: Any, path: Path, where: str) -> Any:
    if not isinstance(data, dict):
        raise InfinisimError("must be a mapping", path, where)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise InfinisimError(f"unknown key (known: {', '.join(known)})", path, f"{where}.{key}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            if f.default is not MISSING:
                continue
            raise InfinisimError("missing field", path, f"{where}.{name}")
        raw, dimension = data[name], f.metadata.get("dimension")
        if name == "stream_sweep":
            values[name] = _grid(raw, path, f"{where}.stream_sweep")
            continue
        if name in SWEEPS:
            keys, dims = SWEEPS[name]
            values[name] = _sweep(raw, path, f"{where}.{name}", keys, (dims[0], dims[1]))
            continue
        if dimension is None:
            expected = bool if f.type == "bool" else str
            if not isinstance(raw, expected):
                raise InfinisimError(f"must be a {expected.__name__}, got {raw!r}", path, f"{where}.{name}")
            values[name] = raw
            continue
        try:
            value = _number(raw) if dimension == "number" else parse_quantity(raw, dimension)
        except ValueError as exc:
            raise InfinisimError(str(exc), path, f"{where}.{name}") from None
        low, high = f.metadata["range"]
        if not low <= value <= high:
            raise InfinisimError(f"{raw!r} is out of range [{low:g}, {high:g}] ({f.metadata['doc']})", path,
                                 f"{where}.{name}")
        values[name] = int(value) if f.type == "int" else value  # counts (cores, GPUs, shards)
    return cls(**values)


def _number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"expected a plain number, got {raw!r}")
    return float(raw)


def _sweep(raw: Any, path: Path, where: str, keys: tuple[str, ...], dimensions: tuple[str, str]
           ) -> tuple[tuple[float, ...], ...]:
    """A measured table: points of (size, value, ...), sizes ascending."""
    if not isinstance(raw, list) or not raw:
        raise InfinisimError(f"must be a non-empty list of {{{', '.join(keys)}}}", path, where)
    points = []
    for i, point in enumerate(raw):
        if not isinstance(point, dict) or set(point) != set(keys):
            raise InfinisimError(f"each point needs exactly {', '.join(keys)}", path, f"{where}[{i}]")
        try:
            size = _number(point[keys[0]]) if dimensions[0] == "number" else parse_quantity(point[keys[0]],
                                                                                           dimensions[0])
            values = tuple(parse_quantity(point[k], dimensions[1]) for k in keys[1:])
        except ValueError as exc:
            raise InfinisimError(str(exc), path, f"{where}[{i}]") from None
        if size <= 0 or min(values) <= 0:
            raise InfinisimError("sizes and values must be positive", path, f"{where}[{i}]")
        points.append((size, *values))
    if any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
        raise InfinisimError("sizes must be strictly ascending", path, where)
    return tuple(points)


def _grid(raw: Any, path: Path, where: str) -> tuple[tuple[float, float, float], ...]:
    """A measured grid of (rows, inner size, bandwidth): every rows x inner pair once."""
    if not isinstance(raw, list) or not raw:
        raise InfinisimError("must be a non-empty list of {rows, inner, bandwidth}", path, where)
    points = []
    for i, point in enumerate(raw):
        if not isinstance(point, dict) or set(point) != {"rows", "inner", "bandwidth"}:
            raise InfinisimError("each point needs exactly rows, inner, bandwidth", path, f"{where}[{i}]")
        try:
            rows, inner = _number(point["rows"]), _number(point["inner"])
            bandwidth = parse_quantity(point["bandwidth"], "bandwidth")
        except ValueError as exc:
            raise InfinisimError(str(exc), path, f"{where}[{i}]") from None
        if rows <= 0 or inner <= 0 or bandwidth <= 0:
            raise InfinisimError("rows, inner size and bandwidth must be positive", path, f"{where}[{i}]")
        points.append((rows, inner, bandwidth))
    rows, inners = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    if len(points) != len(rows) * len(inners) or len(set((p[0], p[1]) for p in points)) != len(points):
        raise InfinisimError("must hold each rows x inner pair exactly once (a full grid)", path, where)
    return tuple(sorted(points))


TOP_KEYS = ("name", "kind", "description", "sources", "device", "link", "host")


def profile_from_dict(data: Any, path: Path) -> Profile:
    check_mapping(data, path, (*TOP_KEYS, "node"), TOP_KEYS, "a profile must be a YAML mapping")
    if not isinstance(data["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", data["name"]):
        raise InfinisimError("must be a name of letters, digits, '.', '_' or '-'", path, "name")
    if data["kind"] not in ("gpu", "cpu"):
        raise InfinisimError(f"must be 'gpu' or 'cpu', got {data['kind']!r}", path, "kind")
    if not isinstance(data["description"], str):
        raise InfinisimError("must be a string", path, "description")
    sources = data["sources"]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
        raise InfinisimError("must be a non-empty list of strings (where each number comes from)", path, "sources")
    return Profile(data["name"], data["kind"], data["description"], tuple(sources),
                   _section(Device, data["device"], path, "device"), _section(Link, data["link"], path, "link"),
                   _section(Host, data["host"], path, "host"), str(path),
                   node=_section(Node, data["node"], path, "node") if "node" in data else None)


def builtin_profiles(single_gpu: bool = False) -> dict[str, Path]:
    """The shipped profiles by name (`single_gpu`: without the multi-GPU nodes)."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}
    if single_gpu:
        return {name: path for name, path in found.items() if load_profile(path).node is None}
    return found


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or a YAML file by path."""
    path = Path(name_or_path)
    shipped = builtin_profiles()
    if not path.exists() and str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    if not path.exists():
        raise InfinisimError(f"no such profile (shipped: {', '.join(shipped)}; or give a YAML file)", name_or_path)
    return profile_from_dict(read_yaml(path, "profile file"), path)


def write_profile(profile: Profile, path: str | Path) -> Path:
    """Atomic write (temp + rename), like traces: an interrupted calibrate leaves no half profile."""
    return write_text_atomic(path, yaml.safe_dump(profile.to_dict(), sort_keys=False))
