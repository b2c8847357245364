"""`infinisim validate`: the simulator against the executor on this machine."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.cli.output import print_json
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
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def cmd_validate(args: argparse.Namespace) -> int:
    """Cross-validate the simulator on this machine: calibrate (or take --profile), run the executor
    for each policy (or take --trace files), replay each run, and report predicted vs measured per
    step (MAPE, p50/p90), per phase, end to end, the worst layer; writes a JSON and a plot of
    predicted vs measured per step."""
    from pathlib import Path

    from infinisim.analysis.validation import validate

    check_output_dir(args.out, "--out")
    data = validate(args.out, traces=args.trace, profile=args.profile, policies=flags.policy_names(args.policy),
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


def print_comparisons(comparisons: list[dict], ratios: list[dict]) -> None:
    print(f"{'policy':<10} {'batch':>5} {'prompt':>6} {'measured':>9} {'predicted':>9} {'MAPE':>6} {'p50':>6} "
          f"{'p90':>6} {'end-to-end':>10}  worst phase")
    for c in comparisons:
        phases = {k: v for k, v in c["phases"].items() if "error_pct" in v}
        worst = max(phases, key=lambda k: abs(phases[k]["error_pct"])) if phases else "-"
        worst_text = f"{worst} {phases[worst]['error_pct']:+.0f}%" if phases else "-"
        label = c["policy"] + (f"@r{c['rank']}" if "rank" in c else "")
        print(f"{label:<10} {c['batch']:>5} {c['prompt_len']:>6} {c['decode_ms_measured']:>7.1f}ms "
              f"{c['decode_ms_predicted']:>7.1f}ms {c['step']['mape']:>5.1f}% {c['step']['p50']:>5.1f}% "
              f"{c['step']['p90']:>5.1f}% {c['end_to_end_s']['error_pct']:>+9.1f}%  {worst_text}")
    print("(ms per decode step, means; MAPE/p50/p90: error per decode step; end-to-end: prefill + decode)")
    print()
    for r in (r for r in ratios if r["versus"] != r["policy"]):
        print(f"{r['policy']:<10} / {r['versus']:<10} decode time ratio: measured {r['measured']:.3f}, "
              f"predicted {r['predicted']:.3f} ({r['error_pct']:+.1f}%)")
