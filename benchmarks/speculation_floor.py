"""What InfiniGen can save at batch 1 on this machine, and what its extra work costs at the least:
the memory-bound parts timed alone, on tensors cycled through more memory than the caches hold
(as in a real decode step, where a layer's weights and KV come from DRAM).

Per layer of SmolLM2 (float32) at a context of --prompt-len, with InfiniGen fetching --share of it:
- saved: dense attention over the whole context less attention over the fetched rows;
- added, the floor: layer i's query projection (Llama's RoPE sits between projection and skew,
  so the whole W_q is read), the scores against the partial key cache (the default partial ratio
  of the columns), and
  the fetched rows' host gather and copy (a memcpy on a CPU) for K and V.
The count and choice (softmax, top-k, comparison) and op dispatch come on top of the floor.
Writes JSON (default benchmarks/results/speculation-floor-p<P>.json).

    .venv/bin/python benchmarks/speculation_floor.py [--prompt-len 2048] [--share 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import torch
import torch.nn.functional as F

from infinisim.core.files import write_json
from infinisim.core.policies import DENSE_LAYERS, PARTIAL_RATIO, partial_width
from infinisim.traces.spec import named_model

CACHE_DEFEAT_BYTES = 600 << 20  # more than any L3 on the machines this project runs on


def best_us(items: list, fn: Callable[[object], object], rounds: int = 5) -> float:
    """The best of `rounds` passes over `items` (each pass touches all of them once), per item."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best * 1e6


def copies(nbytes: int) -> int:
    return max(8, CACHE_DEFEAT_BYTES // nbytes)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=2048, help="context length per layer (default 2048)")
    p.add_argument("--share", type=float, default=0.2, help="fraction of the context fetched (default 0.2)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/speculation-floor-p<P>.json)")
    args = p.parse_args()
    spec = named_model("smollm2-135m")
    hidden, heads, kv_heads, d = spec.hidden, spec.n_heads, spec.n_kv_heads, spec.head_dim
    r, layers = partial_width(PARTIAL_RATIO.default, d), spec.n_layers - DENSE_LAYERS.default
    n, fetched = args.prompt_len + 1, max(1, int(args.share * args.prompt_len))
    cap = args.prompt_len + 64
    q = torch.randn(1, heads, 1, d)

    kv = [torch.randn(1, kv_heads, cap, d) for _ in range(copies(kv_heads * cap * d * 4))]
    dense = best_us(kv, lambda k: F.scaled_dot_product_attention(q, k[:, :, :n], k[:, :, :n], enable_gqa=True))
    slot = torch.randn(1, kv_heads, fetched + 1, d)
    selected = best_us(kv[:1] * 64, lambda _: F.scaled_dot_product_attention(q, slot, slot, enable_gqa=True))

    x = torch.randn(1, 1, hidden)
    weights = [torch.randn(hidden, hidden) for _ in range(copies(hidden * hidden * 4))]
    projection = best_us(weights, lambda w: F.linear(x, w))
    partial = [torch.randn(1, kv_heads, r, cap) for _ in range(copies(kv_heads * r * cap * 4))]
    q_partial = torch.randn(1, kv_heads, heads // kv_heads, r)
    scores = best_us(partial, lambda keys: q_partial @ keys[..., :args.prompt_len])
    rows = torch.randperm(kv_heads * args.prompt_len)[:kv_heads * fetched]
    staging, device_slot = torch.empty(kv_heads * fetched, d), torch.empty(kv_heads * fetched, d)

    def gather_and_copy(k: torch.Tensor) -> None:
        torch.index_select(k.view(-1, d), 0, rows, out=staging)
        device_slot.copy_(staging)
    moved = 2 * best_us(kv, gather_and_copy)  # K and V

    saved, floor = dense - selected, projection + scores + moved
    result = {
        "benchmark": "speculation-floor", "config": {**vars(args), "speculating_layers": layers, "partial_width": r},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "us_per_layer": {"dense_attention": dense, "selected_attention": selected, "query_projection": projection,
                         "partial_scores": scores, "gather_and_copy_kv": moved},
        "saved_ms_per_step": saved * layers / 1e3,
        "added_floor_ms_per_step": floor * layers / 1e3,
    }
    out = Path(args.out or f"benchmarks/results/speculation-floor-p{args.prompt_len}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
