"""`infinisim reproduce paper`: the InfiniGen paper's experiments, as far as this project can run them.

Speed: the paper's sweeps (OPT-13B, prompt 1920, generation 128, fp16; batch 4..20; prompt
384..1920 at batch 8; OPT-6.7B/13B/30B at batch 4; alpha 1..9; partial ratio 0.1..1.0) through
the simulator on a hardware profile (default the paper's A6000 / PCIe 3.0 testbed). InfiniGen's
fetched share is not assumed: it is measured by the executor on SmolLM2 (within-alpha counts of
real speculation) and carried over to OPT as a share of the cache.

Accuracy: teacher-forced runs of the executor on SmolLM2 (recall of exact attention mass,
perplexity) for InfiniGen, the oracle, H2O and INT4 at fixed fetched fractions, and InfiniGen
across alpha and partial ratio. The paper's claims (../shared/INFINIGEN.md) stand beside ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from infinisim.analysis import figures
from infinisim.analysis.paper_runs import (
    BASELINES,
    MAX_KV,
    PAPER,
    SUBJECT,
    Measured,
    PaperSettings,
    measure,
    speed_configs,
)
from infinisim.analysis.report import Section
from infinisim.analysis.sections import (
    BASELINE,
    BREAKDOWN_TEXT,
    accuracy_section,
    by_model_size,
    speedups,
    timeline_section,
)
from infinisim.analysis.sweep import evaluate
from infinisim.core.files import write_json, write_text_atomic


def _range(values: pd.Series) -> str:
    return f"{values.min():.2f}x-{values.max():.2f}x" if len(values) else "-"


class Speed:
    """The simulated speed table and the slices of it each experiment reads."""

    def __init__(self, rows: pd.DataFrame, profile: Any, ran: str):
        self.rows, self.profile, self.ran = rows, profile, ran
        p = PAPER
        at_paper_knobs = ((rows["alpha"].isna() | (rows["alpha"] == p["alpha"]))  # a policy without the knob: None
                          & (rows["partial_ratio"].isna() | (rows["partial_ratio"] == p["partial_ratio"])))
        self.paper = rows[at_paper_knobs & (rows["gen_len"] == p["gen_len"])]

    def select(self, **fixed: Any) -> pd.DataFrame:
        """The rows at the paper's knobs with each `fixed` column at its value."""
        rows = self.paper
        for column, value in fixed.items():
            rows = rows[rows[column] == value]
        return rows

    def sweep(self, axis: str, **fixed: Any) -> pd.DataFrame:
        """`select(**fixed)` sorted along `axis`, with each policy's speedup over full."""
        return speedups(self.select(**fixed), [axis]).sort_values(["policy", axis])


def _setup_section(profile: Any, measured: Measured, settings: PaperSettings) -> Section:
    setup = pd.DataFrame([
        ("hardware", "RTX A6000 48 GB, Xeon Gold 6136, DDR4-2666, PCIe 3.0 x16",
         f"simulated: profile `{profile.name}` ({profile.device.name}, {profile.link.name})"),
        ("model / workload", "OPT-13B, prompt 1920, generate 128, fp16", "same, simulated"),
        ("InfiniGen knobs", "alpha 4, partial ratio 0.2, at most 400 KV per layer",
         f"same; share within alpha 4 measured on SmolLM2: {measured.speculated_at[PAPER['alpha']]:.3f} of the cache"),
        ("baselines", "FlexGen, FlexGen+INT4, H2O (20%), UVM, UVM+H2O", "full (FlexGen), int4, h2o (20%); no UVM"),
        ("accuracy", "OPT / Llama-2, 5-shot tasks, WikiText-2 / PTB perplexity",
         f"SmolLM2-135M, recall + perplexity on {settings.text or 'pydoc_data'}, {settings.steps} forced tokens"),
    ], columns=["", "paper", "ours"])
    return Section(
        "Setup, and what differs from the paper",
        "Speed comes from the simulator, not from an A6000: its efficiencies are stated assumptions in the "
        "profile (see docs/SIMULATOR.md for the model and its measured fidelity on this machine). InfiniGen's "
        "fetched share is the one SmolLM2 really chose; OPT-13B's may differ. The paper's overlap of weight and "
        "cache I/O is off in both. UVM baselines are not modelled.", table=setup)


