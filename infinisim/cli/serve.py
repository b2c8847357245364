"""`infinisim serve`: a request stream served with continuous batching, simulated on a hardware profile."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

from infinisim.cli import flags
from infinisim.cli.output import Progress, describe_stream, print_json
from infinisim.core.files import atomic_path, check_output_dir, write_json


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "serve", cmd_serve, "simulate serving a request stream: TTFT, TPOT, throughput, goodput")
    flags.add_simulated_config_flags(p, "resident", "each serves the same stream")
    flags.add_tp_flag(p)
    flags.add_weights_flag(p, serving=True)
    flags.add_stream_flags(p)
    flags.add_scheduler_flags(p)
    p.add_argument("--out", help="folder to write serving.json and one requests-<policy>.csv per policy into")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a request stream (a trace in the Azure LLM inference format, scaled and windowed, or
    synthetic Poisson/Gamma arrivals) on a hardware profile under each policy, with iteration-level
    (continuous) batching: admission by running sequences, tokens per iteration and KV memory,
    whole or chunked prefill, preemption by recompute. Prints per policy the p50/p90/p99 of
    queueing, time to first token (TTFT), time per output token (TPOT) and end-to-end latency,
    throughput, and goodput under the SLO."""
    from infinisim.analysis.serving import ServeConfig, request_table, serve, serving_share
    from infinisim.cli.simulate import with_link
    from infinisim.core.policies import policy
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.latency import parse_slo
    from infinisim.sim.run import speculated_from_trace
    from infinisim.traces.requests import attribution
    from infinisim.traces.spec import named_model
    from infinisim.traces.trace import read_trace

    if args.out:
        check_output_dir(args.out, "--out")
    slo, schedule = parse_slo(args.slo), flags.scheduler(args)
    policies, spec = flags.policy_names(args.policy), named_model(args.model)
    profile = with_link(load_profile(args.profile), args.link)
    share: Any = args.speculated_fraction
    if args.from_trace:
        share = float(np.nanmean(speculated_from_trace(read_trace(args.from_trace), args.alpha, spec)))  # per layer
    stream = flags.stream_spec(args).build()
    knobs = flags.knobs_given(args)
    configs = [ServeConfig(profile.name, args.model, name, tuple(sorted(
        (k, v) for k, v in knobs.items() if k in policy(name).knob_names)), args.dtype, share, schedule, args.tp,
        serving_share(args.weights_on_host)) for name in policies]
    for c in configs:
        c.costs(profile)  # every policy's knobs and share checked before any serving
    print(describe_stream(stream), file=sys.stderr)
    with Progress("serve", len(configs), "policies") as bar:
        served = serve(stream, configs, slo, profile, lambda done, total: bar.update(done))
    rows = [row for row, _ in served]
    credit = attribution(stream)
    if args.out:
        out = Path(args.out)
        for (row, result) in served:
            columns = request_table(result)
            with atomic_path(out / f"requests-{row['policy']}.csv") as tmp, tmp.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(zip(*columns.values(), strict=True))
        write_json({"command": args.command_line, "stream": stream.source, "attribution": credit, "rows": rows},
                   out / "serving.json")
        print(f"wrote {out / 'serving.json'} and {len(served)} requests-<policy>.csv", file=sys.stderr)
    if args.json:
        print_json({"stream": stream.source, "attribution": credit, "rows": rows})
    else:
        print_table(rows)
        if args.tp > 1:
            print(f"({args.model} over {args.tp} GPUs of {profile.name}, tensor-parallel)")
        if rows and rows[0]["too_long"]:
            print(f"({rows[0]['too_long']} requests longer than {args.model}'s positions were refused and are not in "
                  "the table)")
        if credit:
            print(f"({credit})")
    return 0 if any(r["completed"] for r in rows) else 1


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'policy':<10} {'done':>5} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'TPOT p50':>9} {'p90':>6} {'p99':>6} "
          f"{'e2e p50':>8} {'p99':>7} {'req/s':>6} {'tok/s':>7} {'goodput':>7} {'batch':>6} {'preempt':>7}  SLO")
    for r in rows:
        print(f"{r['policy']:<10} {r['completed']:>5} {_s(r['ttft_p50_s']):>9} {_s(r['ttft_p90_s']):>7} "
              f"{_s(r['ttft_p99_s']):>7} {_ms(r['tpot_p50_s']):>9} {_ms(r['tpot_p90_s']):>6} {_ms(r['tpot_p99_s']):>6} "
              f"{_s(r['e2e_p50_s']):>8} {_s(r['e2e_p99_s']):>7} {r['throughput_rps']:>6.2f} "
              f"{r['output_tokens_per_s']:>7.0f} {r['goodput_rps']:>7.2f} {r['mean_batch']:>6.1f} "
              f"{r['preemptions']:>7}  {'met' if r['meets_slo'] else 'missed'}")
    if rows:
        print(f"(TTFT and end-to-end in s, TPOT in ms; goodput: requests/s meeting the SLO, {rows[0]['slo']}; batch: "
              "mean sequences decoded per iteration)")


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.0f}"
