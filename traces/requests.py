"""Request streams: what a server is asked to do, one request at a time (arrival, prompt and
output lengths). Read from a file in the Azure LLM inference trace format, scaled and windowed,
or drawn synthetically; torch-free, read by the serving simulator and the executor's live server.

File format (Azure Public Dataset, AzureLLMInferenceTrace_*.csv): a header with the columns
TIMESTAMP (a date-time, or seconds as a number), ContextTokens (prompt tokens) and
GeneratedTokens (output tokens); other columns are ignored. Arrival times are kept as seconds
after the first request.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
ARRIVALS = ("poisson", "gamma")


@dataclass(frozen=True)
class Request:
    id: int
    arrival_s: float  # after the stream's start
    prompt_len: int
    gen_len: int  # tokens generated, the first (from the prefill) included


@dataclass(frozen=True)
class RequestStream:
    requests: tuple[Request, ...]
    source: str  # where it came from, with every scaling applied (shown in outputs and traces)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Mean arrivals per second (requests after the first over the time they span)."""
        return (len(self) - 1) / self.duration_s if len(self) > 1 and self.duration_s > 0 else float("nan")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(arrival_s, prompt_len, gen_len) as arrays."""
        r = self.requests
        return (np.array([q.arrival_s for q in r]), np.array([q.prompt_len for q in r], dtype=np.int64),
                np.array([q.gen_len for q in r], dtype=np.int64))


def _timestamp(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip()).timestamp()


def read_requests(path: str | Path) -> RequestStream:
    """A request trace file, or one line naming the file, line and field at fault."""
    path = Path(path)
    rows = csv.reader(read_text(path, "request trace").splitlines())
    header = next(rows, None)
    if not header:
        raise InfinisimError("empty file (expected a header with " + ", ".join(COLUMNS) + ")", path)
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise InfinisimError(f"missing column (the header has {', '.join(header)})", path, missing[0])
    at = {c: header.index(c) for c in COLUMNS}
    requests, start, last = [], None, -math.inf
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise InfinisimError(f"{len(row)} fields, the header has {len(header)}", path, f"line {line}")
        try:
            t = _timestamp(row[at["TIMESTAMP"]])
        except ValueError:
            raise InfinisimError(f"unparsable time {row[at['TIMESTAMP']]!r}", path, f"line {line}: TIMESTAMP") from None
        if not math.isfinite(t):
            raise InfinisimError(f"unparsable time {row[at['TIMESTAMP']]!r}", path, f"line {line}: TIMESTAMP")
        if t < last:
            raise InfinisimError("arrival before the previous line's (the file must be in arrival order)", path,
                                 f"line {line}: TIMESTAMP")
        last = t
        start = t if start is None else start
        lengths = []
        for column, low in (("ContextTokens", 1), ("GeneratedTokens", 1)):
            text = row[at[column]].strip()
            if not text.isdigit() or int(text) < low:
                raise InfinisimError(f"{text!r} is not a whole number >= {low}", path, f"line {line}: {column}")
            lengths.append(int(text))
        requests.append(Request(len(requests), t - start, *lengths))
    if not requests:
        raise InfinisimError("no requests (only a header)", path)
    return RequestStream(tuple(requests), str(path))


def scaled(stream: RequestStream, rate_scale: float = 1.0, window: tuple[float, float] | None = None,
           max_prompt: int | None = None, max_gen: int | None = None, length_scale: float = 1.0) -> RequestStream:
    """The stream within `window` (start, duration in seconds of the original stream), arrivals
    `rate_scale` times as frequent (times divided by it), lengths times `length_scale` (rounded, at
    least 1: the same shape of distribution for a smaller machine) and clipped to at most
    max_prompt / max_gen; renumbered from 0, times from the first kept arrival."""
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise InfinisimError(f"must be a finite number > 0, got {rate_scale}", field="--rate-scale")
    if not (math.isfinite(length_scale) and length_scale > 0):
        raise InfinisimError(f"must be a finite number > 0, got {length_scale}", field="--length-scale")
    kept = list(stream.requests)
    notes = []
    if window is not None:
        begin, length = window
        kept = [r for r in kept if begin <= r.arrival_s < begin + length]
        notes.append(f"window {begin:g}+{length:g} s")
        if not kept:
            raise InfinisimError(f"no request arrives within {begin:g}..{begin + length:g} s (the stream spans "
                                 f"{stream.duration_s:.0f} s)", field="--window")
    if rate_scale != 1:
        notes.append(f"rate x{rate_scale:g}")
    if length_scale != 1:
        notes.append(f"lengths x{length_scale:g}")
    if max_prompt is not None or max_gen is not None:
        notes.append(f"lengths clipped to {max_prompt or '-'}/{max_gen or '-'}")
    t0 = kept[0].arrival_s

    def length(n: int, cap: int | None) -> int:
        n = max(1, round(n * length_scale))
        return min(n, cap or n)

    out = tuple(replace(r, id=i, arrival_s=(r.arrival_s - t0) / rate_scale, prompt_len=length(r.prompt_len, max_prompt),
                        gen_len=length(r.gen_len, max_gen)) for i, r in enumerate(kept))
    return RequestStream(out, stream.source + (f" ({', '.join(notes)})" if notes else ""))


def to_rate(stream: RequestStream, rate: float, **kwargs: object) -> RequestStream:
    """The stream scaled so its mean arrival rate is `rate` requests per second."""
    if not (math.isfinite(rate) and rate > 0):
        raise InfinisimError(f"must be a finite number > 0, got {rate}", field="--rate")
    base = scaled(stream, 1.0, **kwargs)  # type: ignore[arg-type]
    if not math.isfinite(base.rate):
        raise InfinisimError("a rate needs at least two requests at different times", field="--rate")
    return scaled(base, rate / base.rate)


def synthetic_stream(rate: float, n: int, seed: int = 0, arrival: str = "poisson", cv: float = 1.0,
                     lengths: RequestStream | None = None, prompt_len: int = 1024, gen_len: int = 128
                     ) -> RequestStream:
    """n requests arriving at `rate` per second: Poisson (exponential gaps) or Gamma gaps with
    coefficient of variation `cv` (burstier above 1). Lengths: (prompt, output) pairs drawn with
    replacement from `lengths` (a trace's joint distribution), else fixed."""
    if not (math.isfinite(rate) and rate > 0):
        raise InfinisimError(f"must be a finite number > 0, got {rate}", field="--rate")
    if arrival not in ARRIVALS:
        raise InfinisimError(f"unknown arrival process {arrival!r} ({', '.join(ARRIVALS)})", field="--arrivals")
    if not (math.isfinite(cv) and cv > 0):
        raise InfinisimError(f"must be a finite number > 0, got {cv}", field="--cv")
    if n < 1:
        raise InfinisimError(f"must be at least 1, got {n}", field="--requests")
    rng = np.random.default_rng(seed)
    if arrival == "poisson":
        gaps = rng.exponential(1 / rate, n)
    else:
        shape = 1 / cv ** 2
        gaps = rng.gamma(shape, 1 / (rate * shape), n)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    if lengths is not None:
        _, prompts, gens = lengths.arrays()
        pick = rng.integers(0, len(prompts), n)
        pairs = list(zip(prompts[pick].tolist(), gens[pick].tolist(), strict=True))
        drawn = f"lengths from {lengths.source}"
    else:
        pairs = [(prompt_len, gen_len)] * n
        drawn = f"prompt {prompt_len}, output {gen_len}"
    what = "Poisson" if arrival == "poisson" else f"Gamma (cv {cv:g})"
    requests = tuple(Request(i, float(t), int(p), int(g)) for i, (t, (p, g)) in enumerate(zip(times, pairs,
                                                                                               strict=True)))
    return RequestStream(requests, f"{n} requests, {what} arrivals at {rate:g}/s, {drawn}, seed {seed}")


AZURE_ATTRIBUTION = ("requests from the Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY 4.0; Patel, "
                     "Choukse, Zhang, Shah, Goiri, Maleki, Bianchini, \"Splitwise: Efficient generative LLM inference "
                     "using phase splitting\", ISCA 2024)")


def attribution(stream: RequestStream) -> str | None:
    """The credit its authors ask for, wherever results drawn from the Azure trace are shown."""
    return AZURE_ATTRIBUTION if "azure" in stream.source.lower() else None
