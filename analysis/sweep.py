"""Sweeps through the simulator: hardware x model x batch x lengths x policy x the policy's knobs.

A sweep is a product of axes (`Sweep`), expanded into `Config`s; a knob axis varies only for the
policies that have the knob (from the registry, `infinisim.core.policies`). Each config is
evaluated by a pure function (`evaluate`), so configs can run serially, over local processes or
on a Dask cluster and give the same rows. Results are cached per config (keyed by a hash of the
config and of everything else its result depends on) in an append-only JSON-lines file, so an
interrupted or repeated sweep resumes.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_mapping, read_yaml
from infinisim.core.policies import KNOBS, POLICIES, policy

BASE_AXES = ("profiles", "models", "batches", "prompt_lens", "gen_lens", "policies")
KNOB_AXES = {knob.axis: name for name, knob in KNOBS.items()}  # sweep-file key -> knob
MAX_CONFIGS = 1_000_000  # a larger sweep is refused before it is expanded (memory, and days of simulating)


@dataclass(frozen=True)
class Config:
    profile: str
    model: str
    batch: int
    prompt_len: int
    gen_len: int
    policy: str
    knobs: tuple[tuple[str, Any], ...] = ()  # (name, value) of the policy's knobs set; the rest at defaults
    dtype: str = "float16"
    speculated_fraction: float | None = None  # speculating policies: the uncapped share each layer wants
    speculated_by_alpha: tuple[float, ...] | None = None  # ... or that share per alpha 1..9 (from a trace)
    fingerprint: str = ""  # of everything else the result depends on: profile contents, model spec, code
    exact: bool = False  # simulated event by event (else computed directly: the same answer, sim/direct.py)
    weights_on_host: float | str = 0.0  # share of every block's weights streamed from host memory, or "auto"
    tp: int = 1  # tensor parallelism over the profile's GPUs

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Sweep:
    profiles: list[str]
    models: list[str]
    batches: list[int]
    prompt_lens: list[int]
    gen_lens: list[int]
    policies: list[str]
    knobs: dict[str, list[Any]] = field(default_factory=dict)  # knob name -> values (absent: the default)
    dtype: str = "float16"
    speculated_fraction: float | None = None
    speculated_by_alpha: tuple[float, ...] | None = None
    exact: bool = False  # every config event by event (the reference), not by the direct computation
    weights_on_host: list[float | str] = field(default_factory=lambda: [0.0])  # shares, or "auto"
    tp: list[int] = field(default_factory=lambda: [1])

    def size(self) -> int:
        """How many configs the sweep expands to, at most (before duplicates collapse)."""
        base = len(self.profiles) * len(self.models) * len(self.batches) * len(self.prompt_lens) * len(self.gen_lens)
        base *= len(self.weights_on_host) * len(self.tp)
        return base * sum(math.prod(len(v) for k, v in self.knobs.items() if k in policy(name).knob_names)
                          for name in self.policies)

    def configs(self) -> list[Config]:
        """The product of the axes; knobs only vary for the policies that have them. Every profile
        and model is loaded first: a bad name fails here, in one line, before any simulation."""
        if self.size() > MAX_CONFIGS:
            raise InfinisimError(f"the sweep has {self.size():,} configs, more than {MAX_CONFIGS:,}: split it",
                                 field="sweep")
        prints = {(p, m): fingerprint(p, m) for p in self.profiles for m in self.models}
        out: dict[str, Config] = {}
        for profile, model, batch, prompt, gen, name, weights, tp in itertools.product(
                self.profiles, self.models, self.batches, self.prompt_lens, self.gen_lens, self.policies,
                self.weights_on_host, self.tp):
            kv = policy(name)
            axes = [[(knob, v) for v in values] for knob, values in sorted(self.knobs.items())
                    if knob in kv.knob_names]
            for combo in itertools.product(*axes):
                c = Config(profile, model, batch, prompt, gen, name, tuple(combo), self.dtype,
                           self.speculated_fraction if kv.speculating else None,
                           self.speculated_by_alpha if kv.speculating else None, prints[profile, model], self.exact,
                           weights, tp)
                out.setdefault(c.key(), c)
        return list(out.values())

    def needs_share(self) -> list[str]:
        """Speculating policies of the sweep that have no share to simulate with."""
        if self.speculated_fraction is not None or self.speculated_by_alpha is not None:
            return []
        return [name for name in self.policies if POLICIES.get(name) and POLICIES[name].speculating]


def load_sweep(path: str | Path) -> Sweep:
    """A YAML sweep file: the axes as lists (or single values), dtype, speculated_fraction."""
    path = Path(path)
    known = tuple(sorted((*BASE_AXES, *KNOB_AXES, "dtype", "speculated_fraction")))
    data = check_mapping(read_yaml(path, "sweep file"), path, known, BASE_AXES,
                         "a sweep file must be a YAML mapping of axes", "missing axis")
    values: dict[str, Any] = {"knobs": {}}
    for key, raw in data.items():
        if key in BASE_AXES or key in KNOB_AXES:
            items = raw if isinstance(raw, list) else [raw]
            if not items:
                raise InfinisimError("must list at least one value", path, key)
            if key in KNOB_AXES:
                values["knobs"][KNOB_AXES[key]] = [_knob_value(KNOB_AXES[key], item, path, key) for item in items]
            else:
                values[key] = [_axis_value(key, item, path) for item in items]
        elif key == "speculated_fraction":
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 < raw <= 1:
                raise InfinisimError(f"must be a number in (0, 1], got {raw!r}", path, key)
            values[key] = float(raw)
        else:  # dtype
            if raw not in ("float16", "bfloat16", "float32"):
                raise InfinisimError(f"must be float16, bfloat16 or float32, got {raw!r}", path, key)
            values[key] = raw
    return Sweep(**values)


def _axis_value(axis: str, item: Any, path: Path) -> Any:
    if axis in ("profiles", "models", "policies"):
        if not isinstance(item, str) or not item:
            raise InfinisimError(f"expected a name, got {item!r}", path, axis)
        return item
    if isinstance(item, bool) or not isinstance(item, int | float) or item <= 0:
        raise InfinisimError(f"expected a positive number, got {item!r}", path, axis)
    if item != int(item):
        raise InfinisimError(f"expected a whole number, got {item!r}", path, axis)
    return int(item)


def _knob_value(knob: str, item: Any, path: Path, axis: str) -> Any:
    try:
        return KNOBS[knob].check(item)
    except InfinisimError as exc:
        raise InfinisimError(str(exc).removeprefix(f"{knob}: "), path, axis) from None


def _profile(name: str) -> Any:
    """The profile, parsed once per process and file version (not once per config)."""
    from infinisim.hwprofiles.profile import builtin_profiles

    path = Path(name) if Path(name).exists() else builtin_profiles().get(name)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path is not None and path.is_file() else None
    return _load_profile(name, stamp)


@functools.lru_cache(maxsize=64)
def _load_profile(name: str, stamp: tuple[int, int] | None) -> Any:
    from infinisim.hwprofiles.profile import load_profile

    return load_profile(name)


@functools.lru_cache(maxsize=1)
def _code() -> str:
    """The simulator's code and the policy registry: a cached row is stale once either changes."""
    import infinisim.core.policies
    import infinisim.sim

    files = [*sorted(Path(infinisim.sim.__file__).parent.glob("*.py")), Path(infinisim.core.policies.__file__)]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def fingerprint(profile: str, model: str) -> str:
    """A hash of what a config's result depends on besides the config: the profile's contents (not its
    name or path), the model's spec and the simulator's code."""
    from infinisim.traces.spec import named_model

    parts = [_profile(profile).to_dict(), named_model(model).to_dict(), _code()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def knob_columns(config: Config, alpha: float | None) -> dict[str, Any]:
    """Every registry knob as a column: the value in force for the config's policy, None where
    the policy has no such knob. Alpha shows where it was given or chose the share (a per-alpha
    trace): with a plain speculated fraction it has no effect."""
    kv = policy(config.policy)
    values = kv.make_knobs(dict(config.knobs)).to_dict()
    if alpha is not None:
        values["alpha"] = alpha
    return {name: values.get(name) for name in KNOBS}


def evaluate(config: Config) -> dict[str, Any]:
    """Simulate one config (or say why it does not fit). Pure: the same config, the same row."""
    from infinisim.sim.memory import place_weights
    from infinisim.sim.run import simulate_if_fits
    from infinisim.sim.workload import synthetic
    from infinisim.traces.spec import named_model

    hidden = ("knobs", "speculated_by_alpha", "fingerprint", "exact")
    row: dict[str, Any] = {"key": config.key(), **{k: v for k, v in asdict(config).items() if k not in hidden}}
    auto = config.weights_on_host == "auto"
    row.update(weights_on_host=0.0 if auto else float(config.weights_on_host), weights_auto=auto)
    alpha = None
    try:
        kv = policy(config.policy)
        row.update(knob_columns(config, None))
        profile, spec = _profile(config.profile), named_model(config.model)
        knobs = kv.make_knobs(dict(config.knobs))
        share = config.speculated_fraction
        if kv.speculating and config.speculated_by_alpha is not None:
            alpha = knobs.alpha_for(spec.family)
            share = config.speculated_by_alpha[min(9, max(1, round(alpha))) - 1]
        row.update(knob_columns(config, alpha), profile=profile.name)
        w = synthetic(spec, config.batch, config.prompt_len, config.gen_len, config.policy, config.dtype,
                      knobs.to_dict(), share, row["weights_on_host"], config.tp)
        profile.for_tensor_parallel(config.tp)  # a profile with fewer GPUs: this config is invalid
        if auto:
            w = place_weights(w, profile)
            row["weights_on_host"] = w.weights_on_host
    except InfinisimError as exc:
        return {**row, "fits": False, "does_not_fit": f"invalid: {exc}"}
    outcome = simulate_if_fits(w, profile, exact=config.exact)
    s = outcome.summary(per_step=False)
    row.update(device_gb=s["device_peak_gb"], host_gb=s["host_peak_gb"], fetched_fraction=s["fetched_fraction"])
    if not outcome.fits:
        return {**row, "fits": False, "does_not_fit": s["does_not_fit"]}
    return {**row, "fits": True, "does_not_fit": "", "prefill_s": s["prefill_s"],
            "decode_ms": s["decode_ms_mean"], "total_s": s["total_s"], "tokens_per_s": s["tokens_per_s"],
            "link_utilisation": s["link_utilisation"],
            **{f"{name}_ms": ms for name, ms in s["decode_phase_ms"].items()}}


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that config runs again
                done[row["key"]] = row
    return done


def run_sweep(configs: list[Any], cache: str | Path | None = None, workers: int | None = None,
              scheduler: str | None = None, serial: bool = False,
              on_result: Callable[[int, int], None] | None = None,
              evaluate_one: Callable[[Any], dict[str, Any]] | None = None) -> pd.DataFrame:
    """Evaluate every config not in the cache, serially, over local processes (default) or on a Dask
    cluster (`scheduler`: "tcp://host:port", or "local" for a LocalCluster), appending each row to
    the cache as it arrives. Returns all rows in config order. `evaluate_one`: a pure function of a
    config with a `key()` (default `evaluate`; the serving capacity search brings its own)."""
    cache_path = Path(cache) if cache else None
    done = _read_cache(cache_path) if cache_path else {}
    todo = [c for c in configs if c.key() not in done]
    total, finished = len(configs), len(configs) - len(todo)
    sink = None  # opened with the first result: a sweep that cannot start writes nothing
    try:
        for row in _results(todo, workers, scheduler, serial, evaluate_one or evaluate):
            done[row["key"]] = row
            if cache_path and sink is None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cut = cache_path.exists() and cache_path.stat().st_size and \
                    not cache_path.read_bytes().endswith(b"\n")
                sink = cache_path.open("a", encoding="utf-8")
                if cut:
                    sink.write("\n")  # close a line an interruption cut short, so the next row starts clean
            if sink:
                sink.write(json.dumps(row, default=float) + "\n")
                sink.flush()
            finished += 1
            if on_result:
                on_result(finished, total)
    finally:
        if sink:
            sink.close()
    return pd.DataFrame([done[c.key()] for c in configs])


def _results(todo: list[Any], workers: int | None, scheduler: str | None, serial: bool,
             fn: Callable[[Any], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    if not todo:
        return
    if serial:
        yield from map(fn, todo)
    elif scheduler:
        yield from _dask(todo, scheduler, fn)
    else:
        from concurrent.futures import ProcessPoolExecutor

        n = workers or os.cpu_count() or 1
        with ProcessPoolExecutor(n, initializer=_die_with_parent) as pool:
            yield from pool.map(fn, todo, chunksize=max(1, min(64, len(todo) // (4 * n))))


def _die_with_parent() -> None:
    """A worker process is killed when the planner dies, even by SIGKILL (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _dask(todo: list[Any], scheduler: str, fn: Callable[[Any], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    from distributed import Client, LocalCluster, as_completed

    def unreachable(exc: Exception) -> InfinisimError:
        return InfinisimError(f"cannot reach the Dask scheduler ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]})", field="--scheduler")

    if scheduler != "local":
        try:
            _probe(scheduler)  # a refused or unroutable address fails now, not after Client's 10 s of retries
        except (OSError, ValueError) as exc:
            raise unreachable(exc) from None
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None) if scheduler == "local" else None
    try:
        try:
            client = Client(cluster if cluster else scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise unreachable(exc) from None
        with client:
            futures = client.map(fn, todo, pure=False)
            for future in as_completed(futures):
                yield future.result()
    finally:
        if cluster:
            cluster.close()


def _probe(address: str) -> None:
    """Open and close a TCP connection to a tcp://HOST:PORT scheduler (other schemes are left to Dask)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
