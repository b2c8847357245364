"""Where a live server's decode step goes, phase by phase, against the simulator's same step.

For each batch size, B sequences with prompts of --prompt-len tokens are prefilled into a live
server (executor/serving.py: each sequence attends through its own policy) and decoded together for
--steps steps; the median step and the mean per phase (attention phase, FFN, head, embed, and
"host": the step less its timed phases) are set beside the serving simulator's prediction of the
same step (sequences apart, each at its cache length) on a profile. This is what `validate
--requests` reports as `forwards.decode_by_batch`, broken down, without the request stream.

    .venv/bin/python benchmarks/live_phases.py --profile PROFILE.yaml [--policy resident]
        [--batches 1,2,4,8,12] [--prompt-len 200] [--steps 12] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import numpy as np
import torch

from infinisim.core.files import write_json
from infinisim.executor.loaders import load_model
from infinisim.executor.serving import LiveBatch
from infinisim.hwprofiles.profile import load_profile
from infinisim.sim.engine import simulate
from infinisim.sim.memory import memory_plan
from infinisim.sim.result import PHASES
from infinisim.sim.workload import at_lengths

WARMUP = 2  # steps left out: the first after the prefills is not from idle


def measured(batch: LiveBatch, keys: list[int], steps: int) -> tuple[float, dict[str, float]]:
    """(median step seconds, mean seconds per phase) of `steps` decode steps of `keys`."""
    walls, sums = [], {}
    for i in range(steps + WARMUP):
        _, t = batch.decode(keys)
        if i < WARMUP:
            continue
        walls.append(t.wall_s)
        for phases in (t.step_phases, *t.layer_phases.values()):
            for name, seconds in phases.items():
                sums[name] = sums.get(name, 0.0) + seconds
    phases = {name: total / steps for name, total in sums.items() if total > 0}
    phases["host"] = statistics.mean(walls) - sum(phases.values())
    return statistics.median(walls), phases


def predicted(spec, profile, policy: str, batch: int, length: int) -> tuple[float, dict[str, float]]:
    """The simulator's decode step of `batch` sequences at cache length `length`, sequences apart
    (a step first, so the one timed is not from idle streams, as the serving tables do)."""
    w = at_lengths(spec, batch, 1, np.array([length, length, length + 1]), policy, "float32")
    w.sequences_apart = True
    r = simulate(w, profile, memory=memory_plan(w, profile))
    per_phase = r.phase_s[2].sum(axis=0)
    phases = {name: float(per_phase[i]) for i, name in enumerate(PHASES) if per_phase[i] > 0}
    phases["host"] = phases.pop("bookkeeping", 0.0)
    return float(r.step_s[2]), phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="a profile (a calibrated one: `infinisim calibrate`)")
    p.add_argument("--model", default="smollm2-135m", help="a bundled model")
    p.add_argument("--policy", default="resident", help="resident or full (no speculation: its share would be a guess)")
    p.add_argument("--batches", default="1,2,4,8,12", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=200, help="tokens per sequence's prompt")
    p.add_argument("--steps", type=int, default=12, help="decode steps timed per batch size")
    p.add_argument("--out", default="benchmarks/results/live-phases.json", help="JSON path")
    args = p.parse_args()
    if args.policy not in ("resident", "full"):
        p.error("--policy: resident or full")
    batches = [int(b) for b in args.batches.split(",")]
    profile = load_profile(args.profile)
    loaded = load_model(args.model, "float32", torch.device("cpu"), random_weights=False)
    model = loaded.model
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        live = LiveBatch(model, args.policy)
        for key in range(b):
            live.prefill(key, rng.integers(100, 1000, args.prompt_len).tolist(), args.prompt_len + args.steps + 8)
        wall, phases = measured(live, list(range(b)), args.steps)
        length = args.prompt_len + WARMUP + args.steps // 2  # the timed steps' mean cache length, within a row
        sim_wall, sim_phases = predicted(model.spec, profile, args.policy, b, length)
        rows.append({"batch": b, "measured_ms": wall * 1e3, "predicted_ms": sim_wall * 1e3,
                     "ratio": wall / sim_wall,
                     "phases_ms": {name: {"measured": phases.get(name, 0.0) * 1e3,
                                          "predicted": sim_phases.get(name, 0.0) * 1e3}
                                   for name in sorted(set(phases) | set(sim_phases))}})
        shown = ", ".join(f"{n} {v['measured']:.1f}/{v['predicted']:.1f}" for n, v in rows[-1]["phases_ms"].items())
        print(f"batch {b:>2}: step {wall * 1e3:.1f}/{sim_wall * 1e3:.1f} ms ({wall / sim_wall:.2f}x)  {shown}",
              flush=True)
    out = write_json({"command": " ".join(["benchmarks/live_phases.py", *sys.argv[1:]]), "model": args.model,
                      "policy": args.policy, "profile": profile.name, "prompt_len": args.prompt_len,
                      "steps": args.steps, "threads": torch.get_num_threads(), "batches": rows}, Path(args.out))
    print(f"wrote {out} (measured/predicted ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
