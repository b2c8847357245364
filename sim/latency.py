"""Service levels of a served request stream: per-request latencies, the latency table, goodput,
and whether a percentile SLO on time to first token (TTFT) and time per output token (TPOT) holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from infinisim.core.errors import InfinisimError

if TYPE_CHECKING:
    from infinisim.sim.serving import ServingResult


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: float = 99.0

    def describe(self) -> str:
        return f"TTFT p{self.percentile:g} <= {self.ttft_s:g} s, TPOT p{self.percentile:g} <= {self.tpot_s * 1e3:g} ms"

    def allowed_late(self, n: int) -> int:
        """How many of n values may exceed a bound with the percentile still within it (numpy's
        'higher' percentile: the value at rank ceil((n - 1) p / 100) of the sorted ones)."""
        return n - 1 - math.ceil((n - 1) * self.percentile / 100) if n else 0


def latencies(result: ServingResult) -> dict[str, np.ndarray]:
    """Per request (NaN where it does not apply): queueing, TTFT, TPOT, end-to-end, in seconds."""
    r = result.requests
    later = r["gen_len"] - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(later > 0, (r["finished_s"] - r["first_token_s"]) / np.maximum(later, 1), np.nan)
    return {"queueing_s": r["admitted_s"] - r["arrival_s"], "ttft_s": r["first_token_s"] - r["arrival_s"],
            "tpot_s": tpot, "e2e_s": r["finished_s"] - r["arrival_s"]}


def summarize_serving(result: ServingResult, slo: SLO = SLO()) -> dict[str, Any]:
    """The latency table (p50/p90/p99 of each latency), throughput, and goodput under the SLO."""
    lat = latencies(result)
    out: dict[str, Any] = {"requests": len(result.stream), "completed": int(np.isfinite(lat["e2e_s"]).sum()),
                           "rejected": result.rejected, "too_long": result.too_long,
                           "preemptions": result.preemptions, "makespan_s": result.makespan_s}
    for name, values in lat.items():
        finite = values[np.isfinite(values)]
        for p in (50, 90, 99):
            out[f"{name[:-2]}_p{p}_s"] = float(np.percentile(finite, p)) if len(finite) else None
    span = result.makespan_s or math.nan
    tokens = float(result.requests["gen_len"][np.isfinite(lat["e2e_s"])].sum())
    meets = (lat["ttft_s"] <= slo.ttft_s) & ((lat["tpot_s"] <= slo.tpot_s) | np.isnan(lat["tpot_s"]))
    servable = ~result.requests["too_long"]
    out.update(throughput_rps=out["completed"] / span, output_tokens_per_s=tokens / span,
               goodput_rps=float(meets.sum()) / span, slo_attainment=float(meets[servable].mean())
               if servable.any() else 0.0,
               meets_slo=_meets({k: v[servable] for k, v in lat.items()}, slo), slo=slo.describe(),
               mean_batch=float(np.mean(result.series["batch"])) if len(result.series["batch"]) else 0.0)
    return out


def _meets(lat: dict[str, np.ndarray], slo: SLO) -> bool:
    """The SLO's percentile of TTFT and of TPOT within their bounds (requests not completed count as
    infinitely late; those longer than the model's positions are the model's limit, not the server's)."""
    if not len(lat["ttft_s"]):
        return False
    ttft = np.where(np.isfinite(lat["ttft_s"]), lat["ttft_s"], np.inf)
    tpot = lat["tpot_s"][~np.isnan(lat["tpot_s"])]
    ok_ttft = np.percentile(ttft, slo.percentile, method="higher") <= slo.ttft_s
    ok_tpot = not len(tpot) or np.percentile(tpot, slo.percentile, method="higher") <= slo.tpot_s
    return bool(ok_ttft and ok_tpot)


def parse_slo(text: str) -> SLO:
    """'ttft=2s,tpot=100ms,p=99' (any subset; units s or ms) -> SLO."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip().lower()
        if key not in ("ttft", "tpot", "p") or not raw:
            raise InfinisimError(f"{part!r}: expected ttft=TIME, tpot=TIME or p=PERCENTILE", field="--slo")
        scale = 1e-3 if raw.endswith("ms") else 1.0
        number = raw.removesuffix("ms").removesuffix("s")
        try:
            value = float(number) * (scale if key != "p" else 1.0)
        except ValueError:
            raise InfinisimError(f"{part!r}: {raw!r} is not a number", field="--slo") from None
        if not (math.isfinite(value) and value > 0) or (key == "p" and value > 100):
            raise InfinisimError(f"{part!r}: out of range", field="--slo")
        values[key] = value
    default = SLO()
    return SLO(values.get("ttft", default.ttft_s), values.get("tpot", default.tpot_s),
               values.get("p", default.percentile))


