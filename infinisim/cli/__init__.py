"""`infinisim`: one front door to the executor, the simulator and the analysis."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from infinisim import __version__
from infinisim.cli.args import policy_names, positive
from infinisim.cli.report_commands import add_report_parser, add_reproduce_parser
from infinisim.cli.sim_commands import (
    add_calibrate_parser,
    add_plan_parser,
    add_profiles_parser,
    add_replay_parser,
    add_simulate_parser,
    add_validate_parser,
)
from infinisim.core.errors import InfinisimError

EPILOG = "Docs: README.md and docs/ in the source tree. Errors exit with status 1, usage errors with 2."


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="live executor run: decode a batch through KV policies, write one trace per policy",
        description="Run the real executor: prefill and decode a batch through each KV policy, time every "
                    "phase of every layer of every step, write one trace per policy and print a summary.",
        epilog=EPILOG)
    p.add_argument("--model", default="smollm2-135m",
                   help="named architecture (see `infinisim models`), a .gguf file or a Hugging Face folder "
                        "(config.json + *.safetensors); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights for a named architecture (timing-only runs)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (every sequence of the batch gets it)")
    src.add_argument("--prompt-file", help="file whose text is the prompt")
    src.add_argument("--prompt-len", type=positive,
                     help="prompt of N tokens drawn from Python's bundled documentation text, a different "
                          "window per sequence (default when no prompt is given: 2048)")
    p.add_argument("--batch", type=positive, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--gen-len", type=positive, default=32, help="new tokens per sequence (default 32)")
    p.add_argument("--policy", default="resident",
                   help="KV policy, or several separated by commas, run one after another on the same "
                        "model and prompts (resident, full, infinigen, oracle, h2o, int4; default resident)")
    knobs = p.add_argument_group("policy knobs (each applies to the policies that have it)")
    knobs.add_argument("--alpha", type=float,
                       help="infinigen/oracle: fetch tokens scoring within alpha of the max (default 4 for OPT, "
                            "5 for the Llama family)")
    knobs.add_argument("--budget", type=float,
                       help="infinigen/oracle/h2o: most tokens fetched per layer, a fraction of the context "
                            "(0.2 = 20%%, the default) or a count (> 1)")
    knobs.add_argument("--partial-ratio", type=float, help="infinigen/oracle: partial weight ratio (default 0.3)")
    knobs.add_argument("--dense-layers", type=int,
                       help="infinigen/oracle: leading layers that fetch fully instead of speculating (default 1)")
    knobs.add_argument("--gqa-combine", choices=["softmax_sum", "max"],
                       help="infinigen: how query heads sharing a KV head vote (default softmax_sum)")
    knobs.add_argument("--pool-capacity", type=positive,
                       help="infinigen/oracle: host KV pool capacity in tokens per sequence (default unbounded)")
    knobs.add_argument("--eviction", choices=["counter", "lru", "fifo"],
                       help="infinigen/oracle: which token leaves a full pool (default counter, the paper's)")
    knobs.add_argument("--recent-ratio", type=float,
                       help="h2o: share of the budget kept for the most recent tokens (default 0.5)")
    knobs.add_argument("--group-size", type=positive, help="int4: values per quantization group (default 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always decode --gen-len tokens (timing runs)")
    p.add_argument("--quality", action="store_true",
                   help="measure accuracy: decode teacher-forced on the text that follows the prompt (the last "
                        "--gen-len tokens of --prompt/--prompt-file text), report perplexity, and for selecting "
                        "policies the recall of exact attention mass and the top-k overlap (computes dense "
                        "attention alongside: slower)")
    p.add_argument("--record-selection", action="store_true",
                   help="write the token positions each selecting layer fetched, per sequence and KV head, into "
                        "the trace (column `selected`, gap-coded; larger traces)")
    p.add_argument("--threads", type=positive, help="CPU threads for torch (default: torch's choice)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--trace", help="trace file to write (one policy only)")
    out.add_argument("--out", default="runs", help="folder for the traces (default runs/)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.kvcache import Measurement
    from infinisim.executor.loaders import load_model
    from infinisim.executor.policies import POLICIES, make_policy
    from infinisim.executor.prompts import bundled_prompts, read_prompt_file
    from infinisim.executor.recording import run_policy
    from infinisim.traces.summary import summarize
    from infinisim.traces.trace import write_trace

    policies = policy_names(args.policy, POLICIES)
    if args.trace and len(policies) > 1:
        raise InfinisimError("--trace names one file; with several policies use --out", field="--trace")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InfinisimError("no CUDA device is available", field="--device")
    sampling = SamplingConfig(args.gen_len, args.temperature, args.top_p, args.seed, not args.ignore_eos)

    print(f"loading {args.model}{' (random weights)' if args.random_weights else ''} "
          f"on {device} in {args.dtype} ...", file=sys.stderr)
    loaded = load_model(args.model, args.dtype, device, args.random_weights)
    spec, tokenizer = loaded.model.spec, loaded.tokenizer
    text = args.prompt if args.prompt is not None else (
        read_prompt_file(args.prompt_file) if args.prompt_file else None)
    extra = args.gen_len if args.quality else 0  # teacher forcing reads the continuation from the text
    if text is not None:
        if tokenizer is None:
            raise InfinisimError("this model has no tokenizer: use --prompt-len", field="--prompt")
        ids = [t % spec.vocab_size for t in tokenizer.encode(text).ids]
        if len(ids) <= extra:
            raise InfinisimError(f"--quality needs more than --gen-len ({extra}) tokens of text; it has {len(ids)}",
                                 field="--prompt-file" if args.prompt_file else "--prompt")
        windows = [ids] * args.batch
        prompt_source = "file" if args.prompt_file else "text"
    else:
        if tokenizer is None:
            raise InfinisimError("this model has no tokenizer to draw a prompt with; give a model with a "
                                 "tokenizer.json", field="--prompt-len")
        windows = bundled_prompts(tokenizer, args.batch, (args.prompt_len or 2048) + extra, spec.vocab_size)
        prompt_source = "pydoc_data"
    prompts = [w[:len(w) - extra] for w in windows]
    forced = [w[len(w) - extra:] for w in windows] if args.quality else None
    run_info = {"model": args.model, "weights": loaded.source, "prompt_source": prompt_source,
                "command": args.command_line}
    knobs = {"alpha": args.alpha, "budget": args.budget, "partial_ratio": args.partial_ratio,
             "dense_layers": args.dense_layers, "gqa_combine": args.gqa_combine,
             "pool_capacity": args.pool_capacity, "eviction": args.eviction, "recent_ratio": args.recent_ratio,
             "group_size": args.group_size}
    for name in policies:  # bad knobs fail before the model runs
        make_policy(name, **knobs)

    summaries, texts = [], {}
    for name in policies:
        n_steps = sampling.max_new_tokens
        print(f"[{name}] decoding {len(prompts)} x {max(map(len, prompts))} prompt tokens, "
              f"up to {n_steps} new tokens each ...", file=sys.stderr, flush=True)
        with tqdm(total=n_steps, desc=f"{name}", unit="tok", file=sys.stderr, disable=None,
                  leave=False) as bar:
            try:
                gen, trace = run_policy(loaded.model, prompts, name, sampling, run_info,
                                        on_step=lambda record: bar.update(1), knobs=knobs,
                                        measure=Measurement(forced, args.quality, args.record_selection))
            except KeyboardInterrupt:
                print(f"\ninterrupted: no trace written for {name}", file=sys.stderr)
                return 130
        label = f"{spec.name}-{name}-b{args.batch}-p{max(map(len, prompts))}-g{args.gen_len}"
        path = write_trace(trace, args.trace or Path(args.out) / f"{label}.trace.parquet")
        summary = {**summarize(trace), "trace": str(path)}
        summaries.append(summary)
        if tokenizer is not None:
            texts[name] = tokenizer.decode(gen.new_tokens[0])
    if args.json:
        print(json.dumps({"summaries": summaries, "first_sequence_text": texts}, indent=2))
    else:
        print_summaries(summaries, texts)
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _maybe(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def print_summaries(summaries: list[dict], texts: dict[str, str]) -> None:
    for s in summaries:
        print(f"[{s['policy']}] first sequence: {texts.get(s['policy'], '(no tokenizer)')!r}")
    print()
    header = f"{'policy':<10} {'prefill s':>9} {'decode ms/tok':>13} {'p50':>7} {'p99':>7} {'tok/s':>8} " \
             f"{'H2D/step':>10} {'D2H/step':>10}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(f"{s['policy']:<10} {s['prefill_s']:>9.3f} {s['decode_ms_mean']:>13.2f} {s['decode_ms_p50']:>7.2f} "
              f"{s['decode_ms_p99']:>7.2f} {s['decode_tokens_per_s']:>8.1f} "
              f"{_bytes(s['bytes_h2d_per_decode_step']):>10} {_bytes(s['bytes_d2h_per_decode_step']):>10}")
    if any(s["perplexity"] == s["perplexity"] for s in summaries):  # a teacher-forced (--quality) run
        print()
        header = f"{'policy':<10} {'attended':>9} {'recall':>7} {'top-k':>7} {'perplexity':>10}"
        print(header)
        print("-" * len(header))
        for s in summaries:
            print(f"{s['policy']:<10} {s['attended_fraction']:>9.1%} {_maybe(s['recall']):>7} "
                  f"{_maybe(s['topk_overlap']):>7} {s['perplexity']:>10.3f}")
        print("(attended: share of the cache each layer attended, mean over decode steps; recall: share of exact "
              "attention mass on the attended rows; top-k: overlap of the fetched rows with the exact top rows; "
              "- where a policy attends everything)")
    print()
    for s in summaries:
        print(f"trace ({s['policy']}): {s['trace']}  [moved H2D {_bytes(s['bytes_h2d_total'])}, "
              f"D2H {_bytes(s['bytes_d2h_total'])}]")


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named architectures", epilog=EPILOG,
                       description="List the named architectures (usable with --random-weights, and by the "
                                   "simulator), with sizes.")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from infinisim.traces.spec import MODELS

    print(f"{'name':<15} {'family':<6} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>4} {'params':>8} "
          f"{'KV/token fp16':>13}")
    for spec in MODELS.values():
        kv_token = _bytes(spec.kv_bytes_per_token("float16"))
        print(f"{spec.name:<15} {spec.family:<6} {spec.n_layers:>6} {spec.hidden:>6} {spec.n_heads:>5} "
              f"{spec.n_kv_heads:>4} {spec.param_count() / 1e9:>7.2f}B {kv_token:>13}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinisim", epilog=EPILOG,
        description="Measure, simulate and plan KV-cache offloading (InfiniGen and baselines) for LLM inference.")
    parser.add_argument("--version", action="version", version=f"infinisim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parser(sub)
    add_validate_parser(sub)
    add_replay_parser(sub)
    add_simulate_parser(sub)
    add_plan_parser(sub)
    add_report_parser(sub)
    add_reproduce_parser(sub)
    add_calibrate_parser(sub)
    add_profiles_parser(sub)
    add_models_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["infinisim", *(sys.argv[1:] if argv is None else argv)])  # for provenance
    try:
        return args.func(args)
    except InfinisimError as exc:
        print(f"infinisim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninfinisim: interrupted", file=sys.stderr)
        return 130

