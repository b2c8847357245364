"""`infinisim plan`: which hardware, batch and policy settings meet a target."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.cli.output import Progress, print_json, table
from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_output_dir

DEFAULT_POLICIES = "full,int4,h2o,infinigen"


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "plan", cmd_plan, "what-if sweep: which hardware, batch and budget meet a target")
    p.add_argument("--sweep", help="YAML sweep file (axes: profiles, models, batches, prompt_lens, gen_lens, "
                                   "policies; optional knob axes budgets, alphas, partial_ratios, ... (see "
                                   "docs/SIMULATOR.md), dtype, speculated_fraction); flags given here override it")
    p.add_argument("--model", type=flags.names, help="named models, comma-separated (required without --sweep)")
    p.add_argument("--profile", type=flags.names, help="profiles, comma-separated (default: all shipped)")
    p.add_argument("--batch", type=flags.int_list, help="batch sizes (default 1,2,4,8,16,32)")
    p.add_argument("--prompt-len", type=flags.int_list, help="prompt lengths (default 2048)")
    p.add_argument("--gen-len", type=flags.int_list, help="generated tokens (default 128)")
    flags.add_policy_flags(p, None, f"each swept; default {DEFAULT_POLICIES}")
    p.add_argument("--dtype", choices=flags.DTYPES, help="weights and KV cache (default float16)")
    flags.add_knob_flags(p, axes=True)
    flags.add_share_flags(p, axes=True)
    flags.add_weights_flag(p, axes=True)
    flags.add_tp_flag(p, axes=True)
    p.add_argument("--quality", nargs="+", metavar="TRACE",
                   help="quality traces (`infinisim run --quality`) of the policies planned: the table gets the "
                        "recall, top-k overlap and perplexity ratio to expect at each config's fetched fraction, "
                        "interpolated between the measured ones (blank outside them)")
    p.add_argument("--target-ms", type=flags.positive_float, help="per-token (decode step) latency target in ms")
    p.add_argument("--min-throughput", type=flags.positive_float, help="throughput floor in tokens/s")
    p.add_argument("--out", default="plans/latest", help="folder for plan.csv, plan.parquet, cache (default "
                                                         "plans/latest)")
    p.add_argument("--cache", help="results cache (JSON lines; default OUT/cache.jsonl)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--workers", type=flags.positive, help="local processes (default: one per core)")
    run.add_argument("--serial", action="store_true", help="one config after another in this process")
    run.add_argument("--scheduler", help="Dask scheduler address tcp://HOST:PORT ('local' starts a LocalCluster)")
    p.add_argument("--exact", action="store_true",
                   help="simulate every config event by event (slower; the default computes the same answer "
                        "directly, docs/SIMULATOR.md)")
    p.add_argument("--json", action="store_true", help="print the best configs as JSON instead of a summary")
    flags.add_stream_flags(p, "search")
    flags.add_scheduler_flags(p)
    p.epilog = ("With --requests: capacity planning for a request stream instead of a static batch: per hardware x "
                "model x policy x knobs, the largest request rate (the stream's arrivals scaled) served within "
                "--slo, by a search over the rate (the batch and length axes do not apply). " + flags.EPILOG)


def cmd_plan(args: argparse.Namespace) -> int:
    """Simulate every combination of the given axes (or a YAML sweep file), flag configs that do not
    fit in memory, and report the Pareto front of latency vs throughput per hardware, the best config
    per hardware under a latency target, and the largest batch that meets it. Runs over local
    processes (default), serially, or on a Dask cluster; results are cached per config, so an
    interrupted or repeated sweep resumes."""
    from infinisim.analysis.planner import make_plan, placement_columns
    from infinisim.analysis.sweep import Sweep, load_sweep
    from infinisim.hwprofiles.profile import builtin_profiles

    check_output_dir(args.out, "--out")
    if args.requests:
        return _capacity(args)
    if args.sweep:
        sweep = load_sweep(args.sweep)
    elif not args.model:
        raise InfinisimError("give --model (or a --sweep file)", field="--model")
    else:
        sweep = Sweep(args.profile or list(builtin_profiles()), args.model, args.batch or [1, 2, 4, 8, 16, 32],
                      args.prompt_len or [2048], args.gen_len or [128],
                      flags.policy_names(args.policy or DEFAULT_POLICIES))
    if args.policy:
        sweep.policies = flags.policy_names(args.policy)
    sweep.knobs.update(flags.knobs_given(args))
    sweep.dtype = args.dtype or sweep.dtype
    sweep.exact = args.exact
    if args.weights_on_host != [0.0]:
        sweep.weights_on_host = args.weights_on_host
    if args.tp != [1]:
        sweep.tp = args.tp
    if args.speculated_fraction is not None:
        sweep.speculated_fraction = args.speculated_fraction
    if args.from_trace:
        from infinisim.sim.workload import speculated_by_alpha
        from infinisim.traces.trace import read_trace

        sweep.speculated_by_alpha = speculated_by_alpha(read_trace(args.from_trace))
    n = len(sweep.configs())
    sizes = ", ".join(f"{len(getattr(sweep, a))} {a}" for a in ("profiles", "models", "batches", "policies"))
    print(f"{n} configs ({sizes}, ...)", file=sys.stderr)
    with Progress("plan", n, "configs") as bar:
        plan = make_plan(sweep, args.out, cache=args.cache, workers=args.workers, scheduler=args.scheduler,
                         serial=args.serial, quality=args.quality, target_ms=args.target_ms,
                         min_throughput=args.min_throughput, command=args.command_line,
                         progress=lambda done, total: bar.update(done))
    best = plan.best()
    if args.json:
        print_json(best.to_dict(orient="records"))
        return 0 if len(plan.fit) else 1
    fit, rows = plan.fit, plan.rows
    print(f"{len(rows)} configs: {len(fit)} fit, {len(rows) - len(fit)} do not")
    if len(fit) < len(rows):
        print("  why: " + ", ".join(f"{name} ({k})" for name, k in plan.why_not().items())
              + "  (details in the table's does_not_fit column)")
    target = f"decode <= {args.target_ms:g} ms/step" if args.target_ms else "no latency target"
    if args.min_throughput:
        target += f", >= {args.min_throughput:g} tok/s"
    print(f"\nbest per hardware ({target}):")
    placed = placement_columns(rows)
    cols = ["profile", "model", "policy", "batch", "prompt_len", "budget", *placed, "decode_ms", "tokens_per_s",
            "device_gb"]
    if args.quality:
        cols += ["fetched_fraction", "expected_recall", "expected_ppl_ratio"]
    print(table(best[cols]) if not best.empty else "  none")
    if args.target_ms:
        biggest = plan.largest_batch()
        print(f"\nlargest batch meeting {args.target_ms:g} ms/step:")
        print(table(biggest[["profile", "model", "policy", "prompt_len", *placed, "batch", "decode_ms",
                             "tokens_per_s"]])
              if not biggest.empty else "  none")
    front = plan.front()
    print(f"\nPareto front (latency vs throughput): {len(front)} configs over {front['profile'].nunique()} profiles")
    if args.quality:
        print("\n(expected_recall / expected_ppl_ratio: measured on the --quality traces' model and prompt at the same "
              "fetched fraction; blank where no trace brackets it)")
    print(f"\nwrote {plan.files[0]} and {plan.files[1]}")
    return 0 if len(fit) else 1  # as simulate: nothing fits is a failure, the table says why


def _capacity(args: argparse.Namespace) -> int:
    from infinisim.analysis.planner import make_capacity
    from infinisim.analysis.serving import capacity_configs, serving_share
    from infinisim.analysis.sweep import Sweep
    from infinisim.hwprofiles.profile import builtin_profiles
    from infinisim.sim.latency import parse_slo
    from infinisim.traces.requests import attribution

    for name in ("batch", "prompt_len", "gen_len", "target_ms", "min_throughput", "sweep"):
        if getattr(args, name):
            raise InfinisimError("does not apply with --requests (the stream sets the lengths and the server the "
                                 "batch; the SLO is the target)", field="--" + name.replace("_", "-"))
    if not args.model:
        raise InfinisimError("give --model", field="--model")
    slo, stream = parse_slo(args.slo), flags.stream_spec(args)
    base = stream.build()  # a bad trace fails here, before any search
    sweep = Sweep(args.profile or list(builtin_profiles()), args.model, [1], [1], [1],
                  flags.policy_names(args.policy or DEFAULT_POLICIES), dtype=args.dtype or "float16")
    sweep.knobs.update(flags.knobs_given(args))
    sweep.tp = args.tp
    sweep.weights_on_host = [serving_share(w) for w in args.weights_on_host]  # before any search
    sweep.speculated_fraction = args.speculated_fraction
    if args.from_trace:
        from infinisim.sim.workload import speculated_by_alpha
        from infinisim.traces.trace import read_trace

        sweep.speculated_by_alpha = speculated_by_alpha(read_trace(args.from_trace))
    missing = sweep.needs_share()
    if missing:
        raise InfinisimError(f"{missing[0]} needs a speculated fraction: --speculated-fraction, or --from-trace",
                             field="--speculated-fraction")
    configs = capacity_configs(sweep, stream, slo, flags.scheduler(args))
    print(f"{len(configs)} capacity searches over {len(base)} requests ({base.source}); SLO {slo.describe()}",
          file=sys.stderr)
    with Progress("plan", len(configs), "searches") as bar:
        rows, files = make_capacity(configs, args.out, cache=args.cache, workers=args.workers,
                                    scheduler=args.scheduler, serial=args.serial, quality=args.quality,
                                    command=args.command_line, attribution=attribution(base),
                                    progress=lambda done, total: bar.update(done))
    placed = ["tp"] if len(args.tp) > 1 else []
    shown = [c for c in ("profile", "model", "policy", *placed, "budget", "max_rate", "at_max_ttft_p99_s",
                         "at_max_tpot_p99_s",
                         "at_max_throughput_rps", "at_max_mean_batch", "at_max_preemptions", "fetched_fraction",
                         "expected_recall", "expected_ppl_ratio", "does_not_fit") if c in rows.columns]
    if args.json:
        print_json(rows[shown].to_dict(orient="records"))
    else:
        print(f"largest request rate within {slo.describe()}:")
        print(table(rows[shown].rename(columns=lambda c: c.removeprefix("at_max_"))))
        credit = attribution(base)
        if credit:
            print(f"({credit})")
        print(f"\nwrote {files[0]} and {files[1]}")
    return 0 if rows["fits"].any() else 1