def _batch_section(speed: Speed) -> tuple[Section, list[tuple[str, str, str]]]:
    batch = speed.sweep("batch", model=PAPER["model"], prompt_len=PAPER["prompt_len"])
    batch = batch[batch["batch"].isin(PAPER["batches"])]
    ig = batch[batch["policy"] == SUBJECT].set_index("batch")["total_s"]
    vs = {pol: batch[batch["policy"] == pol].set_index("batch")["total_s"] / ig for pol in BASELINES if pol != SUBJECT}
    wide = batch.pivot(index="policy", columns="batch", values="total_s").reindex(list(BASELINES))
    wide.columns = [f"batch {b} (s)" for b in wide.columns]
    section = Section(
        "Speedup vs batch size (OPT-13B, prompt 1920, generate 128)",
        "Total time (prefill + 128 tokens) per policy, and the speedup over full. The table gives total seconds.",
        figures.panels(batch, "batch", [("total_s", "total seconds"), ("speedup", "speedup over full")], "policy",
                       "paper-batch", f"OPT-13B on {speed.profile.name}: time and speedup vs batch", speed.ran,
                       "batch size"), wide.reset_index())
    return section, [("InfiniGen vs FlexGen (full)", "part of 1.63x-32.93x over the baselines", _range(vs["full"])),
                     ("InfiniGen vs INT4", "up to 3.00x over prior KV-cache methods", _range(vs["int4"])),
                     ("InfiniGen vs H2O", "up to 3.00x over prior KV-cache methods", _range(vs["h2o"]))]


def _breakdown_sections(speed: Speed, measured: Measured) -> list[Section]:
    from infinisim.sim.workload import synthetic
    from infinisim.traces.spec import named_model

    at8 = speed.select(model=PAPER["model"], prompt_len=PAPER["prompt_len"], batch=8)
    breakdown = Section("Where a decode step's time goes (OPT-13B, batch 8)", BREAKDOWN_TEXT,
                        figures.plan_breakdown(at8, "paper-breakdown", "decode step breakdown, OPT-13B batch 8",
                                               speed.ran))
    workload = synthetic(named_model(PAPER["model"]), 8, PAPER["prompt_len"], 8, "infinigen", "float16",
                         {"budget": float(MAX_KV), "partial_ratio": PAPER["partial_ratio"], "dense_layers": 1},
                         measured.speculated_at[PAPER["alpha"]])
    return [breakdown, timeline_section(workload, speed.profile, speed.ran + "; 8 generated tokens for the excerpt")]


def _prompt_section(speed: Speed) -> tuple[Section, tuple[str, str, str]]:
    prompt = speed.sweep("prompt_len", model=PAPER["model"], batch=8)
    prompt = prompt[prompt["prompt_len"].isin(PAPER["prompt_lens"])]
    ig = prompt[prompt["policy"] == SUBJECT]
    section = Section(
        "Speedup vs prompt length (OPT-13B, batch 8)",
        "InfiniGen fetches at most 400 KV per layer, so above 400 tokens its bytes per step stop growing with "
        "the prompt while full's keep growing.",
        figures.panels(prompt, "prompt_len", [("speedup", "speedup over full")], "policy", "paper-prompt",
                       f"speedup over full vs prompt length, OPT-13B batch 8 on {speed.profile.name}", speed.ran,
                       "prompt length", reference=1.0),
        prompt.pivot(index="policy", columns="prompt_len", values="speedup").reindex(list(BASELINES)).rename(
            columns=lambda n: f"prompt {n}").reset_index())
    return section, ("vs prompt length 384..1920", "swept; no number in INFINIGEN.md",
                     f"InfiniGen over full {ig['speedup'].iloc[0]:.2f}x ({ig['prompt_len'].iloc[0]}) to "
                     f"{ig['speedup'].iloc[-1]:.2f}x ({ig['prompt_len'].iloc[-1]})")


