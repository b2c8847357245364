"""The CLI's argument types and the flags several verbs share, each defined once: the policy and
knob flags come from the registry (`infinisim.core.policies`), so every verb takes the same
knobs with the same names, defaults, ranges and help."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import KNOBS, POLICIES, PRESETS, Knob, knob_help

DTYPES = ("float32", "bfloat16", "float16")
EPILOG = "Docs: README.md and docs/ in the source tree. Errors exit with status 1, usage errors with 2."


def verb(sub: argparse._SubParsersAction, name: str, command: Callable[[argparse.Namespace], int], summary: str,
         epilog: str = EPILOG) -> argparse.ArgumentParser:
    """A verb's parser: `summary` in the verb list, the command's docstring as its description."""
    p = sub.add_parser(name, help=summary, description=" ".join((command.__doc__ or summary).split()),
                       epilog=epilog)
    p.set_defaults(func=command)
    return p


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _number(text: str, rule: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(value):  # NaN fails every rule
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (latency targets, throughput floors)."""
    return _number(text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _number(text, "within [0, 1]", lambda v: 0 <= v <= 1)


def names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    """'4,8,12' -> [4, 8, 12], each positive."""
    values = [positive(t) for t in names(text)]
    if not values:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, got {text!r}")
    return values


def policy_names(text: str) -> list[str]:
    """--policy's comma-separated names, each in the registry."""
    chosen = names(text)
    unknown = [name for name in chosen if name not in POLICIES]
    if unknown or not chosen:
        raise InfinisimError(f"unknown policy {unknown[0] if unknown else '(none)'!r} "
                             f"(choose from {', '.join(POLICIES)})", field="--policy")
    return chosen


def knob_value(knob: Knob) -> Callable[[str], Any]:
    """Parse one value of a knob and check it against the registry's range."""

    def parse(text: str) -> Any:
        raw: Any = text
        if knob.kind is not str:
            try:
                raw = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return knob.check(raw)
        except InfinisimError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{knob.name}: ")) from None

    parse.__name__ = knob.name  # argparse names the type in its messages
    return parse


def knob_values(knob: Knob) -> Callable[[str], list[Any]]:
    """Several values of a knob, separated by commas (a planner axis)."""
    one = knob_value(knob)

    def parse(text: str) -> list[Any]:
        values = [one(t) for t in names(text)]
        if not values:
            raise argparse.ArgumentTypeError(f"expected values separated by commas, got {text!r}")
        return values

    parse.__name__ = knob.name
    return parse


def add_policy_flags(p: argparse.ArgumentParser, default: str | None, several: str) -> None:
    """--policy and one flag per registry knob. `several`: what several policies mean for the verb."""
    listing = "; ".join(f"{name}: {spec.summary}" for name, spec in POLICIES.items())
    p.add_argument("--policy", default=default,
                   help=(f"KV policy, or several separated by commas ({several}). {listing}"
                         + (f" (default {default})" if default else "")).replace("%", "%%"))


def add_knob_flags(p: argparse.ArgumentParser, axes: bool = False) -> None:
    """One flag per registry knob; with `axes`, each takes several values (a planner axis)."""
    group = p.add_argument_group("policy knobs (each applies to the policies that have it; unset: the policy's "
                                 "default)" + ("; comma-separated values are swept" if axes else ""))
    p.set_defaults(axes=axes)
    for knob in KNOBS.values():
        group.add_argument(knob.flag, type=knob_values(knob) if axes else knob_value(knob),
                           metavar=knob.name.upper() + ("S" if axes else ""),
                           help=knob_help(knob).replace("%", "%%") + f" ({knob.describe_range()})")
    group.add_argument("--preset", choices=list(PRESETS),
                       help="start from a named set of knob values (knob flags given override it): " + "; ".join(
                           f"{name}: " + ", ".join(f"{k} {'the model family' + chr(39) + 's' if v is None else v}"
                                                   for k, v in values.items()) for name, values in PRESETS.items()))


def knobs_given(args: argparse.Namespace) -> dict[str, Any]:
    """The knob values asked for on the command line, by knob name: the --preset's, then the flags
    set (a list of values each where the verb sweeps them)."""
    given = {name: getattr(args, name) for name in KNOBS if getattr(args, name, None) is not None}
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    several = any(isinstance(v, list) for v in given.values()) or getattr(args, "axes", False)
    return {**{k: [v] if several else v for k, v in preset.items()}, **given}


def add_device_flags(p: argparse.ArgumentParser, dtype_default: str = "float32") -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the executor runs (default: cuda when present, "
                                                             "else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help=f"the model's weights and KV cache (default {dtype_default})")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="named architecture (see `infinisim models`), a .gguf file or a Hugging Face folder "
                        "(config.json + *.safetensors); default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights for a named architecture (timing-only runs)")


def add_link_flag(p: argparse.ArgumentParser, replay: bool = False) -> None:
    what = ("a CPU profile (e.g. a calibrated one): replace its link with an emulated one, as `run --link` used "
            "(a trace's own link is used when it has one); ") if replay else \
        ("CPU runs: copy between host and device memory over an emulated link, so prefetch overlaps compute and "
         "stalls happen; ")
    p.add_argument("--link", metavar="SPEC",
                   help=what + "BANDWIDTH[,LATENCY][,duplex] (e.g. 0.5GB/s,10us), or scaled-pcie3 (the paper's "
                        "PCIe 3.0 x16 scaled by this machine's memcpy over the A6000's memory bandwidth; the rate "
                        "it picks is printed and kept in the trace); default: none")


def weight_share(text: str) -> float | str:
    """--weights-on-host: a share of every block's weights in [0, 1], or 'auto'."""
    return "auto" if text.strip() == "auto" else fraction(text)


def weight_shares(text: str) -> list[float | str]:
    return [weight_share(t) for t in names(text)]


def add_weights_flag(p: argparse.ArgumentParser, axes: bool = False, live: bool = False, serving: bool = False
                     ) -> None:
    """--weights-on-host; `live`: the executor's (which streams each projection's first rows); `serving`:
    a share only (what fits depends on the requests running)."""
    where = ("memory and is copied into a device buffer one block ahead of its use, overlapped with compute (over "
             "--link when given); auto: the smallest share (in hundredths) whose device part fits the device's free "
             "memory") if live else \
        ("memory and is streamed over the link one layer ahead of its use, overlapped with compute; serving times "
         "it with the event simulation (slower) and takes a share, not auto") if serving else \
        ("memory and is streamed over the link one layer ahead of its use, overlapped with compute; auto: the "
         "smallest share (in hundredths) that fits the device")
    p.add_argument("--weights-on-host", metavar="FRACTION" if serving else "FRACTION|auto",
                   type=weight_shares if axes else weight_share, default=[0.0] if axes else 0.0,
                   help="weight offloading (FlexGen): this share of every transformer block's weights stays in "
                        "host " + where + (" (several: each swept)" if axes else "") + "; default 0")


def add_simulated_config_flags(p: argparse.ArgumentParser, policy_default: str, several: str) -> None:
    """What a simulated config is, for the verbs that simulate one named model on one profile."""
    p.add_argument("--model", required=True, help="named architecture (`infinisim models`)")
    p.add_argument("--profile", required=True, help="a shipped profile's name or a YAML file")
    add_policy_flags(p, policy_default, several)
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="weights and KV cache (default float16)")
    add_link_flag(p, replay=True)
    add_knob_flags(p)
    add_share_flags(p)


