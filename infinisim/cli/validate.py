"""`infinisim validate`: the simulator against the executor on this machine."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.cli.output import PerPolicy, describe_stream, print_json
from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_output_dir


def add_validate_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "validate", cmd_validate, "run (or take traces), replay, report predicted vs measured")
    p.add_argument("--trace", nargs="+", help="existing traces to validate against (skips the run)")
    p.add_argument("--profile", help="profile to replay on (default: calibrate this machine first)")
    flags.add_policy_flags(p, "resident,full,infinigen", "each run and replayed")
    p.add_argument("--batch", type=flags.positive, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-len", type=flags.positive, default=1024,
                   help="prompt tokens from Python's bundled documentation text (default 1024)")
    p.add_argument("--gen-len", type=flags.positive, default=32, help="new tokens per sequence (default 32)")
    flags.add_model_flags(p)
    flags.add_device_flags(p)
    flags.add_knob_flags(p)
    flags.add_link_flag(p)
    flags.add_weights_flag(p, live=True)
    p.add_argument("--tp", type=flags.positive, default=1,
                   help="tensor parallelism: run N ranks (as `run --tp`), calibrate one rank and the all-reduce "
                        "between them (unless --profile), replay each rank's trace (default 1)")
    p.add_argument("--out", default="validation", help="folder for profile, traces, JSON and plot (default "
                                                       "validation/)")
    p.add_argument("--quick", action="store_true", help="calibrate as `infinisim calibrate --quick` does (seconds, "
                                                       "less accurate)")
    flags.add_stream_flags(p, "live")
    flags.add_scheduler_flags(p)
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def cmd_validate(args: argparse.Namespace) -> int:
    """Cross-validate the simulator on this machine: calibrate (or take --profile), run the executor
    for each policy (or take --trace files), replay each run, and report predicted vs measured per
    step (MAPE, p50/p90), per phase, end to end, the worst layer; writes a JSON and a plot of
    predicted vs measured per step."""
    from pathlib import Path

    from infinisim.analysis.validation import validate

    check_output_dir(args.out, "--out")
    traces = read_traces(args.trace) if args.trace else None
    if args.requests or (traces and traces[0].serving):
        return validate_requests(args, traces)
    data = validate(args.out, traces=traces, profile=args.profile, policies=flags.policy_names(args.policy),
                    batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, model=args.model,
                    random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                    quick_calibration=args.quick, knobs=flags.knobs_given(args), link=args.link,
                    weights_on_host=args.weights_on_host, tp=args.tp, command=args.command_line,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print_json({"comparisons": data["comparisons"], "relative": data["relative"]})
    else:
        print_comparisons(data["comparisons"], data["relative"])
    print(f"wrote {Path(args.out) / 'validation.json'} and {Path(args.out) / 'validation.png'}", file=sys.stderr)
    return 0


def read_traces(paths: list[str]) -> list:
    """The --trace files, read once: all a live server's (serving traces) or all batch traces."""
    from infinisim.traces.trace import read_trace

    traces = [read_trace(p) for p in paths]
    if len({t.serving is not None for t in traces}) > 1:
        raise InfinisimError("give either serving traces (run --requests) or batch traces, not both",
                             field="--trace")
    return traces


def validate_requests(args: argparse.Namespace, traces: list | None) -> int:
    """The serving simulator against the live server: `validate --requests` (or serving --trace files)."""
    from pathlib import Path

    from infinisim.analysis.live_serving import refuse_unservable
    from infinisim.analysis.serving_validation import validate_serving
    from infinisim.sim.latency import parse_slo

    refuse_unservable(args.prefill, args.tp)
    slo = parse_slo(args.slo)
    stream = flags.stream_spec(args).build() if not traces else None
    if stream is not None:
        print(describe_stream(stream), file=sys.stderr)
    progress = PerPolicy("requests")
    try:
        data = validate_serving(args.out, stream, flags.scheduler(args), slo, traces=traces, profile=args.profile,
                                policies=flags.policy_names(args.policy), model=args.model,
                                random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                                quick_calibration=args.quick, knobs=flags.knobs_given(args), link=args.link,
                                weights_on_host=args.weights_on_host, command=args.command_line,
                                log=lambda line: print(line, file=sys.stderr, flush=True), on_iteration=progress.update)
    finally:
        progress.close()
    if args.json:
        print_json({k: data[k] for k in ("stream", "attribution", "slo", "comparisons")})
    else:
        print_serving(data)
    print(f"wrote {Path(args.out) / 'serving_validation.json'} and {Path(args.out) / 'serving_validation.png'}",
          file=sys.stderr)
    return 0