def _model_section(speed: Speed) -> tuple[Section | None, tuple[str, str, str]]:
    models = speed.paper[(speed.paper["batch"] == 4) & (speed.paper["prompt_len"] == PAPER["prompt_len"])
                         & speed.paper["model"].isin(PAPER["models"])]
    fit = models[models["fits"]]
    missing = models[~models["fits"]].drop_duplicates("model")
    note = "".join(f" {r.model} does not fit: {r.does_not_fit}." for r in missing.itertuples())
    note += "".join(f" {m}: {share:.0%} of every block's weights in host memory, streamed a layer ahead of use, as "
                    "the paper places them (its figure ran with weight/cache I/O overlap off; ours overlaps)."
                    for m, share in PAPER["weights_on_host"].items() if m in set(fit["model"]))
    section = None
    if len(fit):
        fit = by_model_size(speedups(fit, ["model"]))
        table = fit.pivot(index="policy", columns="model", values="speedup").reindex(list(BASELINES))
        table = table[[m for m in PAPER["models"] if m in table.columns]]  # by size, as the figure
        section = Section(
            "Speedup vs model size (batch 4)", "Speedup over full per model." + note,
            figures.panels(fit, "model", [("speedup", "speedup over full")], "policy", "paper-models",
                           f"speedup over full vs model, batch 4, prompt 1920 on {speed.profile.name}", speed.ran,
                           "model", categorical=True, reference=1.0),
            table.rename(columns=lambda m: f"{m} speedup").reset_index())
    ours = [f"{m}: {v:.2f}x" for m, v in fit[fit["policy"] == SUBJECT][["model", "speedup"]].itertuples(False)]
    ours += [f"{m} does not fit" for m in missing["model"]]
    return section, ("vs model size 6.7B/13B/30B", "swept; no number in INFINIGEN.md", "; ".join(ours))


def _knob_accuracy(measured: Measured, paths: list[str], knob: str) -> pd.DataFrame:
    mine = measured.points_of(paths)
    return mine.assign(**{knob: [k[knob] for k in mine["knobs"]]})


def _sensitivity_sections(speed: Speed, measured: Measured) -> list[Section]:
    p = PAPER
    rows = speed.rows[(speed.rows["model"] == p["model"]) & (speed.rows["batch"] == 8)
                      & (speed.rows["prompt_len"] == p["prompt_len"])]
    full = float(rows.loc[rows["policy"] == BASELINE, "total_s"].iloc[0])
    ig = rows[rows["policy"] == SUBJECT].assign(speedup=lambda r: full / r["total_s"])
    ran = f"{speed.ran}; {measured.ran}"

    alpha = ig[ig["partial_ratio"] == p["partial_ratio"]].sort_values("alpha")[["alpha", "speedup",
                                                                                "fetched_fraction"]]
    alpha = alpha.merge(_knob_accuracy(measured, list(measured.by_alpha.values()), "alpha")[
        ["alpha", "recall", "perplexity_ratio"]], on="alpha", how="left").assign(policy=SUBJECT)
    ratio = ig[ig["alpha"] == p["alpha"]][["partial_ratio", "speedup", "fetched_fraction", "spec_ms"]]
    ratio = ratio.merge(_knob_accuracy(measured, list(measured.by_ratio.values()), "partial_ratio")[
        ["partial_ratio", "recall", "perplexity_ratio"]], on="partial_ratio").assign(policy=SUBJECT)
    ratio = ratio.sort_values("partial_ratio")
    speed_label, recall_label = "speedup over full (OPT-13B b8, simulated)", "recall (SmolLM2, measured)"
    return [
        Section("Sensitivity to alpha",
                "A larger alpha admits more tokens (up to the 400-KV cap). Speed: OPT-13B batch 8 with the share "
                "SmolLM2 chose within each alpha; accuracy: SmolLM2 runs at each alpha.",
                figures.panels(alpha, "alpha", [("speedup", speed_label), ("recall", recall_label),
                                                ("perplexity_ratio", "perplexity / dense (SmolLM2)")], "policy",
                               "paper-alpha", "alpha sensitivity", ran, "alpha"), alpha.drop(columns="policy")),
        Section("Sensitivity to the partial weight ratio",
                "A larger ratio makes speculation costlier (more columns of the partial key cache scanned) and "
                "changes how peaked the approximate scores are, hence how many tokens fall within alpha. Speed: "
                "OPT-13B batch 8 with the share SmolLM2 chose at each ratio; accuracy: SmolLM2 runs at each ratio.",
                figures.panels(ratio, "partial_ratio", [("speedup", speed_label), ("recall", recall_label)],
                               "policy", "paper-partial-ratio", "partial weight ratio sensitivity", ran,
                               "partial weight ratio"), ratio.drop(columns="policy")),
    ]


