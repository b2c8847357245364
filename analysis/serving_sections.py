"""Report sections for request streams: latency CDFs and the latency table of a served stream
(`infinisim serve --out`), and the capacity table with p99 latency vs request rate per policy
(`infinisim plan --requests --out`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from infinisim.analysis import figures
from infinisim.analysis.report import Section
from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text

LATENCY_COLUMNS = ("policy", "completed", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p99_s",
                   "throughput_rps", "goodput_rps", "mean_batch", "preemptions", "meets_slo")
CAPACITY_COLUMNS = ("profile", "model", "policy", "budget", "max_rate", "at_max_ttft_p99_s", "at_max_tpot_p99_s",
                    "at_max_throughput_rps", "at_max_mean_batch", "fetched_fraction", "expected_recall",
                    "expected_ppl_ratio", "does_not_fit")


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise InfinisimError(f"not a {what} (malformed JSON: {exc})", path) from None


def _credit(text: str, attribution: str | None) -> str:
    return text + (f"\n\nThe {attribution}." if attribution else "")


def serving_sections(folder: str | Path) -> list[Section]:
    """From `infinisim serve --out FOLDER` and/or `infinisim plan --requests --out FOLDER`."""
    folder = Path(folder)
    sections: list[Section] = []
    if (folder / "serving.json").exists():
        sections += _served(folder)
    if (folder / "capacity.json").exists():
        sections += _capacity(folder)
    if not sections:
        raise InfinisimError("no serving.json or capacity.json here (write one with `infinisim serve --out` or "
                             "`infinisim plan --requests ... --out`)", folder)
    return sections


def _served(folder: Path) -> list[Section]:
    meta = _json(folder / "serving.json", "serving result")
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list) or not meta["rows"]:
        raise InfinisimError("not a serving result (no rows)", folder / "serving.json")
    rows = pd.DataFrame(meta["rows"])
    ran = meta.get("command") or f"infinisim serve --out {folder}"
    latency: dict[str, pd.DataFrame] = {}
    for policy in rows["policy"]:
        path = folder / f"requests-{policy}.csv"
        try:
            latency[policy] = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise InfinisimError(f"not a readable request table ({type(exc).__name__})", path) from None
    text = _credit(f"{meta.get('stream', '')}. Each policy served the same stream; the curves are the share of "
                   "requests served within each latency (TTFT: arrival to first token; TPOT: mean time per later "
                   "token).", meta.get("attribution"))
    shown = rows[[c for c in LATENCY_COLUMNS if c in rows.columns]]
    return [Section("Serving: latency per request", text, figures.latency_cdfs(latency, "serving-cdf", ran), shown)]


def _capacity(folder: Path) -> list[Section]:
    meta = _json(folder / "capacity.json", "capacity result")
    table = folder / "capacity.parquet"
    try:
        rows = pd.read_parquet(table)
    except Exception as exc:  # pyarrow raises several types for truncated or foreign files
        raise InfinisimError(f"not a readable capacity table ({type(exc).__name__})", table) from None
    if not {"max_rate", "policy", "profile", "model"} <= set(rows.columns):
        raise InfinisimError("not a capacity table (no max_rate/policy/profile/model columns)", table)
    ran = meta.get("command") or f"infinisim plan --requests ... --out {folder}"
    slo = rows["slo"].iloc[0] if "slo" in rows else "the SLO"
    shown = rows[[c for c in CAPACITY_COLUMNS if c in rows.columns]]
    sections = [Section("Capacity: the largest request rate within the SLO",
                        _credit(f"Per hardware, model, policy and knobs: the largest arrival rate (the stream's "
                                f"arrivals scaled) whose served stream meets {slo}, and the p99s, throughput and "
                                "mean batch at it.", meta.get("attribution")), None, shown)]
    tried = meta.get("tried") or {}
    for (profile, model), group in rows.groupby(["profile", "model"], sort=False):
        points = [{"policy": _label(r), "rate": t["rate"], "tpot_p99_ms": 1e3 * t["tpot_p99_s"]
                   if t.get("tpot_p99_s") is not None else None, "ttft_p99_s": t.get("ttft_p99_s")}
                  for r in group.itertuples() for t in tried.get(r.key, []) if not t.get("stopped_early")]
        if not points:
            continue
        frame = pd.DataFrame(points).sort_values(["policy", "rate"])
        sections.append(Section(
            f"p99 latency vs request rate: {model} on {profile}",
            "Every rate the capacity search served in full (rates it gave up on early, once the SLO could no "
            "longer hold, are left out).",
            figures.panels(frame, "rate", [("tpot_p99_ms", "p99 TPOT (ms)"), ("ttft_p99_s", "p99 TTFT (s)")],
                           "policy", f"capacity-{profile}-{model}", f"p99 latency vs request rate, {model} on "
                           f"{profile}", ran, xlabel="requests per second", log_x=True)))
    return sections


def _label(row: Any) -> str:
    budget = getattr(row, "budget", None)
    return row.policy + (f" {budget:g}" if isinstance(budget, float) and budget == budget else "")
