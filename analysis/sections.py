"""Report sections from results a user already has (a plan folder, a validation folder, traces),
each figure naming what was run to make it; `analysis.report` writes them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from infinisim.analysis import figures
from infinisim.analysis.accuracy import EXACT
from infinisim.analysis.report import Section, cell_text
from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text
from infinisim.core.policies import POLICIES, speculating_policies

BASELINE = "full"  # speedups are over FlexGen's whole-cache fetch, as the paper reports them
BREAKDOWN_TEXT = ("Busy time per phase, summed over layers, mean per decode step. Upper bar: the compute stream: "
                  "computing, waiting for copies, and starved while the host issues work (host): together the step. "
                  "Lower bar: the work that can run beside it (speculation, the host gather, transfers). The black "
                  "tick is the step's wall time: on a GPU the bars overlap, on a CPU everything runs in turn.")


def speedups(rows: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of `by`, each policy's best (lowest total time over its knobs) speedup over `full`."""
    fit = rows[rows["fits"]]
    best = fit.loc[fit.groupby([*by, "policy"], dropna=False)["total_s"].idxmin()]
    full = best[best["policy"] == BASELINE].set_index(list(by))["total_s"]
    best = best[best.set_index(list(by)).index.isin(full.index)].copy()
    best["speedup"] = full.loc[best.set_index(list(by)).index].to_numpy() / best["total_s"].to_numpy()
    return best


