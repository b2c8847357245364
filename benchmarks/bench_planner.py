"""Planner throughput: a 10,880-config sweep, serially and over local processes.

8 profiles x 4 models x 5 batch sizes x 4 prompt lengths x 5 policies (7 budgets for h2o and
infinigen), 128 generated tokens each (the planner's direct computation hardly grows with them;
`--gen-len 4` was this benchmark's setting when every config ran event by event). No cache, so
both runs compute everything; their tables must be identical.

    .venv/bin/python benchmarks/bench_planner.py [--workers 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from infinisim.analysis.sweep import Sweep, run_sweep
from infinisim.hwprofiles.profile import builtin_profiles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/planner.json")
    args = p.parse_args()

    sweep = Sweep(list(builtin_profiles(single_gpu=True)), ["opt-6.7b", "opt-13b", "llama-3-8b", "mistral-7b"],
                  [1, 4, 8, 16, 32], [512, 1024, 1536, 1920], [args.gen_len],
                  ["resident", "full", "int4", "h2o", "infinigen"],
                  knobs={"budget": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5]}, speculated_fraction=0.1)
    configs = sweep.configs()
    print(f"{len(configs)} configs", file=sys.stderr)
    timings = {}
    tables = {}
    for label, kwargs in (("serial", {"serial": True}), (f"{args.workers} processes", {"workers": args.workers})):
        t0 = time.perf_counter()
        tables[label] = run_sweep(configs, **kwargs)
        timings[label] = time.perf_counter() - t0
        print(f"{label}: {timings[label]:.1f} s ({len(configs) / timings[label]:.0f} configs/s)", file=sys.stderr)
    serial, parallel = tables.values()
    identical = serial.sort_values("key").reset_index(drop=True).equals(
        parallel.sort_values("key").reset_index(drop=True))
    result = {"benchmark": "planner", "configs": len(configs), "gen_len": args.gen_len,
              "fit": int(serial["fits"].sum()), "seconds": timings,
              "configs_per_s": {k: len(configs) / v for k, v in timings.items()},
              "speedup": timings["serial"] / timings[f"{args.workers} processes"], "identical_tables": identical}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
