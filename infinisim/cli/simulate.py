"""`infinisim replay` (a traced run on a hardware profile) and `infinisim simulate` (a described one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from infinisim.cli import flags
from infinisim.cli.output import Progress, print_json
from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_output_dir, check_output_file, write_json


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeline", help="write a Chrome/Perfetto timeline JSON here (one per config when several)")
    p.add_argument("--out", help="folder to write the results into, as simulation.json")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def add_replay_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "replay", cmd_replay, "simulate a trace's run on a hardware profile")
    p.add_argument("trace", nargs="+", help="trace file(s) written by `infinisim run`")
    p.add_argument("--profile", required=True, help="a shipped profile's name (`infinisim profiles list`) or a YAML")
    flags.add_link_flag(p, replay=True)
    _add_output_flags(p)


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay the fetch sizes a traced run really made (same model, batch, lengths, policy) on a
    hardware profile: per-step predicted time with a breakdown, throughput, memory peaks, link use.
    A CPU run over an emulated link replays on a CPU profile with that link; the rank traces of a
    tensor-parallel run, all given, replay together (in lockstep at each collective)."""
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.run import profile_for, replay_traces
    from infinisim.traces.trace import read_trace

    _check_outputs(args)
    profile = with_link(load_profile(args.profile), args.link)
    traces = [read_trace(path) for path in args.trace]
    if len({profile_for(t, profile).name for t in traces}) > 1:
        raise InfinisimError("the traces ran over different links: replay them one link at a time", field="trace")
    with Progress("replay", len(traces), "traces") as bar:
        outcomes = replay_traces(traces, profile, bool(args.timeline), lambda done, total: bar.update(done))
    return _print_outcomes(outcomes, args)


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "simulate", cmd_simulate, "simulate a described workload on a hardware profile")
    flags.add_simulated_config_flags(p, "full", "each simulated")
    p.add_argument("--batch", type=flags.int_list, default=[1], help="batch size, or several: 4,8,12 (default 1)")
    p.add_argument("--prompt-len", type=flags.int_list, default=[2048], help="prompt tokens, or several (default 2048)")
    p.add_argument("--gen-len", type=flags.positive, default=128, help="generated tokens per sequence (default 128)")
    flags.add_weights_flag(p)
    flags.add_tp_flag(p)
    _add_output_flags(p)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate any named model at any batch and lengths under a KV policy. For a speculating policy
    (infinigen, oracle), the speculated share comes from --speculated-fraction or is re-derived from a
    trace's within-alpha counts (--from-trace) at --alpha."""
    from infinisim.core.policies import POLICIES
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.memory import place_weights
    from infinisim.sim.run import speculated_from_trace
    from infinisim.sim.workload import synthetic
    from infinisim.traces.spec import named_model
    from infinisim.traces.trace import read_trace

    _check_outputs(args)
    policies, spec = flags.policy_names(args.policy), named_model(args.model)
    profile = with_link(load_profile(args.profile), args.link)
    speculated: Any = args.speculated_fraction
    if args.from_trace:
        speculated = speculated_from_trace(read_trace(args.from_trace), args.alpha, spec)
    needing = [name for name in policies if POLICIES[name].speculating and speculated is None]
    if needing:
        raise InfinisimError(f"{needing[0]} needs --speculated-fraction or --from-trace (a trace's within-alpha "
                             "counts)", field="--speculated-fraction")
    knobs = flags.knobs_given(args)
    auto = args.weights_on_host == "auto"
    profile.for_tensor_parallel(args.tp)  # a profile without that many GPUs is the first error
    workloads = [synthetic(spec, batch, prompt_len, args.gen_len, name, args.dtype, knobs, speculated,
                           0.0 if auto else args.weights_on_host, args.tp)
                 for name in policies for prompt_len in args.prompt_len for batch in args.batch]
    if auto:
        workloads = [place_weights(w, profile) for w in workloads]
    return _simulate_and_print(workloads, profile, args)


def with_link(profile: Any, link: str | None) -> Any:
    """The profile, its link replaced by an emulated one (`--link`; CPU profiles only)."""
    if not link:
        return profile
    from infinisim.hwprofiles.emulated import parse_link

    if not profile.host_computes:
        raise InfinisimError(f"an emulated link replaces a CPU profile's link; {profile.name} is a GPU's",
                             field="--link")
    spec = parse_link(link)
    return profile.with_link(spec.bandwidth, spec.latency, spec.duplex, spec.name)


def _check_outputs(args: argparse.Namespace) -> None:
    if args.out:
        check_output_dir(args.out, "--out")
    if args.timeline:
        check_output_file(args.timeline, "--timeline")


def _simulate_and_print(workloads: list[Any], profile: Any, args: argparse.Namespace) -> int:
    from infinisim.sim.run import simulate_all

    with Progress("simulate", len(workloads), "configs") as bar:
        outcomes = simulate_all(workloads, profile, bool(args.timeline), lambda done, total: bar.update(done))
    return _print_outcomes(outcomes, args)


def _print_outcomes(outcomes: list[Any], args: argparse.Namespace) -> int:
    from infinisim.sim.run import write_timelines

    results = [o.summary() for o in outcomes]
    if args.timeline:
        for path in write_timelines(outcomes, args.timeline):
            print(f"timeline: {path}  (open in ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    if args.out:
        print(f"wrote {write_json(results, Path(args.out) / 'simulation.json')}", file=sys.stderr)
    if args.json:
        print_json(results)
    else:
        print_results(results)
    return 0 if any(r["fits"] for r in results) else 1


def print_results(results: list[dict[str, Any]]) -> None:
    from infinisim.sim.result import COMPUTE

    print(f"{'policy':<10} {'batch':>5} {'prompt':>6} {'prefill s':>9} {'ms/step':>9} {'total s':>8} {'tok/s':>8} "
          f"{'compute':>8} {'wait':>7} {'host':>7} {'spec':>7} {'gather':>7} {'copy':>7} {'link':>5} {'dev GB':>7} "
          f"{'host GB':>7} {'w/host':>6} {'tp':>3}")
    for r in results:
        head = f"{r['policy']:<10} {r['batch']:>5} {r['prompt_len']:>6}"
        if not r["fits"]:
            print(f"{head}  does not fit: {r['does_not_fit']}")
            continue
        ph = r["decode_phase_ms"]
        compute = sum(ph.get(phase, 0.0) for phase in COMPUTE)
        print(f"{head} {r['prefill_s']:>9.3f} {r['decode_ms_mean']:>9.2f} {r['total_s']:>8.2f} "
              f"{r['tokens_per_s']:>8.1f} {compute:>8.2f} {ph['wait']:>7.2f} {ph['host']:>7.2f} {ph['spec']:>7.2f} "
              f"{ph['gather']:>7.2f} {ph['h2d'] + ph['d2h']:>7.2f} {r['link_utilisation']:>5.0%} "
              f"{r['device_peak_gb']:>7.2f} {r['host_peak_gb']:>7.2f} {r['weights_on_host']:>6.2f} {r['tp']:>3}")
    print("(ms per decode step. The compute stream's step is compute (attention, FFN, embed, head) + wait (stalled "
          "on copies) + host (starved while the host issues work: launches, gathers, synchronisations). spec, "
          "gather and copy (H2D + D2H busy time) run beside it on a GPU, and in turn on a CPU-only profile, where "
          "all the columns add up to the step. link: share of the run the link was busy; w/host: the share of "
          "every block's weights streamed from host memory, --weights-on-host; tp: GPUs, each row one GPU's "
          "view: dev GB per GPU, host GB for all, compute with the all-reduces)")
