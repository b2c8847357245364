"""What-if planning: sweep hardware x model x batch x lengths x policy x knobs through the simulator,
flag what does not fit, and pick what meets a latency or throughput target.

A sweep is a product of axes (`Sweep`), expanded into `Config`s. Each config is evaluated by a
pure function (`evaluate`), so configs can run serially, over local processes or on a Dask
cluster and give the same rows. Results are cached per config (keyed by a hash of the config)
in an append-only JSON-lines file, so an interrupted or repeated sweep resumes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_yaml

AXES = ("profiles", "models", "batches", "prompt_lens", "gen_lens", "policies", "budgets", "alphas",
        "pool_capacities")
KNOBBED = {"budgets": ("infinigen", "h2o"), "alphas": ("infinigen",), "pool_capacities": ("infinigen",)}


@dataclass(frozen=True)
class Config:
    profile: str
    model: str
    batch: int
    prompt_len: int
    gen_len: int
    policy: str
    budget: float | None = None
    alpha: float | None = None
    pool_capacity: int | None = None
    dtype: str = "float16"
    fetch_fraction: float | None = None  # infinigen: uncapped share each speculating layer wants
    alpha_shares: tuple[float, ...] | None = None  # infinigen: share per alpha 1..9 (from a trace)
    partial_ratio: float | None = None  # infinigen: partial weight ratio (None: the policy's default)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Sweep:
    profiles: list[str]
    models: list[str]
    batches: list[int]
    prompt_lens: list[int]
    gen_lens: list[int]
    policies: list[str]
    budgets: list[float] = field(default_factory=lambda: [0.2])
    alphas: list[float] = field(default_factory=lambda: [4.0])
    pool_capacities: list[int | None] = field(default_factory=lambda: [None])
    dtype: str = "float16"
    fetch_fraction: float | None = None
    alpha_shares: tuple[float, ...] | None = None

    def configs(self) -> list[Config]:
        """The product of the axes; knobs only vary for the policies that have them."""
        out: dict[str, Config] = {}
        for profile, model, batch, prompt, gen, policy in itertools.product(
                self.profiles, self.models, self.batches, self.prompt_lens, self.gen_lens, self.policies):
            budgets = self.budgets if policy in KNOBBED["budgets"] else [None]
            alphas = self.alphas if policy in KNOBBED["alphas"] else [None]
            pools = self.pool_capacities if policy in KNOBBED["pool_capacities"] else [None]
            for budget, alpha, pool in itertools.product(budgets, alphas, pools):
                c = Config(profile, model, batch, prompt, gen, policy, budget, alpha, pool, self.dtype,
                           self.fetch_fraction if policy == "infinigen" else None,
                           self.alpha_shares if policy == "infinigen" else None)
                out.setdefault(c.key(), c)
        return list(out.values())


def load_sweep(path: str | Path) -> Sweep:
    """A YAML sweep file: the axes as lists (or single values), dtype, fetch_fraction."""
    path = Path(path)
    if not path.exists():
        raise InfinisimError("no such sweep file", path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InfinisimError("a sweep file must be a YAML mapping of axes", path)
    known = {f.name for f in fields(Sweep)}
    for key in data:
        if key not in known:
            raise InfinisimError(f"unknown key (known: {', '.join(sorted(known))})", path, str(key))
    for key in AXES[:6]:
        if key not in data:
            raise InfinisimError("missing axis", path, key)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key in AXES:
            items = raw if isinstance(raw, list) else [raw]
            if not items:
                raise InfinisimError("must list at least one value", path, key)
            values[key] = [_axis_value(key, item, path) for item in items]
        elif key == "fetch_fraction":
            if not isinstance(raw, int | float) or not 0 < raw <= 1:
                raise InfinisimError(f"must be a number in (0, 1], got {raw!r}", path, key)
            values[key] = float(raw)
        elif key == "dtype":
            if raw not in ("float16", "bfloat16", "float32"):
                raise InfinisimError(f"must be float16, bfloat16 or float32, got {raw!r}", path, key)
            values[key] = raw
        else:
            raise InfinisimError("cannot be set in a sweep file", path, key)
    return Sweep(**values)


def _axis_value(axis: str, item: Any, path: Path) -> Any:
    if axis in ("profiles", "models", "policies"):
        if not isinstance(item, str) or not item:
            raise InfinisimError(f"expected a name, got {item!r}", path, axis)
        return item
    if axis == "pool_capacities" and item is None:
        return None
    if isinstance(item, bool) or not isinstance(item, int | float) or item <= 0:
        raise InfinisimError(f"expected a positive number, got {item!r}", path, axis)
    if axis in ("batches", "prompt_lens", "gen_lens", "pool_capacities"):
        if item != int(item):
            raise InfinisimError(f"expected a whole number, got {item!r}", path, axis)
        return int(item)
    return float(item)


@functools.lru_cache(maxsize=64)
def _profile(name: str) -> Any:
    from infinisim.hwprofiles.profile import load_profile

    return load_profile(name)  # parsed once per process, not once per config


def evaluate(config: Config) -> dict[str, Any]:
    """Simulate one config (or say why it does not fit). Pure: the same config, the same row."""
    from infinisim.sim.engine import simulate
    from infinisim.sim.memory import memory_plan
    from infinisim.sim.workload import selected_share, synthetic
    from infinisim.traces.spec import named_model

    row: dict[str, Any] = {"key": config.key(), **{k: v for k, v in asdict(config).items() if k != "alpha_shares"}}
    try:
        profile, spec = _profile(config.profile), named_model(config.model)
        knobs: dict[str, Any] = {}
        if config.policy in ("infinigen", "h2o") and config.budget is not None:
            knobs["budget"] = config.budget
        if config.policy == "infinigen":
            knobs.update(pool_capacity=config.pool_capacity, partial_ratio=config.partial_ratio)
        share: Any = None
        if config.policy == "infinigen":
            share = config.fetch_fraction
            if config.alpha_shares is not None and config.alpha is not None:
                share = config.alpha_shares[min(9, max(1, round(config.alpha))) - 1]
            if share is None:
                raise InfinisimError("infinigen needs fetch_fraction or a trace's shares", field="fetch_fraction")
        w = synthetic(spec, config.batch, config.prompt_len, config.gen_len, config.policy, config.dtype, knobs, share)
    except InfinisimError as exc:
        return {**row, "fits": False, "does_not_fit": f"invalid: {exc}"}
    plan = memory_plan(w, profile)
    row.update(device_gb=plan.device_bytes / 1e9, host_gb=plan.host_bytes / 1e9, fetched_fraction=selected_share(w))
    if plan.problem is not None:
        return {**row, "fits": False, "does_not_fit": plan.problem}
    s = simulate(w, profile).summary()
    return {**row, "fits": True, "does_not_fit": "", "prefill_s": s["prefill_s"],
            "decode_ms": s["decode_ms_mean"], "total_s": s["total_s"], "tokens_per_s": s["tokens_per_s"],
            "link_utilisation": s["link_utilisation"],
            **{f"{name}_ms": ms for name, ms in s["decode_phase_ms"].items()}}


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that config runs again
                done[row["key"]] = row
    return done


def run_sweep(configs: list[Config], cache: str | Path | None = None, workers: int | None = None,
              scheduler: str | None = None, serial: bool = False,
              on_result: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Evaluate every config not in the cache, serially, over local processes (default) or on a Dask
    cluster (`scheduler`: "tcp://host:port", or "local" for a LocalCluster), appending each row to
    the cache as it arrives. Returns all rows in config order."""
    cache_path = Path(cache) if cache else None
    done = _read_cache(cache_path) if cache_path else {}
    todo = [c for c in configs if c.key() not in done]
    total, finished = len(configs), len(configs) - len(todo)
    sink = None
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cut = cache_path.exists() and cache_path.stat().st_size and not cache_path.read_bytes().endswith(b"\n")
        sink = cache_path.open("a", encoding="utf-8")
        if cut:
            sink.write("\n")  # close a line an interruption cut short, so the next row starts clean
    try:
        for row in _results(todo, workers, scheduler, serial):
            done[row["key"]] = row
            if sink:
                sink.write(json.dumps(row, default=float) + "\n")
                sink.flush()
            finished += 1
            if on_result:
                on_result(finished, total)
    finally:
        if sink:
            sink.close()
    return pd.DataFrame([done[c.key()] for c in configs])


