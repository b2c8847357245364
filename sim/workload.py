"""What the simulator runs: per decode step and layer, how much KV each layer moves and attends.

Two sources: a trace (replay the fetch sizes the run really made) or a synthetic description
(any named model, batch and lengths; the speculated fraction of a speculating policy given
explicitly, or re-derived from a trace's uncapped within-alpha counts for another alpha or budget).

Words used throughout: the *speculated* fraction is the share of its cached tokens a speculating
layer wants (within alpha, before the budget's cap); the *fetched* fraction is the share a
selecting layer really fetches (after the cap); the *attended* fraction is the share of the cache
a layer's attention runs over (every layer, the newest row included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import Knobs, policy
from infinisim.sim.policies import SIM_POLICIES, SimPolicy
from infinisim.traces.spec import DTYPE_BYTES, ModelSpec, Shard
from infinisim.traces.trace import Trace

MAX_CELLS = 20_000_000  # decode steps x layers a simulation holds (a workload and its results per step-layer)
CELL_BYTES = 136  # five int64 arrays of the workload, ten float64 phases of the result, one bool


@dataclass
class Workload:
    spec: ModelSpec
    dtype: str
    batch: int
    prompt_len: int  # positions of the (left-padded) prompt
    policy: str
    knobs: Knobs  # the policy's, from the registry (defaults filled in)
    kv_len: np.ndarray  # [steps, layers] cache positions after each decode step
    fetched: np.ndarray  # [steps, layers] positions copied host->device per sequence
    attended: np.ndarray  # [steps, layers] positions each layer's attention ran over
    bytes_h2d: np.ndarray  # [steps, layers]
    bytes_d2h: np.ndarray  # [steps, layers]
    speculating: np.ndarray  # [layers] bool: rows chosen by speculation (infinigen/oracle)
    source: str = "synthetic"
    measured: dict[str, Any] = field(default_factory=dict)  # a trace's own times, for validation
    weights_on_host: float = 0.0  # share of each block's weights kept in host memory, streamed in a layer ahead
    tp: int = 1  # tensor parallelism: `spec` is then one GPU's shard (ModelSpec.shard), all GPUs alike
    unsharded: ModelSpec | None = None  # the whole model (synthetic workloads: what another degree would shard)
    sequences_apart: bool = False  # decode steps of a live server: each sequence attends by itself (sim.costs)

    @property
    def n_steps(self) -> int:
        return self.kv_len.shape[0]

    @property
    def capacity(self) -> int:
        return self.prompt_len + self.n_steps

    @property
    def host_pinned(self) -> bool:
        return True  # the executor pins host KV whenever a GPU is present

    @cached_property
    def kv_policy(self) -> SimPolicy:
        """How the simulator runs this workload's policy."""
        return SIM_POLICIES[self.policy](self.knobs)


def fetched_fraction(w: Workload) -> float:
    """Mean share of its cached tokens a selecting layer fetches per decode step (after the
    budget's cap): what accuracy depends on. 1 for policies that fetch or keep the whole cache
    (int4: whole but quantized)."""
    layers = w.kv_policy.selecting(w)
    if not layers.any():
        return 1.0
    if not w.n_steps:
        return float("nan")  # nothing decoded, nothing fetched
    cached = (w.kv_len - 1).clip(min=1)
    return float((w.fetched / cached)[:, layers].mean())


def from_trace(trace: Trace) -> Workload:
    """The decode steps of a trace, as they ran."""
    run = trace.run
    if trace.serving:
        raise InfinisimError("a live server's trace (run --requests) is a request stream, not one batch: compare it "
                             "with `infinisim validate --requests`", field="run.serving")
    decode = trace.layers[trace.layers["step"] > 0].sort_values(["step", "layer"])
    n_layers = trace.model.n_layers
    if decode.empty:
        raise InfinisimError("the trace has no decode steps to replay", field="steps")

    def grid(column: str) -> np.ndarray:
        return decode[column].to_numpy().reshape(-1, n_layers)

    kv = policy(run["policy"])
    first = decode[decode["step"] == decode["step"].min()]  # a speculating layer's rows were speculated for it
    speculating = ((first["spec_s"].to_numpy() > 0) | (first["alpha_counts"].map(len).to_numpy() > 0)) \
        if kv.speculating else np.zeros(n_layers, dtype=bool)
    steps = trace.steps.set_index("step")
    decoding = steps["phase"] == "decode"
    measured = {"step_wall_s": steps.loc[decoding, "wall_s"].to_numpy(),
                "serial": ("spec", "gather") + (("h2d", "d2h") if not run.get("link") else ())
                if run["device"] != "cuda" else (),
                "prefill_wall_s": float(steps.loc[steps["phase"] == "prefill", "wall_s"].sum()),
                "layers": decode}
    try:
        knobs = kv.make_knobs(run.get("policy_knobs") or {})
    except InfinisimError as exc:
        raise InfinisimError(f"policy knobs: {exc}", field="header.run.policy_knobs") from None
    shard = Shard.from_dict(run["tp"]) if run.get("tp") else None  # a tensor-parallel rank's trace
    spec = shard.spec(trace.model) if shard else trace.model
    return Workload(spec, run["dtype"], int(run["batch"]), max(run["prompt_lens"]), run["policy"],
                    knobs, grid("kv_len"), grid("tokens_fetched"),
                    grid("tokens_attended"), grid("bytes_h2d"), grid("bytes_d2h"), speculating,
                    source="trace", measured=measured, weights_on_host=float(run.get("weights_on_host") or 0.0),
                    tp=shard.tp if shard else 1)


