"""Where InfiniGen's speculation spends its time: torch's profiler over the decode steps of a real
run (SmolLM2, CPU), the ops inside each speculation (at the start of layer i-1: layer i's query,
the scores against the partial key cache, the count within alpha and the choice of rows) summed
per decode step. Writes JSON (default benchmarks/results/profile-speculation-b<B>-p<P>.json).

    .venv/bin/python benchmarks/profile_speculation.py --batch 8 --prompt-len 4096 --gen-len 6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from infinisim.executor.generate import SamplingConfig
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import InfiniGen
from infinisim.executor.prompts import bundled_prompts
from infinisim.executor.recording import run_policy

WARM = 2  # decode steps before profiling starts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--gen-len", type=int, default=6, help="new tokens; the first two are not profiled")
    p.add_argument("--out")
    args = p.parse_args()
    loaded = load_model("smollm2-135m", "float32", "cpu", False)
    prompts = bundled_prompts(loaded.tokenizer, args.batch, args.prompt_len, loaded.model.spec.vocab_size)
    speculate_ahead = InfiniGen.speculate_ahead
    profiled = {"steps": set()}

    def traced(self: InfiniGen, target: int, residual: torch.Tensor, step: object) -> None:
        if step.index > WARM:  # type: ignore[attr-defined]
            profiled["steps"].add(step.index)  # type: ignore[attr-defined]
            with record_function("speculation"):
                return speculate_ahead(self, target, residual, step)
        return speculate_ahead(self, target, residual, step)

    InfiniGen.speculate_ahead = traced  # type: ignore[method-assign]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, trace = run_policy(loaded.model, prompts, "infinigen", SamplingConfig(args.gen_len, stop_at_eos=False),
                              {"model": "smollm2-135m", "weights": "gguf"})
    steps = len(profiled["steps"])
    inside: dict[str, list[float]] = {}
    spec_total = 0.0
    events = prof.events()
    for e in events:
        if e.name == "speculation":
            spec_total += e.cpu_time_total
    for e in events:
        parent, under = e.cpu_parent, False
        while parent is not None:
            if parent.name == "speculation":
                under = True
                break
            parent = parent.cpu_parent
        if under and e.cpu_parent is not None and e.cpu_parent.name == "speculation":  # top-level ops only
            inside.setdefault(e.name, [0.0, 0])
            inside[e.name][0] += e.cpu_time_total
            inside[e.name][1] += 1
    decode = trace.layers[trace.layers.step > WARM]
    result = {
        "benchmark": "profile-speculation", "config": vars(args), "profiled_steps": steps,
        "speculation_ms_per_step_profiled": spec_total / steps / 1e3,
        "trace_spec_ms_per_step": float(decode["spec_s"].sum() / steps * 1e3),
        "trace_attn_ms_per_step": float(decode["attn_s"].sum() / steps * 1e3),
        "ops_ms_per_step": {name: {"ms": round(t / steps / 1e3, 3), "calls_per_step": n / steps}
                            for name, (t, n) in sorted(inside.items(), key=lambda kv: -kv[1][0])},
    }
    out = Path(args.out or f"benchmarks/results/profile-speculation-b{args.batch}-p{args.prompt_len}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    top = list(result["ops_ms_per_step"].items())[:12]
    print(json.dumps({**{k: v for k, v in result.items() if k != "ops_ms_per_step"}, "top_ops": dict(top)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
