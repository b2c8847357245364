"""Accuracy of KV selection on SmolLM2: recall of exact attention mass, top-k overlap and
perplexity, teacher-forced, for infinigen, oracle, h2o and int4 at fixed fetched fractions.

Prompt: the first 2048 tokens of ../shared/data/pg19_firstbook.txt; the next 64 tokens are
forced one per step, so selection happens exactly as in generation. At a fixed fraction f,
infinigen and oracle run with alpha = 1000 and budget f (every layer fetches f of the cache);
the paper's dynamic setting (alpha 5, budget 20%) is measured too, as is the alternative GQA
combine ("max" of raw scores instead of the sum of softmaxed scores). Writes JSON.

    .venv/bin/python benchmarks/bench_accuracy.py [--text PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.loaders import load_model
from infinisim.executor.recording import run_policy
from infinisim.traces.summary import summarize

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "pg19_firstbook.txt"))
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--fractions", default="0.05,0.1,0.2")
    p.add_argument("--dense-layers", default="1",
                   help="infinigen at each fraction with these counts of leading dense layers (default 1, the "
                        "paper's; e.g. 1,2,3)")
    p.add_argument("--out", default="benchmarks/results/accuracy-smollm2.json")
    args = p.parse_args()

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")).ids
    need = args.prompt_len + args.steps
    if len(ids) < need:
        print(f"{args.text}: {len(ids)} tokens, need {need}", file=sys.stderr)
        return 1
    prompt, forced = [ids[:args.prompt_len]], [ids[args.prompt_len:need]]
    sampling = SamplingConfig(args.steps, stop_at_eos=False)

    runs = [("resident", {}, None), ("int4", {}, None),
            ("infinigen", {"alpha": 5.0, "budget": 0.2, "dense_layers": 1}, "paper"), ("infinigen", {}, "default")]
    for f in map(float, args.fractions.split(",")):
        runs += [("infinigen", {"alpha": 1000.0, "budget": f, "dense_layers": int(n)}, f)
                 for n in args.dense_layers.split(",") if int(n) != 1]
        runs += [("infinigen", {"alpha": 1000.0, "budget": f, "dense_layers": 1}, f),
                 ("infinigen", {"alpha": 1000.0, "budget": f, "dense_layers": 1, "gqa_combine": "max"}, f),
                 ("oracle", {"alpha": 1000.0, "budget": f, "dense_layers": 1}, f),
                 ("h2o", {"budget": f}, f)]
    rows = []
    for name, knobs, fraction in runs:
        t0 = time.perf_counter()
        _, trace = run_policy(loaded.model, prompt, name, sampling, {"model": "smollm2-135m", "weights": "embedded"},
                              knobs=knobs, measure=Measurement(forced=forced, quality=True))
        s = summarize(trace)
        rows.append({"policy": name, "knobs": knobs, "target_fraction": fraction,
                     "fetched_fraction_selecting_layers": s["fetched_fraction"],
                     "attended_fraction_all_layers": s["attended_fraction"],
                     "recall": s["recall"], "topk_overlap": s["topk_overlap"], "perplexity": s["perplexity"],
                     "bytes_h2d_per_decode_step": s["bytes_h2d_per_decode_step"],
                     "seconds": time.perf_counter() - t0})
        r = rows[-1]
        print(f"{name:<10} {json.dumps(knobs):<58} fetched {r['fetched_fraction_selecting_layers']:.3f} "
              f"recall {r['recall']:.3f} top-k {r['topk_overlap']:.3f} ppl {r['perplexity']:.3f}", file=sys.stderr)
    dense = rows[0]["perplexity"]
    for r in rows:
        r["perplexity_vs_dense"] = r["perplexity"] / dense
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "accuracy", "config": vars(args), "dense_perplexity": dense,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
