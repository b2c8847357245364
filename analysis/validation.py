"""Predicted vs measured: how well the simulator reproduces a run it can check against.

The measured side is a trace's own times (step wall clock, per-phase spans); the predicted side
is the replay of that trace's workload on a profile. Errors are relative to the measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.files import write_bytes_atomic, write_json
from infinisim.sim.result import PHASES, SimResult
from infinisim.sim.workload import Workload
from infinisim.traces.trace import Trace

COMPARED_PHASES = ("attn", "ffn", "wait", "spec", "gather", "h2d", "d2h", "comm")


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    rel = np.abs(predicted - measured) / np.maximum(measured, 1e-12)
    return {"mape": float(rel.mean() * 100), "p50": float(np.percentile(rel, 50) * 100),
            "p90": float(np.percentile(rel, 90) * 100)}


def compare(workload: Workload, result: SimResult) -> dict[str, Any]:
    """Per decode step, per phase (summed over layers) and end to end; and the worst layer."""
    measured_steps = np.asarray(workload.measured["step_wall_s"], dtype=float)
    predicted_steps = result.decode_step_s
    layers = workload.measured["layers"]
    n_layers, n_steps = workload.spec.n_layers, workload.n_steps
    out: dict[str, Any] = {
        "policy": workload.policy, "profile": result.profile.name, "model": workload.spec.name,
        "batch": workload.batch, "prompt_len": workload.prompt_len, "decode_steps": n_steps,
        "step": {**_errors(predicted_steps, measured_steps),  # mape_floor: the MAPE of the measured mean itself
                 "mape_floor": _errors(np.full_like(measured_steps, measured_steps.mean()), measured_steps)["mape"]},
        "decode_ms_measured": float(measured_steps.mean() * 1e3),
        "decode_ms_predicted": float(predicted_steps.mean() * 1e3),
    }
    measured_total = workload.measured["prefill_wall_s"] + measured_steps.sum()
    out["end_to_end_s"] = {"measured": float(measured_total), "predicted": result.total_s,
                           "error_pct": float((result.total_s - measured_total) / measured_total * 100)}
    out["decode_total_s"] = {"measured": float(measured_steps.sum()), "predicted": float(predicted_steps.sum()),
                             "error_pct": float((predicted_steps.sum() - measured_steps.sum())
                                                / measured_steps.sum() * 100)}
    out["prefill_s"] = {"measured": workload.measured["prefill_wall_s"], "predicted": float(result.step_s[0])}
    phases = {}
    for phase in COMPARED_PHASES:
        measured = layers[f"{phase}_s"].to_numpy().reshape(n_steps, n_layers).sum(axis=1)
        predicted = result.phase_s[1:, :n_layers, PHASES.index(phase)].sum(axis=1)
        if measured.sum() <= 0 and predicted.sum() <= 0:
            continue
        phases[phase] = {"measured_ms": float(measured.mean() * 1e3), "predicted_ms": float(predicted.mean() * 1e3),
                         "error_pct": float((predicted.sum() - measured.sum()) / max(measured.sum(), 1e-12) * 100)}
    busy = ("attn", "ffn", "wait", "comm", *workload.measured["serial"])  # the compute thread, besides host work
    host_measured = measured_steps - sum(
        layers[f"{p}_s"].to_numpy().reshape(n_steps, n_layers).sum(axis=1) for p in busy)
    outside_layers = [PHASES.index(p) for p in ("embed", "head", "comm")]  # comm there: the head's all-gather
    phases["host (and embed, head)"] = {
        "measured_ms": float(host_measured.mean() * 1e3),
        "predicted_ms": result.summary()["decode_phase_ms"]["host"]
        + float(result.phase_s[1:, n_layers, outside_layers].sum(-1).mean() * 1e3)}
    out["phases"] = phases
    measured_layer = sum(layers[f"{p}_s"].to_numpy().reshape(n_steps, n_layers) for p in COMPARED_PHASES).mean(0)
    predicted_layer = result.phase_s[1:, :n_layers][..., [PHASES.index(p) for p in COMPARED_PHASES]].sum(-1).mean(0)
    rel = np.abs(predicted_layer - measured_layer) / np.maximum(measured_layer, 1e-12)
    worst = int(rel.argmax())
    out["worst_layer"] = {"layer": worst, "measured_ms": float(measured_layer[worst] * 1e3),
                          "predicted_ms": float(predicted_layer[worst] * 1e3), "error_pct": float(rel[worst] * 100)}
    out["per_step_ms"] = {"measured": (measured_steps * 1e3).round(4).tolist(),
                          "predicted": (predicted_steps * 1e3).round(4).tolist()}
    return out


def relative(comparisons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's decode time relative to the first run of the same shape, measured and predicted:
    what a what-if question compares, and robust to the machine's speed drifting between runs."""
    out = []
    for c in comparisons:
        base = next(b for b in comparisons if (b["batch"], b["prompt_len"]) == (c["batch"], c["prompt_len"]))
        measured = c["decode_ms_measured"] / base["decode_ms_measured"]
        predicted = c["decode_ms_predicted"] / base["decode_ms_predicted"]
        out.append({"policy": c["policy"], "batch": c["batch"], "prompt_len": c["prompt_len"],
                    "versus": base["policy"], "measured": measured, "predicted": predicted,
                    "error_pct": (predicted - measured) / measured * 100})
    return out