def add_tp_flag(p: argparse.ArgumentParser, axes: bool = False) -> None:
    p.add_argument("--tp", type=int_list if axes else positive, default=[1] if axes else 1,
                   help="tensor parallelism: split heads (and their KV), FFN columns and vocabulary over this many "
                        "GPUs of a multi-GPU profile (`infinisim profiles list`: 8x-h100-sxm, 4x-l4, ...), a ring "
                        "all-reduce after attention and after the FFN; each GPU offloads its own KV over its own "
                        "link" + (" (several: each swept)" if axes else "") + "; default 1")


def add_share_flags(p: argparse.ArgumentParser, axes: bool = False) -> None:
    """Where a speculating policy's share of the cache comes from, in the simulator."""
    share = p.add_mutually_exclusive_group()
    share.add_argument("--speculated-fraction", type=fraction,
                       help="speculating policies (infinigen, oracle): the share of its cached tokens each "
                            "speculating layer wants, before the budget's cap (a real run's trace holds it "
                            "for alpha 1..9: see --from-trace)")
    share.add_argument("--from-trace", metavar="TRACE",
                       help="speculating policies: take the speculated share from this infinigen trace's "
                            "within-alpha counts, re-applied at --alpha" + (" (each value swept)" if axes else ""))


def window(text: str) -> tuple[float, float]:
    """'START,DURATION' in seconds of a request trace."""
    parts = names(text)
    try:
        start, length = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,DURATION in seconds, got {text!r}") from None
    if not (math.isfinite(start) and math.isfinite(length) and start >= 0 and length > 0):
        raise argparse.ArgumentTypeError(f"expected a start >= 0 and a duration > 0, got {text!r}")
    return start, length


STREAM_KINDS = ("serve", "search", "live")


