"""Which InfiniGen defaults keep accuracy: leading dense layers x alpha, at the default budget, on
two texts (PG-19's first book and Python's bundled docs), over the first 5, 32 and 64 teacher-forced
tokens of one run each (forced decoding is causal: the first k steps of a 64-step run are a k-step run).

Criteria (issue 15): perplexity within 2% of dense, at most 20% of the cache attended over all
layers, recall of exact attention mass >= 0.90. Writes JSON; prints a table.

    .venv/bin/python benchmarks/bench_defaults.py [--dense-layers 1,2,3] [--alphas 5,6,8] [--budgets 0.2] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from infinisim.core.files import write_json
from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.prompts import bundled_text
from infinisim.executor.session import Session
from infinisim.traces.summary import quality
from infinisim.traces.trace import Trace

REPO = Path(__file__).resolve().parent.parent
PREFIXES = (5, 32, 64)


def prefix(trace: Trace, k: int) -> Trace:
    """The trace of the first k forced tokens (steps 0 .. k-1)."""
    return replace(trace, steps=trace.steps[trace.steps["step"] < k], layers=trace.layers[trace.layers["step"] < k])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pg19", default=str(REPO.parent / "shared" / "data" / "pg19_firstbook.txt"))
    p.add_argument("--prompt-len", type=int, default=1920)
    p.add_argument("--dense-layers", default="1,2,3")
    p.add_argument("--alphas", default="5,6,8")
    p.add_argument("--budgets", default="0.2")
    p.add_argument("--out", default="benchmarks/results/accuracy-defaults.json")
    args = p.parse_args()

    session = Session("smollm2-135m")
    texts = {"pg19": Path(args.pg19).read_text(encoding="utf-8"), "pydoc": bundled_text()}
    steps = max(PREFIXES)
    candidates = [{"dense_layers": int(d), "alpha": float(a), "budget": float(b)} for d in args.dense_layers.split(",")
                  for a in args.alphas.split(",") for b in args.budgets.split(",")]
    rows = []
    for text_name, text in texts.items():
        prompts = session.prompts(1, args.prompt_len, text, steps, forced=True, source=text_name)
        sampling = SamplingConfig(steps, stop_at_eos=False)
        runs = [("resident", {})] + [("infinigen", knobs) for knobs in candidates]
        dense: dict[int, float] = {}
        for policy, knobs in runs:
            t0 = time.perf_counter()
            _, trace = session.run(policy, prompts, sampling, knobs, Measurement(quality=True))
            for k in PREFIXES:
                q = quality(prefix(trace, k))
                if policy == "resident":
                    dense[k] = q["perplexity"]
                rows.append({"text": text_name, "forced": k, "policy": policy, **knobs,
                             "attended_fraction": q["attended_fraction"], "fetched_fraction": q["fetched_fraction"],
                             "recall": q["recall"], "perplexity": q["perplexity"],
                             "perplexity_ratio": q["perplexity"] / dense[k]})
            print(f"{text_name} {policy} {knobs} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for r in rows:
        r["meets"] = bool(r["policy"] == "infinigen" and r["perplexity_ratio"] <= 1.02
                          and r["attended_fraction"] <= 0.20 and r["recall"] >= 0.90)
    print(f"{'text':<6} {'k':>3} {'dense':>5} {'alpha':>5} {'budget':>6} {'attended':>8} {'fetched':>7} {'recall':>6} "
          f"{'ppl x':>6} meets")
    for r in rows:
        if r["policy"] == "infinigen":
            print(f"{r['text']:<6} {r['forced']:>3} {r['dense_layers']:>5} {r['alpha']:>5g} {r['budget']:>6g} "
                  f"{r['attended_fraction']:>8.1%} {r['fetched_fraction']:>7.1%} {r['recall']:>6.3f} "
                  f"{r['perplexity_ratio']:>6.3f} "
                  f"{'yes' if r['meets'] else ''}")
    print(f"wrote {write_json({'benchmark': 'accuracy-defaults', 'config': vars(args), 'rows': rows}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
