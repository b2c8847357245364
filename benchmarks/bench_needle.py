"""Passkey retrieval (needle in a haystack) on SmolLM2: dense attention vs infinigen.

Each trial hides a random 5-digit key at a depth in ~N tokens of Python's documentation and
asks for it at the end; greedy decoding must reproduce the key. Trials run in batches through
`resident` (dense) and `infinigen` (alpha 5, budget 20% by default). Writes JSON.

    .venv/bin/python benchmarks/bench_needle.py --contexts 2048,4096 --trials 20
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import make_policy
from infinisim.executor.prompts import needle_prompt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--alpha", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/needle-smollm2.json")
    args = p.parse_args()

    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    rng = random.Random(args.seed)
    policies = {"resident": {}, "infinigen": {"alpha": args.alpha, "budget": args.budget, "dense_layers": 1}}
    results = []
    for context in map(int, args.contexts.split(",")):
        trials = [(str(rng.randint(10000, 99999)), (i + 0.5) / args.trials, rng.randint(0, 20000))
                  for i in range(args.trials)]
        prompts = [needle_prompt(tok, context, depth, key, offset) for key, depth, offset in trials]
        for name, knobs in policies.items():
            t0 = time.perf_counter()
            found = []
            for lo in range(0, len(prompts), args.batch):
                gen = generate(loaded.model, prompts[lo:lo + args.batch], make_policy(name, **knobs),
                               SamplingConfig(8, stop_at_eos=False))
                for (key, _, _), new in zip(trials[lo:lo + args.batch], gen.new_tokens, strict=True):
                    found.append(key in tok.decode(new))
            results.append({"context": context, "policy": name, "knobs": knobs, "accuracy": sum(found) / len(found),
                            "found": found, "depths": [d for _, d, _ in trials], "seconds": time.perf_counter() - t0})
            print(f"context {context} {name}: {sum(found)}/{len(found)} retrieved "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    by = {(r["context"], r["policy"]): r["found"] for r in results}
    agreement = {str(c): sum(d and i for d, i in zip(by[(c, "resident")], by[(c, "infinigen")], strict=True))
                 / max(1, sum(by[(c, "resident")])) for c in map(int, args.contexts.split(","))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "needle", "config": vars(args), "results": results,
                               "infinigen_retrieves_where_dense_does": agreement}, indent=2))
    print(json.dumps({"infinigen_retrieves_where_dense_does": agreement, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