def plot_steps(comparisons: list[dict[str, Any]], path: str, ran: str = "infinisim validate") -> str:
    """Predicted vs measured decode latency per step, one panel per run, as a PNG file."""
    from infinisim.analysis.figures import validation_steps

    write_bytes_atomic(path, validation_steps(comparisons, Path(path).stem, ran).png)
    return path


def validate(out: str | Path, *, traces: list[Trace] | None = None, profile: str | None = None,
             policies: list[str] = ("resident", "full", "infinigen"), batch: int = 1, prompt_len: int = 1024,
             gen_len: int = 32, model: str = "smollm2-135m", random_weights: bool = False, device: str | None = None,
             dtype: str = "float32", quick_calibration: bool = False, knobs: dict[str, Any] | None = None,
             link: str | None = None, weights_on_host: float | str = 0.0, tp: int = 1,
             command: str = "infinisim validate", log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Calibrate this machine (or load `profile`), run the executor per policy (or take `traces`),
    over an emulated `link` if given, with `weights_on_host` of every block streamed from the host;
    over `tp` tensor-parallel ranks (each rank's trace replayed on the profile of one rank, whose node
    is the measured all-reduce); replay each run and compare; a run over an emulated link is replayed
    on the profile with that link.
    Writes validation.json, validation.png (and the profile and traces it made) into `out`.
    Returns what validation.json holds."""
    from infinisim.sim.run import replay_traces
    from infinisim.traces.trace import read_trace

    out = Path(out)
    read = traces or None
    chosen = machine_profile(out, profile, device, dtype, quick_calibration, tp, log)
    if read is None:
        run = (out, policies, batch, prompt_len, gen_len, model, random_weights, device, dtype, knobs or {}, link,
               weights_on_host, command)
        if tp == 1:
            paths = _run(0, 1, *run, log)
        else:
            from infinisim.executor.parallel import launch

            paths = [p for ranks in launch(tp, _run, *run, None, device=device or "cpu") for p in ranks]
        read = [read_trace(p) for p in paths]
    comparisons = []
    for trace, outcome in zip(read, replay_traces(read, chosen), strict=True):
        if outcome.result is None:
            raise InfinisimError(f"does not fit profile {chosen.name}: {outcome.memory.problem}", field="--profile")
        comparisons.append(compare(outcome.workload, outcome.result))
        if trace.run.get("tp"):
            comparisons[-1].update(rank=trace.run["tp"]["rank"], lockstep=outcome.lockstep)
    data = {"command": command, "comparisons": comparisons, "relative": relative(comparisons),
            "profile": chosen.to_dict()}
    write_json(data, out / "validation.json")
    plot_steps(comparisons, str(out / "validation.png"), command)
    return data


def machine_profile(out: Path, profile: str | None, device: str | None, dtype: str, quick: bool, tp: int = 1,
                    log: Callable[[str], None] = lambda _: None) -> Any:
    """The profile `profile` names, or this machine calibrated now (one of `tp` ranks), written into `out`."""
    from infinisim.hwprofiles.profile import load_profile, write_profile

    if profile:
        return load_profile(profile)
    from infinisim.executor.calibrate import calibrate
    from infinisim.executor.parallel import calibrate_ranks
    from infinisim.executor.session import pick_device

    log("calibrating this machine ..." if tp == 1 else f"calibrating one of {tp} ranks on this machine ...")
    kind = pick_device(device).type
    chosen = calibrate(kind, dtype, quick, log=lambda line: log(f"  {line}")) if tp == 1 else \
        calibrate_ranks(tp, kind, dtype, quick, log=lambda line: log(f"  {line}"))
    log(f"profile: {write_profile(chosen, out / 'profile.yaml')}")
    return chosen


def _run(rank: int, tp: int, out: Path, policies: Sequence[str], batch: int, prompt_len: int, gen_len: int,
         model: str, random_weights: bool, device: str | None, dtype: str, knobs: dict[str, Any], link: str | None,
         weights_on_host: float | str, command: str, log: Callable[[str], None] | None) -> list[str]:
    """The executor's runs, one per policy (under tensor parallelism: this rank's; `log` None: rank 0's
    lines on stderr); returns the paths of the traces written."""
    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.parallel import rank_log
    from infinisim.executor.session import Session
    from infinisim.hwprofiles.emulated import parse_link

    log = log or rank_log(rank)
    spec = parse_link(link) if link else None
    if spec is not None:
        log(f"link: {spec.name}")
    session = Session(model, dtype, device, random_weights, log, spec, weights_on_host, shard=(tp, rank))
    prompts = session.prompts(batch, prompt_len, gen_len=gen_len)
    paths = []
    for name in policies:
        log(f"[{name}] running {batch} x {prompt_len} tokens, {gen_len} new ...")
        _, trace = session.run(name, prompts, SamplingConfig(gen_len, stop_at_eos=False), knobs, command=command)
        path = session.write(trace, out, knobs=knobs)
        log(f"  trace: {path}")
        paths.append(str(path))
    return paths