def _results(todo: list[Config], workers: int | None, scheduler: str | None, serial: bool
             ) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    if serial:
        yield from map(evaluate, todo)
    elif scheduler:
        yield from _dask(todo, scheduler)
    else:
        from concurrent.futures import ProcessPoolExecutor

        n = workers or os.cpu_count() or 1
        with ProcessPoolExecutor(n) as pool:
            yield from pool.map(evaluate, todo, chunksize=max(1, min(64, len(todo) // (4 * n))))


def _dask(todo: list[Config], scheduler: str) -> Iterator[dict[str, Any]]:
    from distributed import Client, LocalCluster, as_completed

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None) if scheduler == "local" else None
    try:
        with Client(cluster if cluster else scheduler) as client:
            futures = client.map(evaluate, todo, pure=False)
            for future in as_completed(futures):
                yield future.result()
    finally:
        if cluster:
            cluster.close()


# ------------------------------------------------------------------ reading the table


def pareto(rows: pd.DataFrame) -> pd.DataFrame:
    """Per profile, the configs no other config beats on both per-step latency and throughput."""
    fit = rows[rows["fits"]]
    keep = []
    for _, group in fit.groupby("profile"):
        ordered = group.sort_values(["decode_ms", "tokens_per_s"], ascending=[True, False])
        best = -np.inf
        for index, row in ordered.iterrows():
            if row["tokens_per_s"] > best:
                keep.append(index)
                best = row["tokens_per_s"]
    return fit.loc[keep].sort_values(["profile", "decode_ms"])


def best_under(rows: pd.DataFrame, target_ms: float | None = None, min_tokens_per_s: float | None = None
               ) -> pd.DataFrame:
    """Per profile, the highest-throughput config within the latency target (and above the throughput floor)."""
    ok = rows[rows["fits"]]
    if target_ms is not None:
        ok = ok[ok["decode_ms"] <= target_ms]
    if min_tokens_per_s is not None:
        ok = ok[ok["tokens_per_s"] >= min_tokens_per_s]
    if ok.empty:
        return ok
    return ok.loc[ok.groupby("profile")["tokens_per_s"].idxmax()].sort_values("profile")


def largest_batch(rows: pd.DataFrame, target_ms: float) -> pd.DataFrame:
    """Per profile, model, policy, prompt and generation length: the largest batch that fits and meets the target."""
    ok = rows[rows["fits"] & (rows["decode_ms"] <= target_ms)]
    if ok.empty:
        return ok
    cols = ["profile", "model", "policy", "prompt_len", "gen_len"]
    return ok.loc[ok.groupby(cols, dropna=False)["batch"].idxmax()].sort_values(cols)


def write_table(rows: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, parquet = out / "plan.csv", out / "plan.parquet"
    for path, write in ((csv, lambda p: rows.to_csv(p, index=False)), (parquet, lambda p: rows.to_parquet(p))):
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        tmp.replace(path)
    return csv, parquet