def by_model_size(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by their model's parameter count (smallest first), not by name."""
    from infinisim.traces.spec import MODELS

    size = rows["model"].map(lambda m: MODELS[m].param_count() if m in MODELS else 0)
    return rows.assign(_size=size).sort_values("_size", kind="stable").drop(columns="_size")


def plan_sections(rows: pd.DataFrame, ran: str, target_ms: float | None = None) -> list[Section]:
    """Pareto plot, speedup over `full` along each axis the sweep varied, and a breakdown per policy."""
    from infinisim.analysis.planner import best_under, pareto

    if "decode_ms" not in rows or not rows["fits"].any():
        raise InfinisimError("the plan has no config that fits: nothing to plot", field="fits")
    sections = []
    front = pareto(rows)
    best = best_under(rows, target_ms)
    cols = [c for c in ("profile", "model", "policy", "batch", "prompt_len", "budget", "alpha", "decode_ms",
                        "tokens_per_s", "device_gb", "expected_recall", "expected_ppl_ratio") if c in rows]
    sections.append(Section(
        "Planner: latency vs throughput",
        f"{len(rows)} configs, {int(rows['fits'].sum())} fit in memory. The table is the best config per hardware"
        + (f" within {target_ms:g} ms per decode step" if target_ms else "") + " (highest throughput).",
        figures.pareto_plot(rows, front, "plan-pareto", ran), best[cols] if not best.empty else None))
    fit = rows[rows["fits"]]
    reference = fit.iloc[0].copy()
    batches = sorted(fit["batch"].unique())
    reference["batch"] = batches[len(batches) // 2]  # a middle batch: batch 1 rarely tells the story
    for axis, label in (("batch", "batch size"), ("prompt_len", "prompt length"), ("model", "model")):
        if fit[axis].nunique() < 2 or BASELINE not in set(fit["policy"]):
            continue
        held = [a for a in ("profile", "model", "batch", "prompt_len", "gen_len") if a != axis]
        same = fit
        for a in held:
            same = same[same[a] == reference[a]]
        if same[axis].nunique() < 2:
            continue
        points = speedups(same, [axis])
        if axis == "model":
            points = by_model_size(points)
        fixed = ", ".join(f"{a} {reference[a]}" for a in held)
        sections.append(Section(
            f"Speedup over full vs {label}",
            f"Held fixed: {fixed}. Each policy at its fastest setting of its knobs in the sweep.",
            figures.panels(points, axis, [("speedup", "speedup over full (total time)")], "policy",
                           f"plan-speedup-{axis}", f"speedup over full vs {label} ({fixed})", ran, label,
                           categorical=axis == "model", reference=1.0)))
    at = fit[(fit["profile"] == reference["profile"]) & (fit["model"] == reference["model"])
             & (fit["prompt_len"] == reference["prompt_len"]) & (fit["gen_len"] == reference["gen_len"])
             & (fit["batch"] == reference["batch"])]
    ig = at[at["policy"].isin(speculating_policies())]
    if "alpha" in ig and ig["alpha"].nunique() > 1:
        ig = ig[ig["budget"] == ig["budget"].max()].sort_values("alpha")  # the loosest cap shows alpha's effect
        ys = [("decode_ms", "ms per decode step (simulated)"), ("fetched_fraction", "fetched share")]
        if "expected_recall" in ig and ig["expected_recall"].notna().any():
            ys.append(("expected_recall", "expected recall (quality traces)"))
        what = (f"{reference['model']} on {reference['profile']}, batch {reference['batch']}, "
                f"budget {ig['budget'].max():g}")
        sections.append(Section(
            "Sensitivity to alpha (simulated)", f"InfiniGen across the sweep's alphas ({what}).",
            figures.panels(ig, "alpha", ys, "policy", "plan-alpha", f"alpha sensitivity: {what}", ran, "alpha")))
    at = at.loc[at.groupby("policy")["total_s"].idxmin()]
    if len(at) and "attn_ms" in at:  # a cache written before the planner kept phases has none
        what = (f"{reference['model']} on {reference['profile']}, batch {reference['batch']}, "
                f"prompt {reference['prompt_len']}")
        sections.append(Section("Where a decode step's time goes (simulated)", BREAKDOWN_TEXT,
                                figures.plan_breakdown(at, "plan-breakdown", f"decode step breakdown: {what}", ran)))
    return sections


def validation_sections(data: dict[str, Any], source: str) -> list[Section]:
    comparisons = data["comparisons"]
    ran = data.get("command", f"infinisim validate (results in {source})")
    table = pd.DataFrame([{"policy": c["policy"], "batch": c["batch"], "prompt": c["prompt_len"],
                           "measured ms/step": c["decode_ms_measured"], "predicted ms/step": c["decode_ms_predicted"],
                           "mean step error %": c["decode_total_s"]["error_pct"], "step MAPE %": c["step"]["mape"],
                           "MAPE floor %": c["step"]["mape_floor"], "p90 %": c["step"]["p90"],
                           "end-to-end error %": c["end_to_end_s"]["error_pct"]} for c in comparisons])
    return [Section("Predicted vs measured (validation)",
                    f"The executor's runs, replayed by the simulator on profile `{comparisons[0]['profile']}` (for a "
                    "fair check, one calibrated on the machine that ran them); errors relative to the measurement. The "
                    "MAPE floor is the measured mean step's own MAPE: what the run's step-to-step spread costs a "
                    "prediction of one time per step.",
                    figures.validation_steps(comparisons, "validation-steps", ran), table)]


def trace_sections(paths: Sequence[str | Path], profile: str | None) -> list[Section]:
    """Measured breakdown per policy, accuracy vs fetched share (quality traces), and a simulated
    timeline excerpt of the first offloading trace on `profile`."""
    from infinisim.analysis.accuracy import points_from
    from infinisim.traces.summary import summarize
    from infinisim.traces.trace import read_trace

    traces = [(str(p), read_trace(p)) for p in paths]
    sections = []
    commands = list(dict.fromkeys(t.run.get("command") or f"infinisim run ... (wrote {p})" for p, t in traces))
    ran = "; ".join(commands)
    summaries = [summarize(t) for _, t in traces]
    labels = [_label(t) for _, t in traces]
    phases = [{p: s.get(f"decode_{p}_ms", 0.0) for members in figures.GROUPS.values() for p in members}
              for s in summaries]
    machine = traces[0][1].environment.get("device_name") or traces[0][1].run.get("device", "")
    sections.append(Section(
        "Where a decode step's time goes (measured)",
        f"Measured on {machine}. " + BREAKDOWN_TEXT,
        figures.breakdown(labels, phases, [s["decode_ms_mean"] for s in summaries], "trace-breakdown",
                          "measured decode step breakdown per run", ran)))
    quality = {p: t for p, t in traces if t.run.get("quality")}
    if quality:
        points = points_from(quality)
        sections.append(accuracy_section(points, "trace-accuracy", ran))
        sections += knob_sections(points, ran)
    offloaded = [(p, t) for p, t in traces if POLICIES[t.run["policy"]].offloaded]
    if profile and offloaded:
        from infinisim.hwprofiles.profile import load_profile
        from infinisim.sim.workload import from_trace

        path, pick = next(((p, t) for p, t in offloaded if t.run["policy"] in speculating_policies()), offloaded[0])
        chosen = load_profile(profile)
        sections.append(timeline_section(from_trace(pick), chosen,
                                         f"infinisim replay {path} --profile {chosen.name} --timeline t.json"))
    return sections


def _label(trace: Any) -> str:
    """policy and the knobs that set its share, e.g. "infinigen alpha 4 budget 0.2"."""
    knobs = trace.run.get("policy_knobs", {})
    shown = [f"{k} {knobs[k]:g}" for k in ("alpha", "budget") if isinstance(knobs.get(k), int | float)
             and not (k == "alpha" and knobs[k] >= 100)]
    return " ".join([trace.run["policy"], *shown, f"b{trace.run['batch']} p{max(trace.run['prompt_lens'])}"])


def knob_sections(points: pd.DataFrame, ran: str) -> list[Section]:
    """Accuracy vs alpha and vs partial ratio, where the quality traces of infinigen vary one of them with
    the other knobs held (the most common setting of the others)."""
    ig = points[points["policy"].isin(speculating_policies())]
    sections = []
    for knob, label in (("alpha", "alpha"), ("partial_ratio", "partial weight ratio")):
        settings = pd.DataFrame([{k: knobs.get(k) for k in ("alpha", "budget", "partial_ratio", "dense_layers")}
                                 for knobs in ig["knobs"]], index=ig.index)
        if settings.empty or settings[knob].nunique() < 2:
            continue
        others = [c for c in settings.columns if c != knob]
        held = settings[others].astype(str).agg("|".join, axis=1)
        same = ig[held == held.mode().iloc[0]].assign(**{knob: settings[knob]})
        if same[knob].nunique() < 2:
            continue
        fixed = ", ".join(f"{k} {cell_text(v)}" for k, v in settings.loc[same.index[0], others].items()
                          if v is not None and v == v)
        ys = [("recall", "recall of exact attention mass"), ("fetched_fraction", "fetched share")]
        if same["perplexity_ratio"].notna().any():
            ys.append(("perplexity_ratio", "perplexity / dense"))
        sections.append(Section(
            f"Accuracy vs {label} (measured)", f"InfiniGen's quality traces at {fixed}.",
            figures.panels(same.sort_values(knob), knob, ys, "policy", f"trace-{knob.replace('_', '-')}",
                           f"infinigen accuracy vs {label} ({fixed})", ran, label),
            same[[knob, "fetched_fraction", "recall", "topk_overlap", "perplexity_ratio"]].sort_values(knob)))
    return sections


def accuracy_section(points: pd.DataFrame, name: str, ran: str) -> Section:
    selecting = points[~points["policy"].isin(EXACT)]
    ys = [("recall", "recall of exact attention mass")]
    if points["perplexity_ratio"].notna().any():
        ys.append(("perplexity_ratio", "perplexity / dense perplexity"))
    table = points[["policy", "fetched_fraction", "recall", "topk_overlap", "perplexity", "perplexity_ratio"]]
    return Section("Accuracy vs fetched fraction",
                   "Teacher-forced decoding: recall is the share of exact attention mass on the rows a layer "
                   "attended (selecting layers), perplexity over the forced continuation. int4 selects nothing (it "
                   "fetches every row, 4-bit), so it has no recall and sits at fetched fraction 1.0.",
                   figures.panels(selecting.sort_values("fetched_fraction"), "fetched_fraction", ys, "policy", name,
                                  "accuracy vs the share of the cache fetched", ran, "fetched fraction"), table)


def timeline_section(workload: Any, profile: Any, ran: str) -> Section:
    """One decode step of `workload` simulated on `profile`, as a stream-by-stream timeline."""
    from infinisim.sim.engine import simulate

    result = simulate(workload, profile, timeline=True)
    step = min(2, workload.n_steps)
    what = f"{workload.policy}, {workload.spec.name}, batch {workload.batch}, prompt {workload.prompt_len}"
    return Section("Timeline excerpt (simulated)",
                   f"One decode step ({what}) on `{profile.name}`: what the host thread and each stream did when. "
                   "A whole run opens in Perfetto with `infinisim replay --timeline` or `infinisim simulate "
                   "--timeline`.",
                   figures.timeline(result.spans, step, "timeline", f"decode step {step}: {what} on {profile.name}",
                                    ran))


def _json(path: Path, what: str) -> Any:
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise InfinisimError(f"not a {what} (malformed JSON: {exc})", path) from None
    if not isinstance(data, dict):
        raise InfinisimError(f"not a {what} (not a JSON object)", path)
    return data


def report_sections(plan: str | None, validation: str | None, traces: Iterable[str] | None,
                    profile: str | None) -> list[Section]:
    """The sections `infinisim report` can build from what it is given."""
    sections: list[Section] = []
    if plan:
        folder = Path(plan)
        table = folder / "plan.parquet"
        if not table.exists():
            raise InfinisimError("no plan.parquet here (write one with `infinisim plan --out`)", folder)
        meta = _json(folder / "plan.json", "plan.json") if (folder / "plan.json").exists() else {}
        try:
            rows = pd.read_parquet(table)
        except Exception as exc:  # pyarrow raises several types for truncated or foreign files
            raise InfinisimError(f"not a readable plan table ({type(exc).__name__}: truncated or not Parquet)",
                                 table) from None
        if not {"fits", "profile", "policy"} <= set(rows.columns):
            raise InfinisimError("not a plan table (no fits/profile/policy columns)", table)
        sections += plan_sections(rows, meta.get("command", f"infinisim plan --out {folder}"), meta.get("target_ms"))
    if validation:
        path = Path(validation)
        path = path / "validation.json" if path.is_dir() else path
        if not path.exists():
            raise InfinisimError("no validation.json (write one with `infinisim validate --out`)", path)
        try:
            sections += validation_sections(_json(path, "validation result"), str(path))
        except (KeyError, TypeError, IndexError) as exc:
            raise InfinisimError(f"not a validation result ({type(exc).__name__}: {exc})", path) from None
    if traces:
        sections += trace_sections(list(traces), profile)
    return sections
