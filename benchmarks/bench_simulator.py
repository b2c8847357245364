"""Simulator speed and the paper's scenario.

1. Replay speed: a real 128-step trace of a 40-layer model (a small random-weight Llama-family
   model with 40 layers, decoded under infinigen by the executor), replayed on the paper's
   A6000/PCIe 3.0 profile. Target: under 1 s.
2. The paper's scenario through `simulate`: OPT-13B, prompt 1920, generation 128, batch 4..20,
   policies full, int4, h2o (20%) and infinigen with the paper's knobs (alpha 4, partial ratio 0.2,
   at most 400 KV per layer; the fetched share per layer re-derived at alpha 4 from a SmolLM2
   infinigen trace on the paper's prompt source). Target: all 20 runs under 10 s. Reports total
   latency and speedups over full.

    .venv/bin/python benchmarks/bench_simulator.py [--out PATH] [--text PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from infinisim.analysis.paper_runs import BASELINES, PAPER, PAPER_KNOBS, SUBJECT
from infinisim.core.policies import POLICIES as REGISTRY
from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.loaders import load_model
from infinisim.executor.model import Transformer
from infinisim.executor.recording import run_policy
from infinisim.hwprofiles.profile import load_profile
from infinisim.sim.engine import simulate
from infinisim.sim.workload import from_trace, speculated_fraction_per_layer, synthetic
from infinisim.traces.spec import ModelSpec, named_model

REPO = Path(__file__).resolve().parent.parent
BATCHES = tuple(PAPER["batches"])
PAPER_ALPHA = PAPER["alpha"]


def replay_speed(profile_name: str) -> dict[str, float]:
    import torch

    spec = ModelSpec("bench-40-layers", "llama", n_layers=40, hidden=128, n_heads=4, n_kv_heads=2, head_dim=32,
                     ffn_hidden=256, vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(spec).eval()
    t0 = time.perf_counter()
    _, trace = run_policy(model, [list(range(1, 257))], "infinigen", SamplingConfig(129, stop_at_eos=False),
                          {"model": spec.name, "weights": "random"})
    traced = time.perf_counter() - t0
    profile = load_profile(profile_name)
    times, events = [], 0
    for _ in range(3):
        t0 = time.perf_counter()
        result = simulate(from_trace(trace), profile)
        times.append(time.perf_counter() - t0)
        events = result.events
    best = min(times)
    return {"decode_steps": len(trace.decode_steps()), "layers": spec.n_layers, "executor_s": traced,
            "replay_s": best, "replay_s_all": times, "events": events, "events_per_s": events / best}


def infinigen_shares(text_path: Path, prompt_len: int) -> tuple[np.ndarray, str]:
    loaded = load_model("smollm2-135m")
    if text_path.exists():
        ids, source = loaded.tokenizer.encode(text_path.read_text(encoding="utf-8")).ids, str(text_path)
    else:
        from infinisim.executor.prompts import bundled_text

        ids, source = loaded.tokenizer.encode(bundled_text()[:40000]).ids, "pydoc_data.topics"
    _, trace = run_policy(loaded.model, [ids[:prompt_len]], "infinigen", SamplingConfig(32, stop_at_eos=False),
                          {"model": "smollm2-135m", "weights": "embedded"},
                          knobs=PAPER_KNOBS[SUBJECT], measure=Measurement(alpha_counts_every=1))
    return speculated_fraction_per_layer(trace, PAPER_ALPHA), source


def paper_scenario(profile_name: str, share: float) -> tuple[list[dict], float, int]:
    spec, profile = named_model("opt-13b"), load_profile(profile_name)
    rows, events = [], 0
    t0 = time.perf_counter()
    for policy in BASELINES:
        for batch in BATCHES:
            w = synthetic(spec, batch, 1920, 128, policy, "float16", PAPER_KNOBS.get(policy, {}),
                          share if REGISTRY[policy].speculating else None)
            result = simulate(w, profile)
            s = result.summary()
            events += s["events"]
            rows.append({"policy": policy, "batch": batch, "total_s": s["total_s"], "prefill_s": s["prefill_s"],
                         "decode_ms_mean": s["decode_ms_mean"], "tokens_per_s": s["tokens_per_s"],
                         "fits": s["fits"], "device_peak_gb": s["device_peak_gb"],
                         "decode_phase_ms": s["decode_phase_ms"]})
    elapsed = time.perf_counter() - t0
    full = {r["batch"]: r["total_s"] for r in rows if r["policy"] == "full"}
    for r in rows:
        r["speedup_vs_full"] = full[r["batch"]] / r["total_s"]
    return rows, elapsed, events


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="a6000-pcie3")
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "pg19_firstbook.txt"))
    p.add_argument("--out", default="benchmarks/results/simulator.json")
    args = p.parse_args()

    speed = replay_speed(args.profile)
    print(f"replay: {speed['decode_steps']} steps x {speed['layers']} layers in {speed['replay_s']:.3f} s "
          f"({speed['events_per_s']:,.0f} events/s)", file=sys.stderr)
    shares, source = infinigen_shares(Path(args.text), 1920)
    share = float(np.nanmean(shares))
    print(f"infinigen share from SmolLM2 on {source} at alpha {PAPER_ALPHA}: mean {share:.3f} of the cache per "
          f"speculating layer (uncapped; the budget caps it at 400 tokens)", file=sys.stderr)
    rows, elapsed, events = paper_scenario(args.profile, share)
    print(f"paper scenario: {len(rows)} runs in {elapsed:.2f} s ({events / elapsed:,.0f} events/s)", file=sys.stderr)
    print(f"{'policy':<10} " + " ".join(f"{'b' + str(b):>14}" for b in BATCHES))
    for policy in BASELINES:
        cells = [r for r in rows if r["policy"] == policy]
        print(f"{policy:<10} " + " ".join(
            f"{r['total_s']:>7.1f}s {r['speedup_vs_full']:>4.2f}x" if r["fits"] else f"{'does not fit':>14}"
            for r in cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "simulator", "profile": args.profile, "replay": speed,
                               "infinigen_share": {"source": source, "per_layer": shares.tolist(), "mean": share},
                               "paper_scenario": {"seconds": elapsed, "events": events,
                                                  "events_per_s": events / elapsed, "rows": rows}}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
