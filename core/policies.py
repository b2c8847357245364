"""The KV policies, declared once: names, what each does, its knobs (defaults, ranges, units, help)
and traits, and the arithmetic the executor and the simulator must agree on.

Torch-free and numpy-free: the executor's policy table, the simulator's policy classes, the
planner's knob axes, the accuracy tables and every CLI flag are derived from `POLICIES`.
Adding a policy is: its knobs dataclass and `PolicySpec` here, its executor class, its
simulator class (each table checks at import that it covers this registry).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError


@dataclass(frozen=True)
class Knob:
    """One setting of a policy, as every layer sees it: the executor's keyword, the simulator's
    knob, the trace header's key, the CLI's flag (`--partial-ratio`) and the sweep file's axis."""

    name: str
    kind: type  # float, int or str
    default: Any
    help: str
    axis: str  # the planner's axis (a sweep file's key): several values of the knob
    example: Any  # a valid value other than the default (docs and the registry's own tests use it)
    low: float | None = None
    low_open: bool = False  # low itself is excluded
    high: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a value (e.g. an unbounded pool)
    whole_above_one: bool = False  # budget: a fraction up to 1, or a whole count above it
    even: bool = False
    timed: bool = True  # the simulator's timing depends on it (else: only accuracy does)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def field(self, default: Any = MISSING) -> Any:
        """A knobs dataclass field: this knob, at its default or at a policy's own (`default`)."""
        return field(default=self.default if default is MISSING else default, metadata={"knob": self})

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.whole_above_one:
            return "a fraction in (0, 1] or a whole token count"
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        what = "a whole number" if self.kind is int else "a number"
        return " and ".join(p for p in (f"{what} {low}".strip(), high) if p) + (", even" if self.even else "")

    def check(self, value: Any) -> Any:
        """The value in its kind, or one line naming the knob (NaN and infinity are never values)."""
        if value is None:
            if self.optional or self.default is None:
                return None
            raise InfinisimError(f"needs a value ({self.describe_range()})", field=self.name)
        if self.choices:
            if value not in self.choices:
                raise InfinisimError(f"{value!r} is not {self.describe_range()}", field=self.name)
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InfinisimError(f"{value!r} is not a number", field=self.name)
        bad = not math.isfinite(value)
        if self.kind is int:
            bad = bad or value != int(value)
        if self.low is not None:
            bad = bad or value < self.low or (self.low_open and value == self.low)
        if self.high is not None:
            bad = bad or value > self.high
        if self.whole_above_one:
            bad = bad or (value > 1 and value != int(value))
        if self.even:
            bad = bad or int(value) % 2 != 0
        if bad:
            raise InfinisimError(f"{value!r} is out of range: must be {self.describe_range()}", field=self.name)
        return int(value) if self.kind is int else float(value)


ALPHA = Knob("alpha", float, 8.0, "fetch the tokens whose speculated score is within alpha of the head's best "
             "(softmax-exponent units; with --preset paper: 4 for OPT, 5 for the Llama family, the paper's)",
             "alphas", 3.0, low=0, low_open=True, optional=True)
PARTIAL_RATIO = Knob("partial_ratio", float, 0.3, "share of the head dimension the speculation reads (the partial "
                     "query and key columns)", "partial_ratios", 0.2, low=0, low_open=True, high=1)
BUDGET = Knob("budget", float, 0.2, "most tokens fetched per layer: a fraction of the cached tokens (0.2 = 20%) "
              "or a count (> 1)", "budgets", 0.15, low=0, low_open=True, whole_above_one=True)
DENSE_LAYERS = Knob("dense_layers", int, 3, "leading layers that fetch their whole cache instead of speculating "
                    "(layer 0 has no previous layer to speculate from; the paper keeps 1)", "dense_layers", 2, low=1)
GQA_COMBINE = Knob("gqa_combine", str, "softmax_sum", "how the query heads sharing a KV head vote for its rows",
                   "gqa_combines", "max", choices=("softmax_sum", "max"), timed=False)
POOL_CAPACITY = Knob("pool_capacity", int, None, "host KV pool capacity in tokens per sequence (default "
                     "unbounded); a full pool evicts for good", "pool_capacities", 64, low=2, optional=True)
