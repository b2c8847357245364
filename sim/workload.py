"""What the simulator runs: per decode step and layer, how much KV each layer moves and attends.

Two sources: a trace (replay the fetch sizes the run really made) or a synthetic description
(any named model, batch and lengths; the fetched share of a speculating policy given
explicitly, or re-derived from a trace's uncapped within-alpha counts for another alpha or budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.traces.spec import DTYPE_BYTES, ModelSpec
from infinisim.traces.trace import Trace

POLICIES = ("resident", "full", "infinigen", "oracle", "h2o", "int4")
OFFLOADED = ("full", "infinigen", "oracle", "h2o", "int4")  # the KV cache lives in host memory
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {
    "infinigen": {"alpha": None, "partial_ratio": 0.3, "budget": 0.2, "dense_layers": 1, "pool_capacity": None},
    "h2o": {"budget": 0.2},
    "int4": {"group_size": 64},
}


@dataclass
class Workload:
    spec: ModelSpec
    dtype: str
    batch: int
    prompt_len: int  # positions of the (left-padded) prompt
    policy: str
    knobs: dict[str, Any]
    kv_len: np.ndarray  # [steps, layers] cache positions after each decode step
    fetched: np.ndarray  # [steps, layers] positions copied host->device per sequence
    attended: np.ndarray  # [steps, layers] positions each layer's attention ran over
    bytes_h2d: np.ndarray  # [steps, layers]
    bytes_d2h: np.ndarray  # [steps, layers]
    speculating: np.ndarray  # [layers] bool: rows chosen by speculation (infinigen/oracle)
    source: str = "synthetic"
    measured: dict[str, Any] = field(default_factory=dict)  # a trace's own times, for validation

    @property
    def n_steps(self) -> int:
        return self.kv_len.shape[0]

    @property
    def capacity(self) -> int:
        return self.prompt_len + self.n_steps

    @property
    def host_pinned(self) -> bool:
        return True  # the executor pins host KV whenever a GPU is present


def selected_share(w: Workload) -> float:
    """Mean share of its cached tokens a selecting layer fetches per decode step: what accuracy
    depends on. 1 for policies that fetch or keep the whole cache (int4: whole but quantized)."""
    if w.policy in ("infinigen", "oracle"):
        layers = w.speculating
    elif w.policy == "h2o":
        layers = np.ones(w.spec.n_layers, dtype=bool)
    else:
        return 1.0
    cached = (w.kv_len - 1).clip(min=1)
    return float((w.fetched / cached)[:, layers].mean()) if layers.any() else 1.0


def row_bytes(spec: ModelSpec, dtype: str, batch: int, policy: str, group_size: int = 64) -> int:
    """Bytes of one position of one layer's K and V for the batch, as the policy stores them."""
    d = spec.head_dim
    if policy == "int4":
        group = min(group_size, d)
        per_head = d // 2 + 2 * (d // group) * DTYPE_BYTES[dtype]  # codes + scale + minimum per group
        return 2 * batch * spec.n_kv_heads * per_head
    return 2 * batch * spec.n_kv_heads * d * DTYPE_BYTES[dtype]


def from_trace(trace: Trace) -> Workload:
    """The decode steps of a trace, as they ran."""
    run = trace.run
    decode = trace.layers[trace.layers["step"] > 0].sort_values(["step", "layer"])
    n_layers = trace.model.n_layers
    if decode.empty:
        raise InfinisimError("the trace has no decode steps to replay", field="steps")

    def grid(column: str) -> np.ndarray:
        return decode[column].to_numpy().reshape(-1, n_layers)

    spec_rows = decode[decode["step"] == decode["step"].min()]
    speculating = np.array([len(c) > 0 for c in spec_rows["alpha_counts"]]) if run["policy"] in (
        "infinigen", "oracle") else np.zeros(n_layers, dtype=bool)
    steps = trace.steps.set_index("step")
    measured = {"step_wall_s": steps.loc[steps["phase"] == "decode", "wall_s"].to_numpy(),
                "prefill_wall_s": float(steps.loc[steps["phase"] == "prefill", "wall_s"].sum()),
                "layers": decode}
    return Workload(trace.model, run["dtype"], int(run["batch"]), max(run["prompt_lens"]), run["policy"],
                    dict(run.get("policy_knobs") or {}), grid("kv_len"), grid("tokens_fetched"),
                    grid("tokens_attended"), grid("bytes_h2d"), grid("bytes_d2h"), speculating,
                    source="trace", measured=measured)


