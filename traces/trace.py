"""The trace file: one Parquet file, one row per (step, layer), with a JSON header in its metadata.

See docs/TRACE_FORMAT.md for the fields and units. Writes are atomic (temporary name, then
rename); reads validate everything and fail with one line naming the file and field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infinisim.core.errors import InfinisimError
from infinisim.core.files import atomic_path
from infinisim.traces.spec import ModelSpec

SCHEMA_NAME = "infinisim-trace"
SCHEMA_VERSION = 2  # 2: serving traces (run.serving and the iteration fields of steps); 1 still reads
READABLE_VERSIONS = (1, 2)
METADATA_KEY = b"infinisim"

# (step, layer) rows. Times in seconds, bytes in bytes, token counts per sequence.
LAYER_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int32(),
    "layer": pa.int32(),
    "kv_len": pa.int32(),  # cache positions after this step (padded batch)
    "tokens_fetched": pa.int32(),  # positions copied host->device for this layer
    "tokens_attended": pa.int32(),  # positions this layer's attention ran over
    "bytes_h2d": pa.int64(),
    "bytes_d2h": pa.int64(),
    "attn_s": pa.float64(),
    "ffn_s": pa.float64(),
    "h2d_s": pa.float64(),
    "d2h_s": pa.float64(),
    "wait_s": pa.float64(),
    "spec_s": pa.float64(),
    "gather_s": pa.float64(),
    "comm_s": pa.float64(),  # tensor parallelism: this rank's all-reduces of the layer (0 on one process)
    # speculating policies: per KV head, the uncapped count of tokens within alpha of the max for
    # alpha = 1..9 (mean over the batch and the group's query heads), flattened [kv_head][alpha]
    "alpha_counts": pa.list_(pa.float32()),
    # with --quality, selective policies: per query head (mean over the batch) the share of exact
    # attention mass on the rows attended, and the overlap of the fetched rows with the exact top rows
    "recall": pa.list_(pa.float32()),
    "topk_overlap": pa.list_(pa.float32()),
    # with --record-selection, selective policies: the rows fetched, per sequence then KV head, each
    # as n followed by n gaps between sorted positions (small numbers, which zstd packs well);
    # see encode_selection / decode_selection
    "selected": pa.list_(pa.int32()),
    # every host<->device copy of the layer in the step: direction (0 h2d, 1 d2h), start and end in
    # seconds from the step's start, flattened; overlap with compute can be read off it
    "copies": pa.list_(pa.float64()),
    "done_s": pa.float64(),  # when the layer's compute (its FFN) ended, seconds from the step's start
}
OPTIONAL_COLUMNS = ("selected", "copies", "done_s", "comm_s")  # traces written before a column existed read as empty/0
LIST_COLUMNS = tuple(name for name, dtype in LAYER_COLUMNS.items() if pa.types.is_list(dtype))
STEP_FIELDS = ("step", "phase", "n_new", "kv_len", "wall_s", "embed_s", "head_s", "nll", "evicted")
# a serving trace's steps (one forward each: a request's prefill, or a decode step of the running batch) also
# say which scheduler iteration they belong to, when it started (s after the stream's start), how many
# sequences it ran and how many requests waited
SERVING_STEP_FIELDS = ("iteration", "start_s", "batch", "waiting")


def step_fields(run: dict[str, Any]) -> tuple[str, ...]:
    """The fields of a step in a trace of this run: a serving trace's carry its iteration's too."""
    return STEP_FIELDS + (SERVING_STEP_FIELDS if run.get("serving") is not None else ())

RUN_FIELDS = ("policy", "policy_knobs", "batch", "prompt_lens", "gen_len", "dtype", "device", "sampling", "weights")
ENV_FIELDS = ("device_name", "torch", "python", "host", "created")
SERVING_FIELDS = ("stream", "scheduler", "requests", "preemptions", "rejected")
SERVING_REQUEST_FIELDS = ("id", "arrival_s", "prompt_len", "gen_len", "admitted_s", "first_token_s", "finished_s",
                          "preemptions")


@dataclass
class Trace:
    model: ModelSpec
    run: dict[str, Any]
    environment: dict[str, Any]
    steps: pd.DataFrame  # one row per step: STEP_FIELDS
    layers: pd.DataFrame  # one row per (step, layer): LAYER_COLUMNS

    @property
    def serving(self) -> dict[str, Any] | None:
        """A live server's trace (`run --requests`): the stream, the scheduler and every request's times."""
        return self.run.get("serving")

    def header(self) -> dict[str, Any]:
        return {"schema": SCHEMA_NAME, "version": SCHEMA_VERSION, "model": self.model.to_dict(), "run": self.run,
                "environment": self.environment, "steps": self.steps[list(step_fields(self.run))].to_dict("records")}

    def decode_steps(self) -> pd.DataFrame:
        return self.steps[self.steps["phase"] == "decode"]


def _content_hash(header: dict[str, Any], table: pa.Table) -> str:
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for name in table.column_names:
        digest.update(name.encode())
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            digest.update(np.ascontiguousarray(column.offsets.to_numpy()).tobytes())
            column = column.flatten()
        digest.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write atomically: an interrupted write leaves the old file (or none), never half a trace."""
    path = Path(path)
    missing = [c for c in LAYER_COLUMNS if c not in trace.layers.columns]
    if missing:
        raise InfinisimError("layer rows lack a column", path, missing[0])
    table = pa.Table.from_pandas(trace.layers[list(LAYER_COLUMNS)], schema=pa.schema(LAYER_COLUMNS),
                                 preserve_index=False)
    header = trace.header()
    header["content_hash"] = _content_hash(header, table)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(header, default=str).encode()})
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        pq.write_table(table, f, compression="zstd")
    return path


