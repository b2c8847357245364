"""`infinisim run` (the live executor) and `infinisim models`."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.cli.output import PerPolicy, Progress, describe_stream, maybe, print_json, size
from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_output_dir, check_output_file, read_text


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "run", cmd_run, "live executor run: decode a batch through KV policies, write one trace per "
                                        "policy")
    flags.add_model_flags(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (every sequence of the batch gets it)")
    src.add_argument("--prompt-file", help="file whose text is the prompt")
    src.add_argument("--prompt-len", type=flags.positive,
                     help="prompt of N tokens drawn from Python's bundled documentation text, a different "
                          "window per sequence (default when no prompt is given: 2048)")
    p.add_argument("--batch", type=flags.positive, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--gen-len", type=flags.positive, default=32, help="new tokens per sequence (default 32)")
    flags.add_policy_flags(p, "resident", "run one after another on the same model and prompts")
    flags.add_knob_flags(p)
    flags.add_device_flags(p)
    flags.add_link_flag(p)
    flags.add_weights_flag(p, live=True)
    p.add_argument("--tp", type=flags.positive, default=1,
                   help="tensor parallelism: run N ranks (processes; gloo on a CPU, NCCL on CUDA), each holding its "
                        "share of the heads with their KV cache, of the FFN and of the vocabulary; an all-reduce "
                        "after attention and after the FFN (timed as comm); one trace per rank (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability reaches this (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="always decode --gen-len tokens (timing runs)")
    p.add_argument("--quality", action="store_true",
                   help="measure accuracy: decode teacher-forced on the text that follows the prompt (the last "
                        "--gen-len tokens of --prompt/--prompt-file text), report perplexity, and for selecting "
                        "policies the recall of exact attention mass and the top-k overlap (computes dense "
                        "attention alongside: slower)")
    p.add_argument("--record-selection", action="store_true",
                   help="write the token positions each selecting layer fetched, per sequence and KV head, into "
                        "the trace (column `selected`, gap-coded; larger traces)")
    p.add_argument("--threads", type=flags.positive, help="CPU threads for torch (default: torch's choice)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--trace", help="trace file to write (one policy only)")
    out.add_argument("--out", default="runs", help="folder for the traces, named by model, policy, the knobs set, "
                                                   "batch and lengths (default runs/)")
    flags.add_stream_flags(p, "live")
    flags.add_scheduler_flags(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the real executor: prefill and decode a batch through each KV policy, time every phase of
    every layer of every step, write one trace per policy and print a summary. With --requests: serve
    a request trace live with continuous batching (the serving simulator's scheduler on the wall
    clock), one serving trace per policy, and print the latency table."""
    if args.requests:
        return serve_requests(args)
    policies = flags.policy_names(args.policy)
    if args.trace and len(policies) > 1:
        raise InfinisimError("--trace names one file; with several policies use --out", field="--trace")
    if args.trace:
        check_output_file(args.trace, "--trace")
    else:
        check_output_dir(args.out, "--out")
    if args.trace and args.tp > 1:
        raise InfinisimError("--tp writes one trace per rank; name their folder with --out", field="--trace")
    args.prompt_text = args.prompt if args.prompt is not None else read_text(args.prompt_file, "prompt file") \
        if args.prompt_file else None
    from infinisim.executor.session import check_shape, pick_device
    from infinisim.traces.spec import MODELS

    prompt_len = None if args.prompt_text is not None else args.prompt_len or 2048
    if prompt_len and args.model in MODELS:  # before minutes of loading
        check_shape(MODELS[args.model], args.batch, prompt_len, args.gen_len, args.dtype, pick_device(args.device))
    if args.tp > 1:
        from infinisim.executor.parallel import launch

        print(f"tensor parallelism: {args.tp} ranks ({'NCCL' if args.device == 'cuda' else 'gloo'})",
              file=sys.stderr)
        ranks = launch(args.tp, decode_rank, args, device=pick_device(args.device).type)
        summaries, texts = merged(ranks), ranks[0][1]
    else:
        summaries, texts = decode_rank(0, 1, args)
        if summaries is None:
            return 130
    if args.json:
        print_json({"summaries": summaries, "first_sequence_text": texts})
    else:
        print_summaries(summaries, texts)
    return 0