EVICTION = Knob("eviction", str, "counter", "which token leaves a full pool: counter (the paper's), lru or fifo",
                "evictions", "lru", choices=("counter", "lru", "fifo"), timed=False)
RECENT_RATIO = Knob("recent_ratio", float, 0.5, "share of the kept set reserved for the most recent tokens",
                    "recent_ratios", 0.25, low=0, high=1, timed=False)
GROUP_SIZE = Knob("group_size", int, 64, "values per quantization group along the head dimension (capped at "
                  "the head dimension)", "group_sizes", 32, low=2, even=True)
KNOBS: dict[str, Knob] = {k.name: k for k in (ALPHA, PARTIAL_RATIO, BUDGET, DENSE_LAYERS, GQA_COMBINE,
                                                POOL_CAPACITY, EVICTION, RECENT_RATIO, GROUP_SIZE)}


# ------------------------------------------------------------------ arithmetic both sides share


def budget_cap(budget: float, n_tokens: Any) -> Any:
    """Most rows a layer fetches from n_tokens cached ones: a fraction of them (budget <= 1,
    rounded up, at least 1) or a count (budget > 1, at most n_tokens). n_tokens: a number, or an
    array of them (the simulator's steps x layers)."""
    if np.ndim(n_tokens):
        cap = np.maximum(1, np.ceil(n_tokens * budget)) if budget <= 1 else np.minimum(int(budget), n_tokens)
        return cap.astype(np.int64)
    if budget <= 1:
        return max(1, math.ceil(n_tokens * budget))
    return min(int(budget), n_tokens)


def partial_width(ratio: float, head_dim: int) -> int:
    """Columns of InfiniGen's partial query and key: ratio x head_dim, rounded, within [1, head_dim]."""
    return max(1, min(head_dim, round(ratio * head_dim)))


def kv_row_bytes(batch: int, n_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one position of one layer for the batch, in the model's dtype."""
    return 2 * batch * n_kv_heads * head_dim * dtype_bytes


# ------------------------------------------------------------------ each policy's knobs


@dataclass(frozen=True)
class Knobs:
    """A policy's settings; every field is a `Knob` and is checked on construction."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, f.metadata["knob"].check(getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def max_fetch(self, capacity: int) -> int:
        """Most rows one layer fetches per sequence and KV head (sizes the fetch slots)."""
        return capacity

    def stored(self, capacity: int) -> int:
        """Positions per sequence held in host memory."""
        return capacity

    def row_bytes(self, batch: int, n_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """One position of one layer for the batch, as the policy stores it."""
        return kv_row_bytes(batch, n_kv_heads, head_dim, dtype_bytes)


@dataclass(frozen=True)
class NoKnobs(Knobs):
    pass


@dataclass(frozen=True)
class InfiniGenKnobs(Knobs):
    """Defaults chosen for accuracy (docs/POLICIES.md, benchmarks/bench_defaults.py): three leading
    dense layers, alpha 8, a 10% budget; `PRESETS["paper"]` restores the paper's."""

    alpha: float | None = ALPHA.field()
    partial_ratio: float = PARTIAL_RATIO.field()
    budget: float = BUDGET.field(default=0.1)
    dense_layers: int = DENSE_LAYERS.field()
    gqa_combine: str = GQA_COMBINE.field()
    pool_capacity: int | None = POOL_CAPACITY.field()
    eviction: str = EVICTION.field()

    def alpha_for(self, family: str) -> float:
        """The alpha in force: the knob, or (None) the paper's for the model family."""
        if self.alpha is not None:
            return self.alpha
        return 4.0 if family == "opt" else 5.0

    def max_fetch(self, capacity: int) -> int:
        if self.pool_capacity is not None:  # layers that do not speculate fetch every stored row
            return min(capacity, self.pool_capacity)
        return budget_cap(self.budget, capacity)

    def stored(self, capacity: int) -> int:
        return capacity if self.pool_capacity is None else min(capacity, self.pool_capacity)


@dataclass(frozen=True)
class H2OKnobs(Knobs):
    budget: float = BUDGET.field()
    recent_ratio: float = RECENT_RATIO.field()

    def max_fetch(self, capacity: int) -> int:
        return budget_cap(self.budget, capacity)


@dataclass(frozen=True)
class Int4Knobs(Knobs):
    group_size: int = GROUP_SIZE.field()

    def group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def row_bytes(self, batch: int, n_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        groups = head_dim // self.group(head_dim)
        per_head = head_dim // 2 + 2 * groups * dtype_bytes  # codes (two per byte), a scale and a minimum per group
        return 2 * batch * n_kv_heads * per_head


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class PolicySpec:
    name: str
    summary: str
    knobs: type[Knobs]
    offloaded: bool = True  # the KV cache lives in host memory
    selective: bool = False  # a layer fetches (and attends over) a chosen subset of the cached rows
    speculating: bool = False  # how many rows: from speculation (the simulator needs the fetched share)
    quantized: bool = False  # rows stored in fewer bits than the model's
    evicting: bool = False  # tokens leave the cache for good as decoding goes on
    measurement_only: bool = False  # needs exact attention: an upper bound, not a deployable policy

    @property
    def exact(self) -> bool:
        """Attends over every cached row at full precision: accuracy's reference."""
        return not (self.selective or self.quantized)

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.knobs))

    def make_knobs(self, values: dict[str, Any] | None = None) -> Knobs:
        """The policy's knobs from `values`: its own keys are checked and set (None: the default,
        except for knobs where None is a value of its own); keys of other policies' knobs are
        ignored; a key no policy has is an error."""
        values = values or {}
        unknown = sorted(set(values) - set(KNOBS))
        if unknown:
            raise InfinisimError(f"no policy has a knob {unknown[0]!r} (knobs: {', '.join(KNOBS)})", field=unknown[0])
        return self.knobs(**{k: v for k, v in values.items()
                             if k in self.knob_names and (v is not None or KNOBS[k].optional)})


