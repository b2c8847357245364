"""The planner's fast path (sim/direct.py) against the event-by-event simulation, and its speed.

1. Agreement: N random configs that fit (every policy, model and shipped profile; batch 1-64,
   prompt 128-32k log-uniform (OPT: up to its 2048 positions), generation 1-1024, a random
   speculated share), each simulated both ways: the largest relative difference in mean decode
   step and in total seconds (target: at most 0.5%), the largest difference in any phase's mean
   time per step as a share of the step (the breakdown `plan` reports), and how often the direct
   computation fell back to the events.
2. Speed: 10,000 random configs at generation 128-512 through the planner's `evaluate`, serially
   (target: under 60 s).
3. Generation length: the same 8 configs (OPT-13B on the A6000 profile, batch 1 and 8, prompt 1536,
   full, int4, h2o, infinigen) at generation 16 and 512, fast (31 pairs of sweeps, interleaved;
   the median ratio) and exact (one), uncached (target: fast at 512 within 1.5x of fast at 16).

    .venv/bin/python benchmarks/bench_fast_path.py [--agreement 500] [--speed 10000] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from infinisim.analysis.sweep import Config, Sweep, evaluate, fingerprint, run_sweep
from infinisim.core.policies import POLICIES
from infinisim.hwprofiles.profile import builtin_profiles, load_profile
from infinisim.sim.direct import simulate_direct
from infinisim.sim.engine import simulate
from infinisim.sim.memory import memory_plan
from infinisim.sim.workload import synthetic
from infinisim.traces.spec import MODELS, named_model

REPEATS = 31  # the fast sweep takes milliseconds: the median of paired runs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@functools.cache
def single_gpu_profiles() -> list[str]:
    return list(builtin_profiles(single_gpu=True))


def random_config(rng: random.Random, gen: tuple[int, int]) -> tuple[str, str, int, int, int, str, float | None]:
    profiles = single_gpu_profiles()
    profile, model, policy = rng.choice(profiles), rng.choice(list(MODELS)), rng.choice(list(POLICIES))
    spec = named_model(model)
    top = spec.max_positions - gen[1] if spec.family == "opt" else 32768
    prompt = round(math.exp(rng.uniform(math.log(128), math.log(top))))
    share = rng.uniform(0.02, 0.5) if POLICIES[policy].speculating else None
    return profile, model, rng.randint(1, 64), prompt, rng.randint(*gen), policy, share


def agreement(n: int, seed: int) -> dict:
    rng, worst, rows, drawn = random.Random(seed), {"decode_ms": 0.0, "total_s": 0.0, "phase_of_step": 0.0}, [], 0
    fast_s = exact_s = 0.0
    while len(rows) < n:
        profile_name, model, batch, prompt, gen, policy, share = random_config(rng, (1, 1024))
        drawn += 1
        profile = load_profile(profile_name)
        w = synthetic(named_model(model), batch, prompt, gen, policy, "float16", speculated_fraction=share)
        memory = memory_plan(w, profile)
        if memory.problem is not None:
            continue
        t0 = time.perf_counter()
        fast = simulate_direct(w, profile, memory)
        t1 = time.perf_counter()
        exact = simulate(w, profile, memory=memory)
        t2 = time.perf_counter()
        fast_s, exact_s = fast_s + t1 - t0, exact_s + t2 - t1
        row = {"profile": profile_name, "model": model, "batch": batch, "prompt_len": prompt, "gen_len": gen,
               "policy": policy, "fell_back": fast is None}
        if fast is not None:
            a, b = fast.summary(), exact.summary()
            for key, field in (("decode_ms", "decode_ms_mean"), ("total_s", "total_s")):
                if not math.isnan(b[field]):
                    row[key] = abs(a[field] / b[field] - 1)
                    worst[key] = max(worst[key], row[key])
            if b["decode_ms_mean"] > 0:
                phases = a["decode_phase_ms"]
                row["phase_of_step"] = max(abs(phases[name] - ms) for name, ms in b["decode_phase_ms"].items()) \
                    / b["decode_ms_mean"]
                worst["phase_of_step"] = max(worst["phase_of_step"], row["phase_of_step"])
        rows.append(row)
        if len(rows) % 50 == 0:
            log(f"agreement: {len(rows)}/{n} (worst so far {worst})")
    return {"configs": n, "drawn": drawn, "seed": seed, "max_relative_difference": worst,
            "fell_back": sum(r["fell_back"] for r in rows), "seconds": {"fast": fast_s, "exact": exact_s},
            "speedup": exact_s / fast_s, "target": 0.005,
            "met": max(worst["decode_ms"], worst["total_s"]) <= 0.005, "rows": rows}


def speed(n: int, seed: int) -> dict:
    rng, prints, configs = random.Random(seed), {}, []
    for _ in range(n):
        profile, model, batch, prompt, gen, policy, share = random_config(rng, (128, 512))
        if (profile, model) not in prints:
            prints[profile, model] = fingerprint(profile, model)
        configs.append(Config(profile, model, batch, prompt, gen, policy, speculated_fraction=share,
                              fingerprint=prints[profile, model]))
    evaluate(configs[0])  # imports
    t0 = time.perf_counter()
    rows = [evaluate(c) for c in configs]
    seconds = time.perf_counter() - t0
    return {"configs": n, "gen_len": [128, 512], "fit": sum(r["fits"] for r in rows), "seconds": seconds,
            "configs_per_s": n / seconds, "target_s": 60, "met": seconds < 60}


def by_generation() -> dict:
    """Fast sweeps at the two lengths interleaved (the machine's drift hits both alike), then one
    exact sweep at each; the fast ratio is the median of the paired ratios."""
    def sweep(gen: int, exact: bool) -> float:
        configs = Sweep(["a6000-pcie3"], ["opt-13b"], [1, 8], [1536], [gen], ["full", "int4", "h2o", "infinigen"],
                        speculated_fraction=0.1, exact=exact).configs()
        t0 = time.perf_counter()
        rows = run_sweep(configs, serial=True)
        seconds = time.perf_counter() - t0
        if not rows["fits"].all():
            raise SystemExit(f"a config of the generation sweep does not fit: {rows['does_not_fit'].tolist()}")
        return seconds

    sweep(16, False), sweep(512, False)  # warm-up: imports, profile parsing
    pairs = [(sweep(16, False), sweep(512, False)) for _ in range(REPEATS)]
    out = {"fast gen 16": statistics.median(a for a, _ in pairs),
           "fast gen 512": statistics.median(b for _, b in pairs),
           "exact gen 16": sweep(16, True), "exact gen 512": sweep(512, True)}
    ratio = statistics.median(b / a for a, b in pairs)
    return {"configs": 8, "seconds": out, "repeats": REPEATS, "fast_ratio": ratio,
            "exact_ratio": out["exact gen 512"] / out["exact gen 16"], "target_ratio": 1.5, "met": ratio <= 1.5}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agreement", type=int, default=500, help="random configs compared with the events (0: skip)")
    p.add_argument("--speed", type=int, default=10_000, help="random configs timed (0: skip)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/fast-path.json")
    args = p.parse_args()
    result: dict = {"benchmark": "fast-path", "config": vars(args)}
    log("8 configs at generation 16 and 512")
    result["by_generation"] = by_generation()
    log(json.dumps(result["by_generation"]))
    if args.speed:
        log(f"{args.speed} configs through evaluate, serially")
        result["speed"] = speed(args.speed, args.seed)
        log(json.dumps(result["speed"]))
    if args.agreement:
        log(f"{args.agreement} configs both ways")
        result["agreement"] = agreement(args.agreement, args.seed)
        log(json.dumps({k: v for k, v in result["agreement"].items() if k != "rows"}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    met = all(part.get("met", True) for part in result.values() if isinstance(part, dict))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