def check_live_serving(args: argparse.Namespace) -> None:
    """What a live server cannot do, refused before anything loads."""
    from infinisim.analysis.live_serving import refuse_unservable

    refuse_unservable(args.prefill, args.tp)
    for given, name, why in ((args.quality or args.record_selection, "--quality", "a live server measures timing"),
                             (args.temperature != 0, "--temperature", "a live server decodes greedily"),
                             (args.trace is not None, "--trace", "a live server writes one serving trace per "
                              "policy: name their folder with --out"),
                             (args.prompt is not None or args.prompt_file is not None, "--prompt",
                              "a live server draws each request's prompt from Python's bundled docs")):
        if given:
            raise InfinisimError(f"does not apply with --requests: {why}", field=name)


def serve_requests(args: argparse.Namespace) -> int:
    from infinisim.analysis.live_serving import measured_result
    from infinisim.analysis.serving_validation import serve_policies
    from infinisim.cli.serve import print_table
    from infinisim.sim.latency import parse_slo, summarize_serving
    from infinisim.traces.requests import attribution

    check_live_serving(args)
    check_output_dir(args.out, "--out")
    slo, schedule = parse_slo(args.slo), flags.scheduler(args)
    stream = flags.stream_spec(args).build()
    print(describe_stream(stream), file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = PerPolicy("requests")
    try:
        written = serve_policies(args.out, stream, schedule, flags.policy_names(args.policy), args.model,
                                 args.random_weights, args.device, args.dtype, flags.knobs_given(args), args.link,
                                 args.weights_on_host, args.command_line, lambda line: print(line, file=sys.stderr),
                                 progress.update)
    finally:
        progress.close()
    rows = [{"policy": trace.run["policy"], **summarize_serving(measured_result(trace), slo), "trace": path}
            for path, trace in written]
    credit = attribution(stream)
    if args.json:
        print_json({"stream": stream.source, "attribution": credit, "rows": rows})
    else:
        print_table(rows)
        print(f"(served live on this machine: {stream.source})")
        if credit:
            print(f"({credit})")
        for row in rows:
            print(f"trace ({row['policy']}): {row['trace']}")
    return 0


def decode_rank(rank: int, tp: int, args: argparse.Namespace) -> tuple[list[dict] | None, dict[str, str]]:
    """Load, draw the prompts, decode them through each policy, write the traces (this rank's, under
    tensor parallelism: rank 0 shows progress). Returns the summaries (None if interrupted) and the
    first sequence's text per policy."""
    import torch

    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.kvcache import Measurement
    from infinisim.executor.parallel import rank_log
    from infinisim.executor.session import Session
    from infinisim.hwprofiles.emulated import parse_link
    from infinisim.traces.summary import summarize

    log = rank_log(rank)
    sampling = SamplingConfig(args.gen_len, args.temperature, args.top_p, args.seed, not args.ignore_eos)
    text = args.prompt_text
    prompt_len = None if text is not None else args.prompt_len or 2048
    if args.threads:
        torch.set_num_threads(args.threads)
    link = parse_link(args.link) if args.link else None
    if link is not None:
        log(f"link: {link.name}")
    session = Session(args.model, args.dtype, args.device, args.random_weights, log=log, link=link,
                      weights_on_host=args.weights_on_host, shard=(tp, rank))
    prompts = session.prompts(args.batch, prompt_len, text, args.gen_len, args.quality,
                              "file" if args.prompt_file else "text",
                              field="--prompt-file" if args.prompt_file else "--prompt")
    knobs = flags.knobs_given(args)
    summaries, texts = [], {}
    for name in flags.policy_names(args.policy):
        steps = sampling.max_new_tokens
        log(f"[{name}] decoding {args.batch} x {prompts.longest} prompt tokens, up to {steps} new tokens each ...")
        with Progress(f"[{name}]", steps, "tokens", "prefill", enabled=rank == 0) as bar:
            try:
                gen, trace = session.run(name, prompts, sampling, knobs,
                                         Measurement(quality=args.quality, record_selection=args.record_selection),
                                         args.command_line, on_step=lambda record: bar.update())
            except KeyboardInterrupt:
                print(f"\ninterrupted: no trace written for {name}", file=sys.stderr)
                return None, texts
        path = session.write(trace, args.out, args.trace, knobs)
        summaries.append({**summarize(trace), "trace": str(path), **({"rank": rank} if tp > 1 else {})})
        if session.tokenizer is not None and not args.quality:
            texts[name] = session.tokenizer.decode(gen.new_tokens[0])
    return summaries, texts


def merged(ranks: list[tuple[list[dict], dict[str, str]]]) -> list[dict]:
    """One summary per policy from every rank's: the ranks step together, so a step is the slowest
    rank's; bytes moved are the sum over ranks; each rank's trace listed."""
    out = []
    for per_rank in zip(*(summaries for summaries, _ in ranks), strict=True):
        slowest = max(per_rank, key=lambda s: s["decode_ms_mean"])
        row = {**slowest, "tp": len(per_rank), "traces": [s["trace"] for s in per_rank],
               "decode_comm_ms_per_rank": [s["decode_comm_ms"] for s in per_rank]}
        for key in ("bytes_h2d_per_decode_step", "bytes_d2h_per_decode_step", "bytes_h2d_total", "bytes_d2h_total"):
            row[key] = sum(s[key] for s in per_rank)
        row["trace"] = ", ".join(row["traces"])
        out.append(row)
    return out


def print_summaries(summaries: list[dict], texts: dict[str, str]) -> None:
    for s in summaries:
        if s["policy"] in texts:
            print(f"[{s['policy']}] first sequence: {texts[s['policy']]!r}")
    if texts:
        print()
    evictions = any(s["evicted_total"] for s in summaries)
    header = f"{'policy':<10} {'prefill s':>9} {'decode ms/tok':>13} {'p50':>7} {'p99':>7} {'tok/s':>8} " \
             f"{'H2D/step':>10} {'D2H/step':>10}" + (f" {'evicted':>8}" if evictions else "")
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(f"{s['policy']:<10} {s['prefill_s']:>9.3f} {s['decode_ms_mean']:>13.2f} {s['decode_ms_p50']:>7.2f} "
              f"{s['decode_ms_p99']:>7.2f} {s['decode_tokens_per_s']:>8.1f} "
              f"{size(s['bytes_h2d_per_decode_step']):>10} {size(s['bytes_d2h_per_decode_step']):>10}"
              + (f" {s['evicted_total']:>8}" if evictions else ""))
    if evictions:
        print("(evicted: tokens that left the bounded host pool for good, whole batch, all steps)")
    if any(s["perplexity"] == s["perplexity"] for s in summaries):  # a teacher-forced (--quality) run
        print()
        header = f"{'policy':<10} {'fetched':>8} {'attended':>9} {'recall':>7} {'top-k':>7} {'perplexity':>10}"
        print(header)
        print("-" * len(header))
        for s in summaries:
            print(f"{s['policy']:<10} {maybe(s['fetched_fraction'], '.1%'):>8} {s['attended_fraction']:>9.1%} "
                  f"{maybe(s['recall']):>7} {maybe(s['topk_overlap']):>7} {s['perplexity']:>10.3f}")
        print("(fetched: share of its cached tokens a selecting layer fetched, after the budget's cap: the planner's "
              "fetched_fraction; attended: share of the cache each layer's attention ran over, every layer, the "
              "newest row included; recall: share of exact attention mass on the attended rows; top-k: overlap of "
              "the fetched rows with the exact top rows; - where a policy selects nothing)")
    print()
    for s in summaries:
        print(f"trace ({s['policy']}): {s['trace']}  [moved H2D {size(s['bytes_h2d_total'])}, "
              f"D2H {size(s['bytes_d2h_total'])}]")


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    flags.verb(sub, "models", cmd_models, "list the named architectures")


def cmd_models(args: argparse.Namespace) -> int:
    """List the named architectures (usable with --random-weights, and by the simulator), with sizes."""
    from infinisim.traces.spec import MODELS

    print(f"{'name':<15} {'family':<6} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>4} {'params':>8} "
          f"{'KV/token fp16':>13}")
    for spec in MODELS.values():
        print(f"{spec.name:<15} {spec.family:<6} {spec.n_layers:>6} {spec.hidden:>6} {spec.n_heads:>5} "
              f"{spec.n_kv_heads:>4} {spec.param_count() / 1e9:>7.2f}B {size(spec.kv_bytes_per_token('float16')):>13}")
    return 0
