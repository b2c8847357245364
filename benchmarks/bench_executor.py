"""Executor benchmark: per-step decode latency of KV policies side by side, and the bytes `full` moves.

Writes JSON (default benchmarks/results/executor-<device>-<model>.json). Run on demand:
    .venv/bin/python benchmarks/bench_executor.py                      # SmolLM2, CPU, b4, p2048, g32
    .venv/bin/python benchmarks/bench_executor.py --model llama-3-8b --random-weights --batch 8 --device cuda
    .venv/bin/python benchmarks/bench_executor.py --batch 8 --prompt-len 4096 --link scaled-pcie3 \
        --policies resident,full,infinigen,h2o,int4      # CPU over an emulated link: overlap and stalls
Speculating policies skip the trace's uncapped alpha counts (measurement the benchmark does not
read, done outside the timed phases but inside each step's wall time) unless --alpha-counts-every N.
With --link, each policy's report also has its compute time per step (the step less its waits),
its link busy time per step and the share of the step spent waiting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import torch

from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.link import EmulatedLink
from infinisim.executor.loaders import load_model
from infinisim.executor.prompts import bundled_prompts
from infinisim.executor.recording import run_policy
from infinisim.hwprofiles.emulated import parse_link
from infinisim.traces.spec import DTYPE_BYTES
from infinisim.traces.summary import summarize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--policies", default="resident,full")
    p.add_argument("--repeats", type=int, default=1, help="run the policy list this many times, interleaved")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--link", help="CPU: an emulated link (as `infinisim run --link`)")
    p.add_argument("--alpha-counts-every", type=int, default=0, metavar="N",
                   help="record the trace's uncapped alpha counts every N-th decode step, as `infinisim run` "
                        "does every 8th (default 0: never; they are measurement, not policy work)")
    p.add_argument("--out", help="JSON path")
    args = p.parse_args()
    link = EmulatedLink(parse_link(args.link)) if args.link else None
    if link is not None:
        print(f"link: {link.spec.name}", file=sys.stderr)

    loaded = load_model(args.model, args.dtype, args.device, args.random_weights)
    spec = loaded.model.spec
    prompts = bundled_prompts(loaded.tokenizer, args.batch, args.prompt_len, spec.vocab_size)
    sampling = SamplingConfig(args.gen_len, stop_at_eos=False)
    policies = args.policies.split(",")
    results: dict[str, list[dict]] = {name: [] for name in policies}
    measure = Measurement(alpha_counts_every=args.alpha_counts_every)
    run_info = {"model": args.model, "weights": loaded.source}
    for rep in range(args.repeats):
        for name in policies:
            t0 = time.perf_counter()
            _, trace = run_policy(loaded.model, prompts, name, sampling, run_info, link=link, measure=measure)
            summary = summarize(trace)
            step = summary["decode_ms_mean"]
            summary["compute_ms_per_step"] = step - summary["decode_wait_ms"]
            summary["link_busy_ms_per_step"] = summary["decode_h2d_ms"] + summary["decode_d2h_ms"]
            summary["wait_share"] = summary["decode_wait_ms"] / step
            decode = trace.decode_steps()
            # full: per step, layers x 2 x kv_heads x head_dim x bytes x cached tokens x batch
            rows = trace.layers.merge(decode[["step", "n_new"]], on="step")
            kv_row_bytes = 2 * spec.n_kv_heads * spec.head_dim * DTYPE_BYTES[args.dtype] * args.batch
            expected = kv_row_bytes * (rows["kv_len"] - rows["n_new"])
            summary["bytes_h2d_equal_kv_arithmetic"] = bool((rows["bytes_h2d"] == expected).all()) \
                if name == "full" else None
            summary["decode_step_ms"] = [round(w * 1e3, 3) for w in decode["wall_s"]]
            summary["run_s"] = time.perf_counter() - t0
            results[name].append(summary)
            print(f"[{rep}] {name}: decode {summary['decode_ms_mean']:.1f} ms/step (p50 "
                  f"{summary['decode_ms_p50']:.1f}), H2D {summary['bytes_h2d_per_decode_step'] / 1e6:.1f} MB/step, "
                  f"wait {summary['wait_share']:.0%}, compute {summary['compute_ms_per_step']:.1f} ms, link busy "
                  f"{summary['link_busy_ms_per_step']:.1f} ms, attn {summary['decode_attn_ms']:.1f} ms, spec "
                  f"{summary['decode_spec_ms']:.1f} ms, gather {summary['decode_gather_ms']:.1f} ms",
                  file=sys.stderr, flush=True)

    def median_ms(name: str) -> float:
        return statistics.median(r["decode_ms_mean"] for r in results[name])

    ratios = {f"{name}_vs_{policies[0]}": median_ms(name) / median_ms(policies[0]) for name in policies[1:]}
    # each repeat runs the policies back to back: a pair shares the machine's state of the moment, so the
    # median of per-repeat ratios is steadier on a noisy machine than the ratio of medians
    paired = {f"{name}_vs_{policies[0]}": [r["decode_ms_mean"] / first["decode_ms_mean"]
                                           for r, first in zip(results[name], results[policies[0]], strict=True)]
              for name in policies[1:]}
    ratios.update({f"{key}_paired_median": statistics.median(values) for key, values in paired.items()})
    if "resident" in results:  # speculation's cost next to the attention it is meant to shrink
        attn = statistics.median(r["decode_attn_ms"] for r in results["resident"])
        ratios.update({f"{name}_spec_over_resident_attn": statistics.median(r["decode_spec_ms"] for r in results[name])
                       / attn for name in policies if any(r["decode_spec_ms"] for r in results[name])})
    report = {
        "benchmark": "executor_decode",
        "config": {**vars(args), "link_spec": link.spec.to_dict() if link else None, "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "model": spec.to_dict(),
        "kv_bytes_per_token_all_layers": spec.kv_bytes_per_token(args.dtype),
        "results": results,
        "decode_ms_mean_median": {name: median_ms(name) for name in policies},
        "ratios": ratios,
        "paired_ratios": paired,
    }
    out = Path(args.out or f"benchmarks/results/executor-{args.device}-{spec.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    full_bytes = results["full"][0]["bytes_h2d_per_decode_step"] if "full" in results else None
    print(json.dumps({"decode_ms_mean": report["decode_ms_mean_median"], "ratios": ratios,
                      "full_bytes_h2d_per_decode_step": full_bytes, "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
