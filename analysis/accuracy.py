"""What accuracy to expect at a fetched share, from measured quality traces.

A quality trace (`infinisim run --quality`) measures, for one policy at one setting, the share of
the cache a selecting layer fetched, the recall of exact attention mass, the top-k overlap and the
teacher-forced perplexity. Here they become points per policy; the planner reads the accuracy at
a config's share off them by linear interpolation, and only inside the measured range (give or
take 5%): outside it there is no honest number to give.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import POLICIES
from infinisim.traces.summary import quality
from infinisim.traces.trace import Trace, read_trace

EXACT = tuple(name for name, spec in POLICIES.items() if spec.exact)  # whole cache, full precision: the reference
EXPECTED = {"expected_recall": "recall", "expected_topk": "topk_overlap", "expected_ppl_ratio": "perplexity_ratio"}


def quality_points(paths: Iterable[str | Path]) -> pd.DataFrame:
    """`points_from` the quality traces in these files."""
    return points_from({str(path): read_trace(path) for path in paths})


def points_from(traces: Mapping[str, Trace]) -> pd.DataFrame:
    """One row per quality trace (keyed by its source): policy, fetched share, recall, top-k overlap,
    perplexity and the perplexity relative to a dense trace of the same model and prompt (when one is
    among them)."""
    rows = []
    for source, trace in traces.items():
        if not trace.run.get("quality"):
            raise InfinisimError("not a quality trace (run it with `infinisim run --quality`)", source, "run.quality")
        q = quality(trace)
        policy = trace.run["policy"]
        exact = policy in EXACT
        share = q["fetched_fraction"] if POLICIES[policy].selective else 1.0
        rows.append({"policy": policy, "model": trace.model.name, "prompt": tuple(trace.run["prompt_lens"]),
                     "fetched_fraction": share, "recall": 1.0 if exact else q["recall"],
                     "topk_overlap": 1.0 if exact else q["topk_overlap"], "perplexity": q["perplexity"],
                     "knobs": trace.run.get("policy_knobs", {}), "source": source})
    points = pd.DataFrame(rows, columns=["policy", "model", "prompt", "fetched_fraction", "recall", "topk_overlap",
                                         "perplexity", "knobs", "source"])
    dense = points[points["policy"].isin(EXACT)].drop_duplicates(["model", "prompt"]).set_index(["model", "prompt"])
    points["perplexity_ratio"] = [
        row.perplexity / dense.loc[(row.model, row.prompt), "perplexity"] if (row.model, row.prompt) in dense.index
        else np.nan for row in points.itertuples()]
    return points.sort_values(["policy", "fetched_fraction"]).reset_index(drop=True)


def expected(points: pd.DataFrame, policy: str, fraction: float) -> dict[str, Any]:
    """Recall, top-k overlap and perplexity ratio at `fraction`, interpolated between the policy's
    measured points; NaN where no point brackets it (within 5% of a measured share counts as it).
    Exact policies (resident, full) are 1, 1, 1."""
    if policy in EXACT:  # exact attention over the whole cache: nothing to lose, by definition
        return dict.fromkeys(EXPECTED, 1.0)
    mine = points[(points["policy"] == policy) & points["fetched_fraction"].notna()]
    out = dict.fromkeys(EXPECTED, np.nan)
    if mine.empty or not np.isfinite(fraction):
        return out
    mine = mine.groupby("fetched_fraction", as_index=False)[list(EXPECTED.values())].mean()
    x = mine["fetched_fraction"].to_numpy()
    tolerance = 0.05 * fraction  # h2o's fixed keep-set is a shrinking share of a growing cache
    if fraction < x.min() - tolerance or fraction > x.max() + tolerance:
        return out
    at = float(np.clip(fraction, x.min(), x.max()))
    for key, column in EXPECTED.items():
        out[key] = float(np.interp(at, x, mine[column].to_numpy()))
    return out


def add_expected_accuracy(rows: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """The plan table with the accuracy to expect at each config's fetched share (NaN outside the
    measured range, or for a policy with no quality trace)."""
    blank = dict.fromkeys(EXPECTED, np.nan)
    extra = [expected(points, row.policy, row.fetched_fraction) if row.fits else blank for row in rows.itertuples()]
    return pd.concat([rows.reset_index(drop=True), pd.DataFrame(extra)], axis=1)