def trace_filename(trace: Trace, knobs: dict[str, Any] | None = None) -> str:
    """The standard name of a trace: model, policy, the knobs set explicitly (so runs at different
    settings do not overwrite each other), the share of weights streamed from the host, batch,
    prompt and generation lengths."""
    run = trace.run
    tags = "".join(f"-{k.replace('_', '')}{v:g}" if isinstance(v, int | float) else f"-{k.replace('_', '')}{v}"
                   for k, v in sorted((knobs or {}).items()) if v is not None)
    if run.get("weights_on_host"):
        tags += f"-wh{run['weights_on_host']:.2g}"
    if run.get("tp"):  # one trace per tensor-parallel rank
        tags += f"-tp{run['tp']['degree']}r{run['tp']['rank']}"
    if run.get("serving"):  # a live server's: at most `batch` running, the longest prompt and output
        tags += f"-serve{len(run['prompt_lens'])}"
    return (f"{trace.model.name}-{run['policy']}{tags}-b{run['batch']}-p{max(run['prompt_lens'])}"
            f"-g{run['gen_len']}.trace.parquet")


def encode_selection(indices: np.ndarray, keep: np.ndarray) -> list[int]:
    """Rows one layer fetched, [B, G, n] positions with a [B, G, n] keep mask, as one flat list:
    per (sequence, KV head) the kept count, then the gaps between the sorted kept positions."""
    out: list[int] = []
    for rows, kept in zip(indices.reshape(-1, indices.shape[-1]), keep.reshape(-1, keep.shape[-1]), strict=True):
        positions = np.sort(rows[kept])
        out.append(len(positions))
        out.extend(np.diff(positions, prepend=0).tolist())
    return out


def decode_selection(values: list[int] | np.ndarray, batch: int, n_kv_heads: int) -> list[list[np.ndarray]]:
    """Inverse of encode_selection: [sequence][kv_head] -> sorted positions."""
    values = np.asarray(values, dtype=np.int64)
    out, at = [], 0
    for _ in range(batch):
        heads = []
        for _ in range(n_kv_heads):
            if at >= len(values):
                raise ValueError(f"selection list ends early ({len(values)} values for {batch} x {n_kv_heads})")
            n = int(values[at])
            heads.append(np.cumsum(values[at + 1:at + 1 + n]))
            at += 1 + n
        out.append(heads)
    if at != len(values):
        raise ValueError(f"selection list has {len(values) - at} values left over")
    return out