def print_serving(data: dict) -> None:
    names = {"ttft_p50_s": "TTFT p50", "ttft_p90_s": "TTFT p90", "tpot_p50_s": "TPOT p50", "tpot_p90_s": "TPOT p90",
             "e2e_p50_s": "e2e p50", "e2e_p90_s": "e2e p90", "throughput_rps": "req/s",
             "output_tokens_per_s": "tok/s"}
    print(f"{'policy':<10} {'':<9}" + "".join(f" {n:>9}" for n in names.values()))
    for c in data["comparisons"]:
        agg = c["aggregate"]
        for side in ("measured", "predicted"):
            print(f"{c['policy'] if side == 'measured' else '':<10} {side:<9}" + "".join(
                f" {_value(k, agg[k][side]):>9}" for k in names))
        print(f"{'':<10} {'error':<9}" + "".join(
            f" {'-' if agg[k]['error_pct'] is None else format(agg[k]['error_pct'], '+.1f') + '%':>9}" for k in names))
        per = c["per_request"]
        errors = [f"{n[:-2].upper()} {per[n]['p50']:.1f}%" for n in ("ttft_s", "tpot_s", "e2e_s")
                  if per[n]["p50"] is not None]
        print(f"{'':<10} per request, median |error|: " + ", ".join(errors))
        f = c["forwards"]
        print(f"{'':<10} measured / predicted time of the same forwards: prefills x{f['prefill_ratio']:.2f}, "
              "decode steps at batch " + ", ".join(f"{b}: x{v['ratio']:.2f}" for b, v in f["decode_by_batch"].items()))
    print(f"(TTFT, e2e in s; TPOT in ms; {data['stream']})")
    if data["attribution"]:
        print(f"({data['attribution']})")


def _value(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.1f}" if key.startswith("tpot") else f"{v:.3f}" if key.endswith("_s") else f"{v:.2f}"


def print_comparisons(comparisons: list[dict], ratios: list[dict]) -> None:
    print(f"{'policy':<12} {'batch':>5} {'prompt':>6} {'measured':>9} {'predicted':>9} {'mean':>6} {'MAPE':>6} "
          f"{'floor':>6} {'p50':>6} {'p90':>6} {'end-to-end':>10}  worst phase")
    for c in comparisons:
        phases = {k: v for k, v in c["phases"].items() if "error_pct" in v}
        worst = max(phases, key=lambda k: abs(phases[k]["error_pct"])) if phases else "-"
        worst_text = f"{worst} {phases[worst]['error_pct']:+.0f}%" if phases else "-"
        label = c["policy"] + (f"@r{c['rank']}" if "rank" in c else "")
        step = c["step"]
        print(f"{label:<12} {c['batch']:>5} {c['prompt_len']:>6} {c['decode_ms_measured']:>7.1f}ms "
              f"{c['decode_ms_predicted']:>7.1f}ms {c['decode_total_s']['error_pct']:>+5.1f}% {step['mape']:>5.1f}% "
              f"{step['mape_floor']:>5.1f}% {step['p50']:>5.1f}% {step['p90']:>5.1f}% "
              f"{c['end_to_end_s']['error_pct']:>+9.1f}%  {worst_text}")
    print("(ms per decode step, means; mean: error of the mean step; MAPE/p50/p90: error per decode step; floor: "
          "the MAPE of the measured mean itself, what the steps' own spread costs a one-value prediction; "
          "end-to-end: prefill + decode)")
    print()
    for r in (r for r in ratios if r["versus"] != r["policy"]):
        print(f"{r['policy']:<10} / {r['versus']:<10} decode time ratio: measured {r['measured']:.3f}, "
              f"predicted {r['predicted']:.3f} ({r['error_pct']:+.1f}%)")
