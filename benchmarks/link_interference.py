"""How much an emulated link's copy threads slow the compute beside them, and why.

SmolLM2 (CPU, float32, batch 1, prompt 1024, 8 new tokens) decodes under `full` with half of every
block's weights on the host over an emulated link (`run --policy full --weights-on-host 0.5 --link
0.5GB/s`): while layer i computes, the copy thread lands layer i+1's weights and the compute thread
then waits for them. Its attention and FFN per decode step are set beside the same model's
resident run without a link (what `calibrate` sees: compute back to back). Each case runs in its
own process, because OpenMP reads its wait policy once, when torch loads it:

- copies by torch's `copy_` on the copy thread (the link before 2026-12-06) or by the link's own
  `memcpy` (numpy, one thread);
- GNU OpenMP's default wait (idle workers spin ~3 ms, then sleep), GOMP_SPINCOUNT=20000000 (~200
  ms: what `import infinisim` sets unless the user chose) or OMP_WAIT_POLICY=ACTIVE (spin forever).

    .venv/bin/python benchmarks/link_interference.py [--link 0.5GB/s] [--out PATH]

Prints and writes (JSON) each case's attention and FFN ms per decode step and the ratio of their
sum to the resident run's in the same process (about a minute here).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import torch  # noqa: F401  before infinisim: OpenMP takes the wait this process was started with

from infinisim.cli import main as cli
from infinisim.core.files import write_json
from infinisim.executor import link as link_module

WAITS = {"default": {}, "spin 200 ms": {"GOMP_SPINCOUNT": "20000000"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"}}
CASES = [("default", "torch"), ("default", "memcpy"), ("spin 200 ms", "torch"), ("spin 200 ms", "memcpy"),
         ("active", "memcpy")]
RUN = ["run", "--batch", "1", "--prompt-len", "1024", "--gen-len", "8", "--json"]


def decode_ms(argv: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()) as text:
        if cli([*RUN, *argv, "--out", out]) != 0:
            raise SystemExit(f"infinisim {' '.join(argv)} failed")
    summary = json.loads(text.getvalue())["summaries"][0]
    return {"attn_ms": summary["decode_attn_ms"], "ffn_ms": summary["decode_ffn_ms"],
            "step_ms": summary["decode_ms_mean"]}


def child(copy: str, link: str) -> dict[str, object]:
    if copy == "torch":
        link_module.memcpy = lambda dst, src: dst.copy_(src)
    alone = decode_ms(["--policy", "resident"])
    beside = decode_ms(["--policy", "full", "--weights-on-host", "0.5", "--link", link])
    return {"resident_no_link": alone, "full_streamed": beside,
            "compute_ratio": (beside["attn_ms"] + beside["ffn_ms"]) / (alone["attn_ms"] + alone["ffn_ms"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--link", default="0.5GB/s", help="the emulated link (as run's --link; default 0.5GB/s)")
    ap.add_argument("--out", default="benchmarks/results/link-interference.json", help="JSON output path")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.link)))
        return 0
    results = []
    for policy, copy in CASES:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(WAITS[policy])
        # the child imports torch before infinisim: OpenMP sees the environment given here
        out = subprocess.run([sys.executable, __file__, "--child", copy, "--link", args.link], env=env,
                             capture_output=True, text=True, check=True)
        r = {"wait_policy": policy, "copy": copy, **json.loads(out.stdout.strip().splitlines()[-1])}
        results.append(r)
        a, b = r["resident_no_link"], r["full_streamed"]
        print(f"OpenMP wait {policy + ',':12s} copies by {copy + ':':7s} attention + FFN "
              f"{b['attn_ms']:.1f} + {b['ffn_ms']:.1f} ms a step beside the link, "
              f"{a['attn_ms']:.1f} + {a['ffn_ms']:.1f} resident without one "
              f"({r['compute_ratio']:.2f}x); full's step {b['step_ms']:.1f} ms", flush=True)
    write_json({"link": args.link, "command": "benchmarks/link_interference.py", "cases": results}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