def fetched_fraction_per_layer(trace: Trace, alpha: float) -> np.ndarray:
    """From a speculating trace: per layer, the mean share of cached tokens within `alpha` of the
    max (uncapped; alpha rounded to 1..9, the counts a trace holds). NaN for non-speculating layers."""
    a = round(alpha)
    if not 1 <= a <= 9:
        raise InfinisimError(f"alpha {alpha} outside the 1..9 a trace records", field="alpha")
    decode = trace.layers[trace.layers["step"] > 0]
    out = np.full(trace.model.n_layers, np.nan)
    for layer, rows in decode.groupby("layer"):
        counts = [np.asarray(c).reshape(-1, 9)[:, a - 1].mean() for c in rows["alpha_counts"] if len(c)]
        if counts:
            cached = (rows["kv_len"].to_numpy()[:len(counts)] - 1).clip(min=1)
            out[layer] = float(np.mean(np.asarray(counts) / cached))
    if np.isnan(out).all():
        raise InfinisimError("the trace holds no within-alpha counts (not an infinigen/oracle trace)",
                             field="alpha_counts")
    return out


def mean_fetched_fraction(trace: Trace, alpha: float) -> float:
    """The uncapped share within `alpha`, averaged over the trace's speculating layers: what a model
    with a different layer count (or the planner's alpha axis) takes from a trace."""
    return float(np.nanmean(fetched_fraction_per_layer(trace, alpha)))


def synthetic(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, policy: str, dtype: str = "float16",
              knobs: dict[str, Any] | None = None, fetch_fraction: float | np.ndarray | None = None) -> Workload:
    """A workload from a description. For infinigen, `fetch_fraction` is the uncapped share of the
    cache each speculating layer wants (a number, or one per layer, e.g. from
    fetched_fraction_per_layer); the budget caps it, as in the executor."""
    if policy not in POLICIES:
        raise InfinisimError(f"unknown policy {policy!r} (known: {', '.join(POLICIES)})", field="policy")
    if dtype not in DTYPE_BYTES:
        raise InfinisimError(f"unknown dtype {dtype!r} ({', '.join(DTYPE_BYTES)})", field="dtype")
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("gen_len", gen_len)):
        if value < 1:
            raise InfinisimError(f"must be at least 1, got {value}", field=name)
    if spec.family == "opt" and prompt_len + gen_len > spec.max_positions:
        raise InfinisimError(f"prompt + generation = {prompt_len + gen_len} exceeds {spec.name}'s "
                             f"{spec.max_positions} positions", field="prompt_len")
    base = "infinigen" if policy == "oracle" else policy
    merged = {**DEFAULT_KNOBS.get(base, {}), **{k: v for k, v in (knobs or {}).items() if v is not None}}
    unknown = set(knobs or {}) - set(DEFAULT_KNOBS.get(base, {})) - {"alpha"}
    if unknown:
        raise InfinisimError(f"{policy} has no knob {sorted(unknown)[0]!r}", field="knobs")
    n_layers = spec.n_layers
    steps = np.arange(gen_len - 1)  # decode steps after the prefill's first token
    kv_len = np.repeat((prompt_len + 1 + steps)[:, None], n_layers, axis=1)
    cached = kv_len - 1
    row = row_bytes(spec, dtype, batch, policy, int(merged.get("group_size", 64)))
    speculating = np.zeros(n_layers, dtype=bool)
    if policy == "resident":
        fetched, attended = np.zeros_like(kv_len), kv_len.copy()
    elif policy in ("full", "int4"):
        fetched, attended = cached.copy(), kv_len.copy()
    elif policy == "h2o":
        kept = _budget(merged["budget"], prompt_len)
        fetched = np.full_like(kv_len, kept)
        attended = fetched + 1
    else:
        if fetch_fraction is None:
            raise InfinisimError(f"{policy} needs the fetched fraction: give it, or a trace to derive it from",
                                 field="fetch_fraction")
        dense = int(merged["dense_layers"])
        speculating[dense:] = True
        stored = cached if merged["pool_capacity"] is None else np.minimum(cached, int(merged["pool_capacity"]))
        fraction = np.broadcast_to(np.asarray(fetch_fraction, dtype=float), (n_layers,))
        fraction = np.where(np.isnan(fraction), np.nanmean(fraction), fraction)
        if (fraction < 0).any() or (fraction > 1).any():
            raise InfinisimError("must be within [0, 1]", field="fetch_fraction")
        want = np.ceil(stored * fraction[None, :]).astype(np.int64)
        cap = np.vectorize(lambda n: _budget(merged["budget"], n))(stored)
        fetched = np.where(speculating[None, :], np.clip(np.minimum(want, cap), 1, None), stored)
        attended = fetched + 1
    bytes_h2d = fetched.astype(np.int64) * row
    bytes_d2h = np.full_like(bytes_h2d, row if policy != "resident" else 0)
    return Workload(spec, dtype, batch, prompt_len, policy, merged, kv_len, fetched.astype(np.int64),
                    attended.astype(np.int64), bytes_h2d, bytes_d2h, speculating)


def _budget(budget: float, n_tokens: int) -> int:
    """The executor's cap: a fraction (<= 1) of the cached tokens, or a count."""
    if budget <= 0:
        raise InfinisimError(f"budget must be positive, got {budget}", field="budget")
    return max(1, math.ceil(n_tokens * budget)) if budget <= 1 else min(int(budget), n_tokens)
