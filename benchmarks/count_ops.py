"""Count the ops the executor dispatches per phase of a decode step, per policy.

The simulator charges the host a launch overhead per dispatched op; its op counts
(sim/costs.py: QKV_OPS, ATTEND_OPS, FFN_OPS, SPEC_OPS, ...) come from this script. Every
PyTorch dispatcher call counts (views included), attributed to the timed phase it runs in
("outside": between phases: bookkeeping, sampling). Random weights; decode steps only.
--live: the same for a live server's decode steps (executor/serving.py) at 1, 2 and 4 running
sequences, where each sequence attends through its own policy (sim/costs.py: APART_ATTEND_OPS,
SEQUENCE_OPS are the per-sequence increments).

    .venv/bin/python benchmarks/count_ops.py [--model smollm2-135m] [--live] [--out PATH]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from infinisim.executor import timing
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import make_policy
from infinisim.executor.serving import LiveBatch

POLICIES = ("resident", "full", "infinigen", "h2o", "int4")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a small named architecture (random weights)")
    p.add_argument("--live", action="store_true", help="count a live server's decode steps at 1, 2 and 4 sequences")
    p.add_argument("--out", help="JSON path (default benchmarks/results/op-counts.json, -live.json with --live)")
    args = p.parse_args()

    loaded = load_model(args.model, "float32", "cpu", random_weights=True)
    n_layers = loaded.model.spec.n_layers
    phase = ["outside"]
    counts: collections.Counter[str] = collections.Counter()
    counting = [False]
    original_span = timing.Recorder.span

    @contextlib.contextmanager
    def span(self: timing.Recorder, layer: int | None, name: str, stream: object = None,
             host: bool = False) -> Iterator[None]:
        outer, phase[0] = phase[0], name
        with original_span(self, layer, name, stream, host):
            yield
        phase[0] = outer

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0]:
                counts[phase[0]] += 1
            return func(*args, **(kwargs or {}))

    def per_step(n_steps: int) -> dict[str, float]:
        return {k: round(v / n_steps if k in ("embed", "head", "outside") else v / n_steps / n_layers, 1)
                for k, v in counts.items()}

    steps = 4

    def static(name: str) -> Callable[[], None]:
        """generate's decode steps, counted from the first on."""
        def run() -> None:
            def after_step(record: object) -> None:
                counting[0] = True

            generate(loaded.model, [list(range(1, 300))], make_policy(name),
                     SamplingConfig(steps + 1, stop_at_eos=False), after_step)
        return run

    def live(name: str, batch: int) -> Callable[[], None]:
        """A live server's decode steps of `batch` running sequences (prefilled and warmed up first)."""
        server, keys = LiveBatch(loaded.model, name), list(range(batch))
        for key in keys:
            server.prefill(key, list(range(1, 200 + key)), 300)
        server.decode(keys)

        def run() -> None:
            counting[0] = True
            for _ in range(steps):
                server.decode(keys)
        return run

    cases = [(f"{name} x{batch}", functools.partial(live, name, batch)) for name in POLICIES for batch in (1, 2, 4)] \
        if args.live else [(name, functools.partial(static, name)) for name in POLICIES]
    timing.Recorder.span = span  # type: ignore[method-assign]
    results = {}
    try:
        for label, make in cases:
            run = make()
            counts.clear()
            with Count():
                run()
            counting[0] = False
            results[label] = per_step(steps)
            print(f"{label:<12} {results[label]}  (embed/head/outside: per step; others: per layer)")
    finally:
        timing.Recorder.span = original_span  # type: ignore[method-assign]
    out = Path(args.out or f"benchmarks/results/op-counts{'-live' if args.live else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "layers": n_layers, "ops": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
