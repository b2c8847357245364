"""Cross-validation of the simulator where prefetch and stalls really happen: SmolLM2 on this CPU
over an emulated link at several rates (transfer-bound to compute-bound) x shapes x policies,
each run replayed on this machine's calibrated profile with the same link (`infinisim validate
--link`). Writes one validation folder per (rate, shape) with JSON and plots, and a summary JSON:
per cell the step MAPE, the predicted and measured wait per step (as a share of the step) and
the predicted and measured infinigen/full speedup.

    .venv/bin/python benchmarks/bench_link_validation.py [--rates 0.25,1,4] [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from infinisim.analysis.validation import validate
from infinisim.core.files import write_json
from infinisim.executor.calibrate import calibrate
from infinisim.hwprofiles.profile import write_profile
from infinisim.traces.trace import read_trace

SHAPES = ((1, 2048), (8, 4096))
POLICIES = ["resident", "full", "infinigen", "h2o", "int4"]


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="0.25,1,4", help="link bandwidths, GB/s")
    p.add_argument("--latency", default="10us")
    p.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES), help="BATCHxPROMPT, comma-separated")
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--profile", help="a calibrated profile (default: calibrate now)")
    p.add_argument("--out", default="benchmarks/results/link-validation")
    p.add_argument("--reuse", action="store_true",
                   help="replay the traces a previous run left in OUT instead of running the executor again")
    args = p.parse_args()
    out = Path(args.out)
    profile = args.profile or str(write_profile(calibrate(log=log), out / "profile.yaml"))
    cells = []
    for shape in args.shapes.split(","):
        batch, prompt = map(int, shape.split("x"))
        for rate in args.rates.split(","):
            link = f"{rate}GB/s,{args.latency}"
            log(f"batch {batch}, prompt {prompt}, link {link}")
            cell = out / f"b{batch}-p{prompt}-{rate}GBs"
            traces = [read_trace(t) for t in sorted(cell.glob("*.trace.parquet"))] if args.reuse else None
            data = validate(cell, traces=traces or None, profile=profile, policies=POLICIES, batch=batch,
                            prompt_len=prompt, gen_len=args.gen_len, link=link,
                            command=f"benchmarks/bench_link_validation.py ({link}, batch {batch}, prompt {prompt})",
                            log=log)
            by = {c["policy"]: c for c in data["comparisons"]}
            for c in data["comparisons"]:
                wait = c["phases"].get("wait", {})
                cells.append({"batch": batch, "prompt_len": prompt, "link_GBs": float(rate), "policy": c["policy"],
                              "measured_ms": c["decode_ms_measured"], "predicted_ms": c["decode_ms_predicted"],
                              "step_mape": c["step"]["mape"],
                              "wait_share_measured": wait.get("measured_ms", 0.0) / c["decode_ms_measured"],
                              "wait_share_predicted": wait.get("predicted_ms", 0.0) / c["decode_ms_predicted"]})
            if "full" in by and "infinigen" in by:
                cells.append({"batch": batch, "prompt_len": prompt, "link_GBs": float(rate), "policy": "infinigen/full",
                              "speedup_measured": by["full"]["decode_ms_measured"]
                              / by["infinigen"]["decode_ms_measured"],
                              "speedup_predicted": by["full"]["decode_ms_predicted"]
                              / by["infinigen"]["decode_ms_predicted"]})
            write_json({"benchmark": "link-validation", "config": vars(args), "cells": cells}, out / "summary.json")
    for c in cells:
        if "step_mape" in c:
            log(f"b{c['batch']} p{c['prompt_len']} {c['link_GBs']:g} GB/s {c['policy']:<9} measured "
                f"{c['measured_ms']:8.1f} predicted {c['predicted_ms']:8.1f} MAPE {c['step_mape']:5.1f}% wait "
                f"{c['wait_share_measured']:.0%}/{c['wait_share_predicted']:.0%}")
        else:
            log(f"b{c['batch']} p{c['prompt_len']} {c['link_GBs']:g} GB/s infinigen/full speedup measured "
                f"{c['speedup_measured']:.2f} predicted {c['speedup_predicted']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
