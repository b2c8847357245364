"""The simulator's verbs: `profiles`, `calibrate`, `replay`, `simulate`, `validate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from infinisim.cli.args import floats, int_list, names, policy_names, positive
from infinisim.core.errors import InfinisimError
from infinisim.core.files import write_text_atomic

EPILOG = "Docs: docs/SIMULATOR.md. Errors exit with status 1, usage errors with 2."


def _write_json(data: Any, path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, default=float))


# ------------------------------------------------------------------ profiles


def add_profiles_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="list or show hardware profiles", epilog=EPILOG,
                       description="The shipped hardware profiles (hwprofiles/data/*.yaml), or one profile in full.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="one line per shipped profile")
    show = verbs.add_parser("show", help="one profile, validated, in base units")
    show.add_argument("profile", help="a shipped profile's name or a YAML file")
    p.set_defaults(func=cmd_profiles)


def cmd_profiles(args: argparse.Namespace) -> int:
    import yaml

    from infinisim.hwprofiles.profile import builtin_profiles, load_profile

    if args.verb == "show":
        profile = load_profile(args.profile)
        print(f"# {profile.path}")
        print(yaml.safe_dump(profile.to_dict(), sort_keys=False, width=110), end="")
        return 0
    print(f"{'name':<17} {'device':<24} {'memory':>7} {'FLOP/s 16b':>10} {'HBM/DRAM':>9} {'link':<13} "
          f"{'H2D':>9} {'host':>8}")
    for name in builtin_profiles():
        p = load_profile(name)
        d, link = p.device, p.link
        print(f"{name:<17} {d.name[:24]:<24} {d.memory / 1e9:>5.0f}GB {d.matmul_flops / 1e12:>7.0f} T "
              f"{d.memory_bandwidth / 1e9:>6.0f}GB/s {link.name[:13]:<13} {link.h2d_bandwidth / 1e9:>5.1f}GB/s "
              f"{p.host.memory / 1e9:>6.0f}GB")
    print("(`infinisim profiles show NAME` for sources and every field; `infinisim calibrate` measures this machine)")
    return 0


# ------------------------------------------------------------------ calibrate


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this machine and write a hardware profile", epilog=EPILOG,
                       description="Measure copies over a sweep of sizes, gathers of scattered KV rows, matmul and "
                                   "attention kernels over decoding's shapes, and the per-op launch overhead; write "
                                   "them as a profile YAML usable with replay, simulate and validate. Needs torch.")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the streaming and attention measurements (default float32)")
    p.add_argument("--quick", action="store_true", help="a few seconds, smaller shapes (for tests and smoke runs)")
    p.add_argument("--name", help="profile name (default calibrated-HOSTNAME)")
    p.add_argument("--out", default="profiles/calibrated.yaml", help="YAML to write (default profiles/calibrated.yaml)")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    import torch

    from infinisim.executor.calibrate import calibrate
    from infinisim.hwprofiles.profile import write_profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InfinisimError("--device cuda, but torch sees no CUDA device", field="device")
    t0 = time.perf_counter()
    profile = calibrate(device, args.dtype, args.quick, args.name, log=lambda line: print(line, file=sys.stderr))
    path = write_profile(profile, args.out)
    print(f"wrote {path} ({profile.name}, {time.perf_counter() - t0:.0f} s)")
    return 0


# ------------------------------------------------------------------ replay and simulate


def _print_results(results: list[dict[str, Any]]) -> None:
    print(f"{'policy':<10} {'batch':>5} {'prompt':>6} {'prefill s':>9} {'ms/step':>9} {'total s':>8} {'tok/s':>8} "
          f"{'compute':>8} {'spec':>7} {'gather':>7} {'copy':>7} {'wait':>7} {'link':>5} {'dev GB':>7} "
          f"{'host GB':>7}")
    for r in results:
        head = f"{r['policy']:<10} {r['batch']:>5} {r['prompt_len']:>6}"
        if not r["fits"]:
            print(f"{head}  does not fit: {r['does_not_fit']}")
            continue
        ph = r["decode_phase_ms"]
        compute = ph["attn"] + ph["ffn"] + ph["embed"] + ph["head"]
        print(f"{head} {r['prefill_s']:>9.3f} {r['decode_ms_mean']:>9.2f} {r['total_s']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {compute:>8.2f} {ph['spec']:>7.2f} {ph['gather']:>7.2f} "
              f"{ph['h2d'] + ph['d2h']:>7.2f} {ph['wait']:>7.2f} {r['link_utilisation']:>5.0%} "
              f"{r['device_peak_gb']:>7.2f} {r['host_peak_gb']:>7.2f}")
    print("(ms per decode step; compute = attention + FFN + embed + head; copy = H2D + D2H busy time; wait = "
          "compute stalled on copies; link = share of the run the link was busy)")


def _run_workloads(workloads: list[Any], profile: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from infinisim.sim.engine import chrome_trace, simulate
    from infinisim.sim.memory import memory_plan

    results = []
    for i, w in enumerate(workloads):
        plan = memory_plan(w, profile)
        if plan.problem is not None:
            results.append({"policy": w.policy, "batch": w.batch, "prompt_len": w.prompt_len, "fits": False,
                            "does_not_fit": plan.problem, "profile": profile.name, "model": w.spec.name})
            continue
        result = simulate(w, profile, timeline=bool(args.timeline))
        summary = result.summary()
        summary["decode_step_ms"] = (result.decode_step_s * 1e3).round(4).tolist()
        results.append(summary)
        if args.timeline:
            path = Path(args.timeline)
            if len(workloads) > 1:
                path = path.with_name(f"{path.stem}-{w.policy}-b{w.batch}-p{w.prompt_len}{path.suffix}")
            _write_json(chrome_trace(result), path)
            print(f"timeline ({w.policy}, batch {w.batch}): {path}  (open in ui.perfetto.dev or chrome://tracing)",
                  file=sys.stderr)
        if len(workloads) > 3 and sys.stderr.isatty():
            print(f"\r[{i + 1}/{len(workloads)}] simulated", end="", file=sys.stderr, flush=True)
    if len(workloads) > 3 and sys.stderr.isatty():
        print(file=sys.stderr)
    return results


def _finish(results: list[dict[str, Any]], args: argparse.Namespace) -> int:
    if args.out:
        print(f"wrote {_write_json(results, args.out)}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1, default=float))
    else:
        _print_results(results)
    return 0 if any(r["fits"] for r in results) else 1


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeline", help="write a Chrome/Perfetto timeline JSON here (one per config when several)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def add_replay_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="simulate a trace's run on a hardware profile", epilog=EPILOG,
                       description="Replay the fetch sizes a traced run really made (same model, batch, lengths, "
                                   "policy) on a hardware profile: per-step predicted time with a breakdown, "
                                   "throughput, memory peaks, link use.")
    p.add_argument("trace", nargs="+", help="trace file(s) written by `infinisim run`")
    p.add_argument("--profile", required=True, help="a shipped profile's name (`infinisim profiles list`) or a YAML")
    _add_output_args(p)
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.workload import from_trace
    from infinisim.traces.trace import read_trace

    profile = load_profile(args.profile)
    workloads = [from_trace(read_trace(path)) for path in args.trace]
    return _finish(_run_workloads(workloads, profile, args), args)


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a described workload on a hardware profile", epilog=EPILOG,
                       description="Simulate any named model at any batch and lengths under a KV policy. For "
                                   "infinigen, the fetched share comes from --fetch-fraction or is re-derived "
                                   "from a speculating trace's within-alpha counts (--from-trace) at --alpha.")
    p.add_argument("--model", required=True, help="named architecture (`infinisim models`)")
    p.add_argument("--profile", required=True, help="a shipped profile's name or a YAML file")
    p.add_argument("--batch", type=int_list, default=[1], help="batch size, or several: 4,8,12 (default 1)")
    p.add_argument("--prompt-len", type=int_list, default=[1920], help="prompt tokens, or several (default 1920)")
    p.add_argument("--gen-len", type=positive, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--policy", default="full", help="resident, full, infinigen, h2o, int4, or several with commas")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    knobs = p.add_argument_group("policy knobs")
    knobs.add_argument("--budget", type=float, help="infinigen/h2o: fetched cap, a fraction or a count (default 0.2)")
    knobs.add_argument("--alpha", type=float, help="infinigen with --from-trace: alpha to re-apply (1..9; default: "
                                                   "the trace's)")
    knobs.add_argument("--partial-ratio", type=float, help="infinigen: partial weight ratio (default 0.3)")
    knobs.add_argument("--dense-layers", type=int, help="infinigen: leading layers fetched whole (default 1)")
    knobs.add_argument("--pool-capacity", type=positive, help="infinigen: host pool tokens per sequence")
    share = knobs.add_mutually_exclusive_group()
    share.add_argument("--fetch-fraction", type=float, help="infinigen: uncapped share of the cache each layer wants")
    share.add_argument("--from-trace", help="infinigen: take each layer's share from this infinigen trace")
    _add_output_args(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.workload import fetched_fraction_per_layer, synthetic
    from infinisim.traces.spec import named_model
    from infinisim.traces.trace import read_trace

    profile = load_profile(args.profile)
    spec = named_model(args.model)
    policies = names(args.policy)
    fraction: Any = args.fetch_fraction
    if args.from_trace:
        trace = read_trace(args.from_trace)
        alpha = args.alpha if args.alpha is not None else trace.run["policy_knobs"].get("alpha", 5)
        fraction = fetched_fraction_per_layer(trace, alpha)
        if len(fraction) != spec.n_layers:  # another model: its layers take the trace's mean share
            fraction = float(np.nanmean(fraction))
    knobs = {"budget": args.budget, "partial_ratio": args.partial_ratio, "dense_layers": args.dense_layers,
             "pool_capacity": args.pool_capacity}
    workloads = []
    for policy in policies:
        own = {k: v for k, v in knobs.items() if v is not None and (
            policy in ("infinigen", "oracle") or (policy == "h2o" and k == "budget"))}
        for prompt_len in args.prompt_len:
            for batch in args.batch:
                workloads.append(synthetic(spec, batch, prompt_len, args.gen_len, policy, args.dtype, own,
                                           fraction if policy in ("infinigen", "oracle") else None))
    return _finish(_run_workloads(workloads, profile, args), args)


# ------------------------------------------------------------------ validate


def add_validate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="run (or take traces), replay, report predicted vs measured", epilog=EPILOG,
                       description="Cross-validate the simulator on this machine: calibrate (or take --profile), "
                                   "run the executor for each policy (or take --trace files), replay each run, and "
                                   "report predicted vs measured per step (MAPE, p50/p90), per phase, end to end, "
                                   "the worst layer; writes a JSON and a plot of predicted vs measured per step.")
    p.add_argument("--trace", nargs="+", help="existing traces to validate against (skips the run)")
    p.add_argument("--profile", help="profile to replay on (default: calibrate this machine first)")
    p.add_argument("--policy", default="resident,full,infinigen", help="policies to run (default resident,full,"
                                                                       "infinigen)")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--prompt-len", type=positive, default=1024)
    p.add_argument("--gen-len", type=positive, default=32)
    p.add_argument("--model", default="smollm2-135m", help="named architecture or model file (default: embedded)")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", default="validation", help="folder for profile, traces, JSON and plot (default "
                                                       "validation/)")
    p.add_argument("--quick-calibration", action="store_true", help="calibrate with --quick (less accurate)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from infinisim.analysis.validation import compare, plot_steps, relative
    from infinisim.hwprofiles.profile import load_profile, write_profile
    from infinisim.sim.engine import simulate
    from infinisim.sim.workload import from_trace
    from infinisim.traces.trace import read_trace, write_trace

    out = Path(args.out)
    traces = [read_trace(p) for p in args.trace] if args.trace else None
    if args.profile:
        profile = load_profile(args.profile)
    else:
        import torch

        from infinisim.executor.calibrate import calibrate

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print("calibrating this machine ...", file=sys.stderr, flush=True)
        profile = calibrate(device, args.dtype, args.quick_calibration,
                            log=lambda line: print(f"  {line}", file=sys.stderr))
        print(f"profile: {write_profile(profile, out / 'profile.yaml')}", file=sys.stderr)
    if traces is None:
        traces = _run_for_validation(args, out, write_trace)
    comparisons = []
    for trace in traces:
        workload = from_trace(trace)
        comparisons.append(compare(workload, simulate(workload, profile)))
    ratios = relative(comparisons)
    _write_json({"command": args.command_line, "comparisons": comparisons, "relative": ratios,
                 "profile": profile.to_dict()}, out / "validation.json")
    plot = plot_steps(comparisons, str(out / "validation.png"), args.command_line)
    if args.json:
        print(json.dumps({"comparisons": comparisons, "relative": ratios}, indent=1, default=float))
    else:
        print(f"{'policy':<10} {'batch':>5} {'prompt':>6} {'measured':>9} {'predicted':>9} {'MAPE':>6} {'p50':>6} "
              f"{'p90':>6} {'end-to-end':>10}  worst phase")
        for c in comparisons:
            phases = {k: v for k, v in c["phases"].items() if "error_pct" in v}
            worst = max(phases, key=lambda k: abs(phases[k]["error_pct"])) if phases else "-"
            worst_text = f"{worst} {phases[worst]['error_pct']:+.0f}%" if phases else "-"
            print(f"{c['policy']:<10} {c['batch']:>5} {c['prompt_len']:>6} {c['decode_ms_measured']:>7.1f}ms "
                  f"{c['decode_ms_predicted']:>7.1f}ms {c['step']['mape']:>5.1f}% {c['step']['p50']:>5.1f}% "
                  f"{c['step']['p90']:>5.1f}% {c['end_to_end_s']['error_pct']:>+9.1f}%  {worst_text}")
        print("(ms per decode step, means; MAPE/p50/p90: error per decode step; end-to-end: prefill + decode)")
        print()
        for r in (r for r in ratios if r["versus"] != r["policy"]):
            print(f"{r['policy']:<10} / {r['versus']:<10} decode time ratio: measured {r['measured']:.3f}, "
                  f"predicted {r['predicted']:.3f} ({r['error_pct']:+.1f}%)")
    print(f"wrote {out / 'validation.json'} and {plot}", file=sys.stderr)
    return 0


def _run_for_validation(args: argparse.Namespace, out: Path, write_trace: Any) -> list[Any]:
    import torch

    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.loaders import load_model
    from infinisim.executor.policies import POLICIES
    from infinisim.executor.prompts import bundled_prompts
    from infinisim.executor.recording import run_policy

    chosen = policy_names(args.policy, POLICIES)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, args.dtype, device, args.random_weights)
    prompts = bundled_prompts(loaded.tokenizer, args.batch, args.prompt_len, loaded.model.spec.vocab_size)
    sampling = SamplingConfig(args.gen_len, stop_at_eos=False)
    traces = []
    for name in chosen:
        print(f"[{name}] running {args.batch} x {args.prompt_len} tokens, {args.gen_len} new ...", file=sys.stderr,
              flush=True)
        _, trace = run_policy(loaded.model, prompts, name, sampling,
                              {"model": loaded.model.spec.name, "weights": "random" if args.random_weights else
                               "loaded"})
        path = write_trace(trace, out / f"{loaded.model.spec.name}-{name}-b{args.batch}-p{args.prompt_len}"
                                        f"-g{args.gen_len}.trace.parquet")
        print(f"  trace: {path}", file=sys.stderr)
        traces.append(trace)
    return traces


# ------------------------------------------------------------------ plan


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what-if sweep: which hardware, batch and budget meet a target", epilog=EPILOG,
                       description="Simulate every combination of the given axes (or a YAML sweep file), flag "
                                   "configs that do not fit in memory, and report the Pareto front of latency vs "
                                   "throughput per hardware, the best config per hardware under a latency target, "
                                   "and the largest batch that meets it. Runs over local processes (default), "
                                   "serially, or on a Dask cluster; results are cached per config, so an "
                                   "interrupted or repeated sweep resumes.")
    p.add_argument("--sweep", help="YAML sweep file (axes: profiles, models, batches, prompt_lens, gen_lens, "
                                   "policies; optional budgets, alphas, pool_capacities, dtype, fetch_fraction)")
    p.add_argument("--profile", type=names, help="profiles, comma-separated (default: all shipped)")
    p.add_argument("--model", type=names, help="named models, comma-separated")
    p.add_argument("--batch", type=int_list, help="batch sizes (default 1,2,4,8,16,32)")
    p.add_argument("--prompt-len", type=int_list, help="prompt lengths (default 2048)")
    p.add_argument("--gen-len", type=int_list, help="generated tokens (default 128)")
    p.add_argument("--policy", type=names, help="policies (default full,int4,h2o,infinigen)")
    p.add_argument("--budget", type=floats, help="infinigen/h2o budgets (default 0.2)")
    p.add_argument("--alpha", type=floats, help="infinigen alphas (with --from-trace; default 4)")
    p.add_argument("--pool-capacity", type=int_list, help="infinigen host pool capacities (default unbounded)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    share = p.add_mutually_exclusive_group()
    share.add_argument("--fetch-fraction", type=float, help="infinigen: uncapped share of the cache per layer")
    share.add_argument("--from-trace", help="infinigen: per-alpha shares from this infinigen trace")
    p.add_argument("--quality", nargs="+", metavar="TRACE",
                   help="quality traces (`infinisim run --quality`) of the policies planned: the table gets the "
                        "recall, top-k overlap and perplexity ratio to expect at each config's fetched share, "
                        "interpolated between the measured shares (blank outside them)")
    p.add_argument("--target-ms", type=float, help="per-token (decode step) latency target in ms")
    p.add_argument("--min-throughput", type=float, help="throughput floor in tokens/s")
    p.add_argument("--out", default="plans/latest", help="folder for plan.csv, plan.parquet, cache (default "
                                                         "plans/latest)")
    p.add_argument("--cache", help="results cache (JSON lines; default OUT/cache.jsonl)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--workers", type=positive, help="local processes (default: one per core)")
    run.add_argument("--serial", action="store_true", help="one config after another in this process")
    run.add_argument("--scheduler", help="Dask scheduler address tcp://HOST:PORT ('local' starts a LocalCluster)")
    p.add_argument("--json", action="store_true", help="print the best configs as JSON instead of a summary")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from infinisim.analysis.accuracy import add_expected_accuracy, quality_points
    from infinisim.analysis.planner import Sweep, best_under, largest_batch, load_sweep, pareto, run_sweep, write_table
    from infinisim.hwprofiles.profile import builtin_profiles

    if args.sweep:
        sweep = load_sweep(args.sweep)
    else:
        if not args.model:
            raise InfinisimError("give --model (or a --sweep file)", field="--model")
        sweep = Sweep(args.profile or list(builtin_profiles()), args.model, args.batch or [1, 2, 4, 8, 16, 32],
                      args.prompt_len or [2048], args.gen_len or [128],
                      args.policy or ["full", "int4", "h2o", "infinigen"])
    for axis, value in (("budgets", args.budget), ("alphas", args.alpha), ("pool_capacities", args.pool_capacity),
                        ("dtype", args.dtype), ("fetch_fraction", args.fetch_fraction)):
        if value is not None:
            setattr(sweep, axis, value)
    if args.from_trace:
        from infinisim.sim.workload import mean_fetched_fraction
        from infinisim.traces.trace import read_trace

        trace = read_trace(args.from_trace)
        sweep.alpha_shares = tuple(mean_fetched_fraction(trace, a) for a in range(1, 10))
    if "infinigen" in sweep.policies and sweep.fetch_fraction is None and sweep.alpha_shares is None:
        raise InfinisimError("infinigen needs --fetch-fraction or --from-trace (a trace's within-alpha counts)",
                             field="--fetch-fraction")
    configs = sweep.configs()
    out = Path(args.out)
    sizes = ", ".join(f"{len(getattr(sweep, a))} {a}" for a in ("profiles", "models", "batches", "policies"))
    print(f"{len(configs)} configs ({sizes}, ...)", file=sys.stderr)
    with tqdm(total=len(configs), desc="plan", unit="config", file=sys.stderr, disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        rows = run_sweep(configs, args.cache or out / "cache.jsonl", args.workers, args.scheduler, args.serial,
                         progress)
    if args.quality:
        rows = add_expected_accuracy(rows, quality_points(args.quality))
    csv, parquet = write_table(rows, out)
    _write_json({"command": args.command_line, "target_ms": args.target_ms, "min_throughput": args.min_throughput,
                 "quality": args.quality or []}, out / "plan.json")
    fit = rows[rows["fits"]]
    best = best_under(rows, args.target_ms, args.min_throughput)
    if args.json:
        print(best.to_json(orient="records"))
        return 0
    print(f"{len(rows)} configs: {len(fit)} fit, {len(rows) - len(fit)} do not")
    if len(fit) < len(rows):
        reasons = rows.loc[~rows["fits"], "does_not_fit"].str.split(":").str[0].value_counts()
        print("  why: " + ", ".join(f"{name} ({n})" for name, n in reasons.items())
              + "  (details in the table's does_not_fit column)")
    target = f"decode <= {args.target_ms:g} ms/step" if args.target_ms else "no latency target"
    if args.min_throughput:
        target += f", >= {args.min_throughput:g} tok/s"
    print(f"\nbest per hardware ({target}):")
    cols = ["profile", "model", "policy", "batch", "prompt_len", "budget", "decode_ms", "tokens_per_s", "device_gb"]
    if args.quality:
        cols += ["fetched_fraction", "expected_recall", "expected_ppl_ratio"]
    print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}") if not best.empty else "  none")
    if args.target_ms:
        biggest = largest_batch(rows, args.target_ms)
        print(f"\nlargest batch meeting {args.target_ms:g} ms/step:")
        print(biggest[["profile", "model", "policy", "prompt_len", "batch", "decode_ms", "tokens_per_s"]].to_string(
            index=False, float_format=lambda v: f"{v:.3g}") if not biggest.empty else "  none")
    front = pareto(rows)
    print(f"\nPareto front (latency vs throughput): {len(front)} configs over {front['profile'].nunique()} profiles")
    if args.quality:
        print("\n(expected_recall / expected_ppl_ratio: measured on the --quality traces' model and prompt at the same "
              "fetched share; blank where no trace brackets the share)")
    print(f"\nwrote {csv} and {parquet}")
    return 0