def add_stream_flags(p: argparse.ArgumentParser, kind: str = "serve") -> None:
    """Where the requests come from: a trace in the Azure LLM inference format, scaled and windowed,
    for `serve` (or synthetic ones), for a rate `search` (plan), or for a `live` server (run, validate)."""
    assert kind in STREAM_KINDS
    search, live = kind == "search", kind == "live"
    group = p.add_argument_group("live serving (continuous batching on this machine)" if live else "requests")
    trace = ("CSV in the Azure LLM inference trace format (columns TIMESTAMP, ContextTokens, GeneratedTokens), e.g. "
             "../shared/data/azure-llm-2023/conv.csv")
    synthetic = "" if search else "; without it, synthetic requests at --rate"
    group.add_argument("--requests", metavar="FILE",
                       help=f"serve this request trace live instead of decoding one batch ({trace}): requests arrive "
                            "on the wall clock, prompts drawn from Python's bundled docs, each decodes exactly its "
                            "output length; --batch, --prompt-len and --gen-len do not apply" if live else
                            f"request trace, {trace}{synthetic}")
    if not search:
        group.add_argument("--rate", type=positive_float,
                           help="the trace's arrivals scaled to this mean rate per second" if live else
                           "mean arrivals per second: the trace's scaled to it, or the synthetic stream's")
    group.add_argument("--rate-scale", type=positive_float, default=1.0,
                       help="a trace's arrivals this many times as frequent (default 1)" +
                            ("; the search scales from there" if search else ""))
    group.add_argument("--window", type=window, metavar="START,DURATION",
                       help="only the trace's requests arriving in this span (seconds from its first)")
    group.add_argument("--max-requests", type=positive, default=1000 if search else None,
                       help="the stream's first N requests" + (" (default 1000: each rate tried simulates them)"
                                                                if search else " (default: all)"))
    group.add_argument("--length-scale", type=positive_float, default=1.0,
                       help="a trace's prompt and output lengths times this (rounded, at least 1): its distribution, "
                            "smaller, for a slower machine (default 1)")
    if kind != "serve":
        return
    group.add_argument("--count", type=positive, default=1000, help="synthetic: how many requests (default 1000)")
    group.add_argument("--lengths-from", metavar="FILE",
                       help="synthetic: draw (prompt, output) length pairs from this request trace")
    group.add_argument("--prompt-len", type=positive, default=1024,
                       help="synthetic without --lengths-from: prompt tokens of every request (default 1024)")
    group.add_argument("--gen-len", type=positive, default=128,
                       help="synthetic without --lengths-from: output tokens of every request (default 128)")
    group.add_argument("--arrivals", choices=["poisson", "gamma"], default="poisson",
                       help="synthetic: Poisson arrivals, or Gamma gaps (burstier with --cv above 1); default poisson")
    group.add_argument("--cv", type=positive_float, default=1.0,
                       help="synthetic gamma arrivals: coefficient of variation of the gaps (default 1)")
    group.add_argument("--seed", type=int, default=0, help="synthetic: random seed (default 0)")


def add_scheduler_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("server (continuous batching, as vLLM schedules)")
    group.add_argument("--max-seqs", type=positive, default=256, help="running sequences at most (default 256)")
    group.add_argument("--max-batched-tokens", type=positive, default=8192,
                       help="tokens one iteration processes at most: prompts, or decodes + prompt chunks "
                            "(default 8192)")
    group.add_argument("--prefill", choices=["whole", "chunked"], default="whole",
                       help="whole: an iteration prefills whole prompts and the decodes wait (vLLM's default "
                            "without chunking); chunked: every iteration decodes and fills the token budget with "
                            "prompt chunks (default whole)")
    group.add_argument("--slo", default="ttft=2s,tpot=100ms,p=99",
                       help="service level: ttft=TIME,tpot=TIME,p=PERCENTILE (TIME in s or ms; default "
                            "ttft=2s,tpot=100ms,p=99): met when that percentile of time-to-first-token and of "
                            "time-per-output-token are within them")


def stream_spec(args: argparse.Namespace) -> Any:
    from infinisim.analysis.serving import StreamSpec

    return StreamSpec(args.requests, getattr(args, "rate", None), args.rate_scale, args.window, args.max_requests,
                      getattr(args, "count", 1000), getattr(args, "lengths_from", None),
                      getattr(args, "prompt_len", 1024), getattr(args, "gen_len", 128),
                      getattr(args, "arrivals", "poisson"), getattr(args, "cv", 1.0), getattr(args, "seed", 0),
                      args.length_scale)


def scheduler(args: argparse.Namespace) -> Any:
    from infinisim.sim.server import Scheduler

    return Scheduler(args.max_seqs, args.max_batched_tokens, args.prefill)