POLICIES: dict[str, PolicySpec] = {p.name: p for p in (
    PolicySpec("resident", "the whole KV cache in device memory: nothing moves (the no-transfer ideal)", NoKnobs,
               offloaded=False),
    PolicySpec("full", "FlexGen: the cache in host memory, each layer's whole cache fetched every step", NoKnobs),
    PolicySpec("infinigen", "InfiniGen: speculate from the previous layer which rows a layer needs, prefetch only "
               "those", InfiniGenKnobs, selective=True, speculating=True),
    PolicySpec("oracle", "as many rows as infinigen, but the true top ones by exact attention (measurement only)",
               InfiniGenKnobs, selective=True, speculating=True, measurement_only=True),
    PolicySpec("h2o", "H2O: a fixed-size kept set of heavy hitters and recent tokens; the rest evicted for good",
               H2OKnobs, selective=True, evicting=True),
    PolicySpec("int4", "FlexGen's 4-bit cache: every row fetched quantized, dequantized on the device", Int4Knobs,
               quantized=True),
)}


# Named sets of knob values, one flag away (`--preset paper`); None keeps its meaning (the paper's alpha).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"alpha": None, "dense_layers": 1, "budget": 0.2},  # InfiniGen (OSDI 2024): alpha 4 OPT / 5 Llama
}


def policy(name: str) -> PolicySpec:
    """The named policy, or one line listing the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise InfinisimError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})", field="--policy") from None


def speculating_policies() -> tuple[str, ...]:
    """The deployable policies whose fetched share comes from speculation (alpha): what sensitivity
    figures and timeline excerpts show first."""
    return tuple(name for name, spec in POLICIES.items() if spec.speculating and not spec.measurement_only)


def policies_with(knob: str) -> tuple[str, ...]:
    """The policies that have `knob`, in registry order."""
    return tuple(name for name, spec in POLICIES.items() if knob in spec.knob_names)


def knob_help(knob: Knob) -> str:
    """Help text for a knob's flag: which policies have it, what it does, its default (per policy
    where they differ)."""
    defaults: dict[Any, list[str]] = {}
    for name in policies_with(knob.name):
        value = next(f.default for f in fields(POLICIES[name].knobs) if f.name == knob.name)
        defaults.setdefault(value, []).append(name)
    shown = [f"{v:g}" if isinstance(v, float | int) else str(v) for v in defaults]
    if len(defaults) > 1:
        text = "; default " + ", ".join(f"{s} ({'/'.join(n)})" for s, n in zip(shown, defaults.values(), strict=True))
    else:
        text = "" if None in defaults else f"; default {shown[0]}"
    return f"{'/'.join(policies_with(knob.name))}: {knob.help}{text}"