def speculated_fraction_per_layer(trace: Trace, alpha: float) -> np.ndarray:
    """From a speculating trace: per layer, the mean share of cached tokens within `alpha` of the
    max (uncapped; alpha rounded to 1..9, the counts a trace holds). NaN for non-speculating layers."""
    a = round(alpha)
    if not 1 <= a <= 9:
        raise InfinisimError(f"alpha {alpha:g} is outside the 1..9 a trace records its counts at (a trace run at "
                             "another alpha needs --alpha)", field="--alpha")
    decode = trace.layers[trace.layers["step"] > 0]
    out = np.full(trace.model.n_layers, np.nan)
    for layer, rows in decode.groupby("layer"):
        rows = rows[rows["alpha_counts"].map(len) > 0]  # the steps measured (every n-th)
        if len(rows):
            counts = np.array([np.asarray(c).reshape(-1, 9)[:, a - 1].mean() for c in rows["alpha_counts"]])
            out[layer] = float(np.mean(counts / (rows["kv_len"].to_numpy() - 1).clip(min=1)))
    if np.isnan(out).all():
        raise InfinisimError("the trace holds no within-alpha counts (not an infinigen/oracle trace)",
                             field="alpha_counts")
    return out


def mean_speculated_fraction(trace: Trace, alpha: float) -> float:
    """The uncapped share within `alpha`, averaged over the trace's speculating layers: what a model
    with a different layer count (or the planner's alpha axis) takes from a trace."""
    return float(np.nanmean(speculated_fraction_per_layer(trace, alpha)))


def speculated_by_alpha(trace: Trace) -> tuple[float, ...]:
    """The trace's mean speculated fraction at alpha = 1..9 (the planner's alpha axis reads it)."""
    return tuple(mean_speculated_fraction(trace, a) for a in range(1, 10))


def synthetic(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, policy_name: str, dtype: str = "float16",
              knobs: dict[str, Any] | None = None, speculated_fraction: float | np.ndarray | None = None,
              weights_on_host: float = 0.0, tp: int = 1) -> Workload:
    """A workload from a description. For a speculating policy, `speculated_fraction` is the
    uncapped share of the cache each speculating layer wants (a number, or one per layer, e.g. from
    speculated_fraction_per_layer); the budget caps it, as in the executor. `knobs`: the policy's
    (None: its default; other policies' knobs are ignored). `tp`: tensor parallelism, the workload of one
    of `tp` GPUs."""
    policy(policy_name)  # an unknown name is the first error
    if dtype not in DTYPE_BYTES:
        raise InfinisimError(f"unknown dtype {dtype!r} ({', '.join(DTYPE_BYTES)})", field="--dtype")
    for name, value in (("--batch", batch), ("--prompt-len", prompt_len), ("--gen-len", gen_len)):
        if value < 1:
            raise InfinisimError(f"must be at least 1, got {value}", field=name)
    if gen_len * spec.n_layers > MAX_CELLS:
        raise InfinisimError(f"{gen_len} steps x {spec.n_layers} layers is too long to simulate step by step (at "
                             f"most {MAX_CELLS:,} step-layers, about {MAX_CELLS * CELL_BYTES / 1e9:.0f} GB)",
                             field="--gen-len")
    if spec.family == "opt" and prompt_len + gen_len > spec.max_positions:
        raise InfinisimError(f"prompt + generation = {prompt_len + gen_len} exceeds {spec.name}'s "
                             f"{spec.max_positions} positions", field="--prompt-len")
    if not 0 <= weights_on_host <= 1:
        raise InfinisimError(f"must be within [0, 1], got {weights_on_host}", field="--weights-on-host")
    steps = np.arange(gen_len - 1)  # decode steps after the prefill's first token
    w = at_lengths(spec.shard(tp), batch, prompt_len, prompt_len + 1 + steps, policy_name, dtype, knobs,
                   speculated_fraction)
    w.weights_on_host, w.tp, w.unsharded = float(weights_on_host), tp, spec
    return w


def at_lengths(spec: ModelSpec, batch: int, prompt_len: int, kv_len: np.ndarray, policy_name: str,
               dtype: str = "float16", knobs: dict[str, Any] | None = None,
               speculated_fraction: float | np.ndarray | None = None, sized_by: np.ndarray | None = None
               ) -> Workload:
    """A workload whose decode steps have the given cache lengths ([steps], the newest row included)
    after a prompt of `prompt_len`: `synthetic`'s consecutive steps, or any others (the serving
    simulator times one step per length this way). `sized_by` ([steps]): the prompt each step's
    fetch is sized by, for a policy whose fetch follows the prompt (H2O's kept set)."""
    kv = policy(policy_name)
    simulated = SIM_POLICIES[policy_name](kv.make_knobs(knobs))
    grid = np.repeat(np.asarray(kv_len, dtype=np.int64)[:, None], spec.n_layers, axis=1)
    prompts = prompt_len if sized_by is None else np.asarray(sized_by, dtype=np.int64)[:, None]
    fetched, attended, speculating = simulated.decode_counts(grid, prompts, speculated_fraction)
    row = simulated.row_bytes(spec, dtype, batch)
    bytes_h2d = fetched.astype(np.int64) * row
    bytes_d2h = np.full_like(bytes_h2d, row if kv.offloaded else 0)
    return Workload(spec, dtype, batch, prompt_len, policy_name, simulated.knobs, grid, fetched.astype(np.int64),
                    attended.astype(np.int64), bytes_h2d, bytes_d2h, speculating)