def _require(mapping: Any, keys: tuple[str, ...], path: Path, where: str) -> None:
    if not isinstance(mapping, dict):
        raise InfinisimError("must be a mapping", path, where)
    for key in keys:
        if key not in mapping:
            raise InfinisimError("missing field", path, f"{where}.{key}")


def read_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.exists():
        raise InfinisimError("no such trace file", path)
    if not path.is_file():
        raise InfinisimError("not a trace file (a folder or a device)", path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for truncated or foreign files
        raise InfinisimError(f"not a readable trace (truncated, or not Parquet: {type(exc).__name__})", path) from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise InfinisimError("not an infinisim trace (no header in the Parquet metadata)", path, "infinisim")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InfinisimError(f"header is not valid JSON ({exc})", path, "header") from None
    _require(header, ("schema", "version", "model", "run", "environment", "steps", "content_hash"), path, "header")
    if header["schema"] != SCHEMA_NAME:
        raise InfinisimError(f"schema is {header['schema']!r}, expected {SCHEMA_NAME!r}", path, "header.schema")
    if header["version"] not in READABLE_VERSIONS:
        raise InfinisimError(f"schema version {header['version']} is not supported (this infinisim reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))})", path, "header.version")
    try:
        model = ModelSpec.from_dict(header["model"])
    except (TypeError, KeyError, ValueError) as exc:
        raise InfinisimError(f"invalid model spec ({exc})", path, "header.model") from None
    _require(header["run"], RUN_FIELDS, path, "header.run")
    _require(header["environment"], ENV_FIELDS, path, "header.environment")
    if not isinstance(header["steps"], list) or not header["steps"]:
        raise InfinisimError("must be a non-empty list", path, "header.steps")
    serving = header["run"].get("serving")
    if serving is not None:
        _require(serving, SERVING_FIELDS, path, "header.run.serving")
        _require(serving["requests"], SERVING_REQUEST_FIELDS, path, "header.run.serving.requests")
    fields = step_fields(header["run"])
    for i, step in enumerate(header["steps"]):
        _require(step, fields, path, f"header.steps[{i}]")
    present = [name for name in LAYER_COLUMNS if name in table.column_names or name not in OPTIONAL_COLUMNS]
    for name in present:
        dtype = LAYER_COLUMNS[name]
        if name not in table.column_names:
            raise InfinisimError("missing column", path, name)
        if table.schema.field(name).type != dtype:
            raise InfinisimError(f"column has type {table.schema.field(name).type}, expected {dtype}", path, name)
    stored_hash = header.pop("content_hash")
    if _content_hash(header, table.select(present)) != stored_hash:
        raise InfinisimError("does not match the contents (file modified or corrupted)", path, "header.content_hash")
    for name in OPTIONAL_COLUMNS:
        if name not in table.column_names:
            empty = [] if name in LIST_COLUMNS else 0.0
            table = table.append_column(pa.field(name, LAYER_COLUMNS[name]),
                                        pa.array([empty] * table.num_rows, LAYER_COLUMNS[name]))
    steps = pd.DataFrame(header["steps"], columns=list(fields))
    layers = table.select(list(LAYER_COLUMNS)).to_pandas()
    for name in LIST_COLUMNS:  # plain lists, as the writer was given (pandas would hold numpy arrays)
        layers[name] = table.column(name).to_pylist()
    if len(layers) != len(steps) * model.n_layers:
        raise InfinisimError(f"{len(layers)} layer rows, expected steps x layers = {len(steps)} x {model.n_layers}",
                             path, "rows")
    return Trace(model, header["run"], header["environment"], steps, layers)
