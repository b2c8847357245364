"""Headline numbers of a trace: what `infinisim run` prints and benchmarks store."""

from __future__ import annotations

import numpy as np
import pandas as pd

from infinisim.traces.trace import Trace

LAYER_PHASES = ("attn", "ffn", "h2d", "d2h", "wait", "spec", "gather", "comm")  # a trace's per-layer `<phase>_s`


def summarize(trace: Trace) -> dict[str, float | int | str]:
    decode = trace.decode_steps()
    wall = decode["wall_s"].to_numpy()
    batch = int(trace.run["batch"])
    decode_rows = trace.layers[trace.layers["step"].isin(decode["step"])]
    prefill = trace.steps[trace.steps["phase"] == "prefill"]["wall_s"].sum()
    n = max(len(decode), 1)
    phases = {f"decode_{p}_ms": float(decode_rows[f"{p}_s"].sum() / n * 1e3) for p in LAYER_PHASES}
    phases.update({f"decode_{p}_ms": float(decode[f"{p}_s"].sum() / n * 1e3) for p in ("embed", "head")})
    compute = sum(phases[f"decode_{p}_ms"] for p in ("embed", "attn", "ffn", "head", "wait", "comm"))
    beside = sum(phases[f"decode_{p}_ms"] for p in ("spec", "gather", "h2d", "d2h"))
    step_ms = float(wall.mean() * 1e3) if len(wall) else 0.0
    serial = trace.run.get("device") != "cuda"  # CPU runs do everything in turn, but copies over a link
    copies = phases["decode_h2d_ms"] + phases["decode_d2h_ms"] if trace.run.get("link") else 0.0
    phases["decode_host_ms"] = max(0.0, step_ms - compute - (beside - copies if serial else 0.0))  # as the simulator
    return {
        "policy": trace.run["policy"],
        "prefill_s": float(prefill),
        "decode_steps": len(decode),
        "decode_ms_mean": float(wall.mean() * 1e3) if len(wall) else float("nan"),
        "decode_ms_p50": float(np.percentile(wall, 50) * 1e3) if len(wall) else float("nan"),
        "decode_ms_p99": float(np.percentile(wall, 99) * 1e3) if len(wall) else float("nan"),
        "decode_tokens_per_s": float(batch * len(wall) / wall.sum()) if len(wall) else float("nan"),
        "bytes_h2d_total": int(trace.layers["bytes_h2d"].sum()),
        "bytes_d2h_total": int(trace.layers["bytes_d2h"].sum()),
        "bytes_h2d_per_decode_step": float(decode_rows["bytes_h2d"].sum() / n),
        "bytes_d2h_per_decode_step": float(decode_rows["bytes_d2h"].sum() / n),
        **phases,
        "evicted_total": int(trace.steps["evicted"].fillna(0).sum()),
        **quality(trace),
    }


def _mean_of_lists(column: pd.Series) -> float:
    values = [v for row in column for v in row]
    return float(np.mean(values)) if values else float("nan")


def quality(trace: Trace) -> dict[str, float]:
    """Accuracy side of a run: the attended fraction (share of the cache each layer's attention ran
    over, every layer, the newest row included), the fetched fraction (share of its cached tokens
    a selecting layer fetched, after the budget's cap; the planner's `fetched_fraction`), and
    (teacher-forced or --quality runs) perplexity, recall of exact attention mass and top-k overlap
    over the selecting layers."""
    decode = trace.layers[trace.layers["step"].isin(trace.decode_steps()["step"])]
    nll = pd.to_numeric(trace.steps["nll"], errors="coerce").dropna()
    selecting = decode[decode["recall"].map(len) > 0]
    return {
        "attended_fraction": float((decode["tokens_attended"] / decode["kv_len"]).mean()) if len(decode)
        else float("nan"),
        "fetched_fraction": float((selecting["tokens_fetched"] / (selecting["kv_len"] - 1).clip(lower=1)).mean())
        if len(selecting) else float("nan"),
        "perplexity": float(np.exp(nll.mean())) if len(nll) else float("nan"),
        "recall": _mean_of_lists(decode["recall"]),
        "topk_overlap": _mean_of_lists(decode["topk_overlap"]),
    }