def _accuracy_claim(points: pd.DataFrame) -> tuple[str, str, str]:
    lines = []
    ig, h2o = points[points["policy"] == SUBJECT], points[points["policy"] == "h2o"]
    for row in ig.itertuples():
        other = h2o.iloc[(h2o["fetched_fraction"] - row.fetched_fraction).abs().argmin()]
        lines.append(f"at {row.fetched_fraction:.0%}: recall {row.recall:.3f} vs H2O {other.recall:.3f}, "
                     f"perplexity x{row.perplexity_ratio:.3f} vs x{other.perplexity_ratio:.3f}")
    int4 = points.loc[points["policy"] == "int4", "perplexity_ratio"]
    if len(int4):
        lines.append(f"INT4 (whole cache) perplexity x{int4.iloc[0]:.3f}")
    return ("accuracy vs fetched fraction", "close to the full cache; better than H2O and INT4 at the same fetched "
            "fraction", "; ".join(lines))


def reproduce_paper(settings: PaperSettings, out_dir: str | Path, log: Callable[[str], None] = print
                    ) -> tuple[list[Section], str]:
    """Run the executor and the simulator experiments; return the report's sections and intro."""
    from infinisim.hwprofiles.profile import load_profile

    out = Path(out_dir)
    profile = load_profile(settings.profile)  # a bad profile fails before minutes of measuring
    measured = measure(settings, out, log)
    configs = {c.key(): c for c in speed_configs(settings.profile, measured.speculated_at,
                                                 measured.speculated_by_ratio)}
    log(f"speed on {profile.name} through the simulator ({len(configs)} configs) ...")
    t0 = time.perf_counter()
    rows = pd.DataFrame([evaluate(c) for c in configs.values()])
    log(f"  simulated in {time.perf_counter() - t0:.0f} s")
    write_text_atomic(out / "paper-speed.csv", rows.to_csv(index=False))
    points = measured.points_of([*measured.dense, *measured.by_fraction])
    write_text_atomic(out / "paper-accuracy.csv", points.to_csv(index=False))
    speed = Speed(rows, profile, f"infinisim reproduce paper --profile {settings.profile} (simulator; table "
                                 f"{out / 'paper-speed.csv'})")

    batch, claims = _batch_section(speed)
    prompt, prompt_claim = _prompt_section(speed)
    model, model_claim = _model_section(speed)
    claims += [prompt_claim, model_claim, _accuracy_claim(points)]
    claims_section = Section("The paper's claims beside ours",
                             "Speed rows: simulated OPT-13B on the profile; accuracy row: SmolLM2 measured. "
                             "INFINIGEN.md gives the paper's headline numbers only, so the sweeps' shapes are "
                             "compared, not their points.",
                             table=pd.DataFrame(claims, columns=["", "paper (INFINIGEN.md)", "ours"]))
    sections = [_setup_section(profile, measured, settings), claims_section, batch,
                *_breakdown_sections(speed, measured), prompt, *([model] if model else []),
                *_sensitivity_sections(speed, measured), accuracy_section(points, "paper-accuracy", measured.ran)]
    write_json(claims, out / "paper-claims.json")
    intro = (f"InfiniGen's speed experiments simulated on `{profile.name}` and its accuracy trends measured on "
             f"SmolLM2-135M with this project's executor. Tables: `paper-speed.csv`, `paper-accuracy.csv`; "
             f"traces: `traces/`.")
    return sections, intro
