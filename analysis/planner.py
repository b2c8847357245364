"""What-if planning: run a sweep (`analysis.sweep`), add the accuracy to expect, write the table,
and read it: the Pareto front of latency vs throughput, the best config per hardware under a
target, the largest batch that meets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinisim.analysis.sweep import Sweep, run_sweep
from infinisim.core.errors import InfinisimError
from infinisim.core.files import atomic_path, write_json


@dataclass
class Plan:
    rows: pd.DataFrame
    files: tuple[Path, ...]  # plan.csv, plan.parquet, plan.json
    target_ms: float | None = None
    min_throughput: float | None = None

    @property
    def fit(self) -> pd.DataFrame:
        return self.rows[self.rows["fits"]]

    def why_not(self) -> pd.Series:
        """How many configs did not run, per reason (the text before its first colon)."""
        return self.rows.loc[~self.rows["fits"], "does_not_fit"].str.split(":").str[0].value_counts()

    def best(self) -> pd.DataFrame:
        return best_under(self.rows, self.target_ms, self.min_throughput)

    def largest_batch(self) -> pd.DataFrame:
        return largest_batch(self.rows, self.target_ms) if self.target_ms else self.rows.iloc[:0]

    def front(self) -> pd.DataFrame:
        return pareto(self.rows)


def make_plan(sweep: Sweep, out: str | Path, *, cache: str | Path | None = None, workers: int | None = None,
              scheduler: str | None = None, serial: bool = False, quality: list[str] | None = None,
              target_ms: float | None = None, min_throughput: float | None = None, command: str = "",
              progress: Callable[[int, int], None] | None = None) -> Plan:
    """Simulate every config of the sweep (resuming from the cache), add the accuracy to expect from
    quality traces, write plan.csv, plan.parquet and plan.json into `out`."""
    missing = sweep.needs_share()
    if missing:
        raise InfinisimError(f"{missing[0]} needs a speculated fraction: --speculated-fraction, or --from-trace (a "
                             "trace's within-alpha counts)", field="--speculated-fraction")
    points = None
    if quality:  # read before the sweep: a bad trace fails before minutes of simulating
        from infinisim.analysis.accuracy import quality_points

        points = quality_points(quality)
    out = Path(out)
    rows = run_sweep(sweep.configs(), cache or out / "cache.jsonl", workers, scheduler, serial, progress)
    if points is not None:
        from infinisim.analysis.accuracy import add_expected_accuracy

        rows = add_expected_accuracy(rows, points)
    files = write_table(rows, out)
    meta = write_json({"command": command, "target_ms": target_ms, "min_throughput": min_throughput,
                       "quality": quality or []}, out / "plan.json")
    return Plan(rows, (*files, meta), target_ms, min_throughput)


def pareto(rows: pd.DataFrame) -> pd.DataFrame:
    """Per profile, the configs no other config beats on both per-step latency and throughput."""
    fit = rows[rows["fits"]]
    if fit.empty:
        return fit
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
    if ok.empty:
        return ok
    if target_ms is not None:
        ok = ok[ok["decode_ms"] <= target_ms]
    if min_tokens_per_s is not None:
        ok = ok[ok["tokens_per_s"] >= min_tokens_per_s]
    if ok.empty:
        return ok
    return ok.loc[ok.groupby("profile")["tokens_per_s"].idxmax()].sort_values("profile")


PLACEMENT = ("tp", "weights_on_host")  # where the model runs: GPUs, and the share of weights on the host


def placement_columns(rows: pd.DataFrame) -> list[str]:
    """The placement columns worth showing: those that vary in the plan."""
    return [c for c in PLACEMENT if c in rows.columns and rows[c].nunique() > 1]


def largest_batch(rows: pd.DataFrame, target_ms: float) -> pd.DataFrame:
    """Per profile, model, policy, prompt and generation length: the largest batch that fits and meets the target."""
    ok = rows[rows["fits"] & (rows["decode_ms"] <= target_ms)]
    if ok.empty:
        return ok
    cols = ["profile", "model", "policy", "prompt_len", "gen_len",
            *(c for c in PLACEMENT if c in ok.columns)]  # each GPU count and weight placement on its own
    return ok.loc[ok.groupby(cols, dropna=False)["batch"].idxmax()].sort_values(cols)


def write_table(rows: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    csv, parquet = out / "plan.csv", out / "plan.parquet"
    with atomic_path(csv) as tmp:
        rows.to_csv(tmp, index=False)
    with atomic_path(parquet) as tmp:
        rows.to_parquet(tmp)
    return csv, parquet


def make_capacity(configs: list[Any], out: str | Path, *, cache: str | Path | None = None,
                  workers: int | None = None, scheduler: str | None = None, serial: bool = False,
                  quality: list[str] | None = None, command: str = "", attribution: str | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, tuple[Path, ...]]:
    """The largest request rate of each serving config within its SLO (`analysis.serving.find_capacity`),
    cached per config, with the accuracy to expect; writes capacity.csv, capacity.parquet and
    capacity.json (every rate each search tried) into `out`."""
    from infinisim.analysis.serving import find_capacity

    points = None
    if quality:
        from infinisim.analysis.accuracy import quality_points

        points = quality_points(quality)
    out = Path(out)
    rows = run_sweep(configs, cache or out / "capacity-cache.jsonl", workers, scheduler, serial, progress,
                     evaluate_one=find_capacity)
    tried = {row["key"]: row.get("tried", []) for row in rows.to_dict(orient="records")}
    rows = rows.drop(columns=["tried"], errors="ignore")
    if points is not None:
        from infinisim.analysis.accuracy import add_expected_accuracy

        rows = add_expected_accuracy(rows, points)
    csv, parquet = out / "capacity.csv", out / "capacity.parquet"
    with atomic_path(csv) as tmp:
        rows.to_csv(tmp, index=False)
    with atomic_path(parquet) as tmp:
        rows.to_parquet(tmp)
    meta = write_json({"command": command, "quality": quality or [], "attribution": attribution, "tried": tried},
                      out / "capacity.json")
    return rows, (csv, parquet, meta)
