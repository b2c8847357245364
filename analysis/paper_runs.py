"""The runs behind `infinisim reproduce paper`: the paper's settings, the executor's teacher-forced
quality runs on SmolLM2 (what InfiniGen's share and every accuracy point come from) and the
simulator configs of the paper's speed sweeps. `analysis.paper` turns them into the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from infinisim.analysis.accuracy import points_from
from infinisim.analysis.sweep import Config
from infinisim.core.policies import POLICIES

MAX_KV = 400  # the paper's cap: at most 400 KV entries fetched per layer
PAPER = {"model": "opt-13b", "prompt_len": 1920, "gen_len": 128, "alpha": 4, "partial_ratio": 0.2,
         "batches": [4, 8, 12, 16, 20], "prompt_lens": [384, 768, 1152, 1536, 1920],
         "models": ["opt-6.7b", "opt-13b", "opt-30b"], "alphas": list(range(1, 10)),
         "partial_ratios": [round(0.1 * i, 1) for i in range(1, 11)],
         "weights_on_host": {"opt-30b": 0.3}}  # the model-size figure: 30% of OPT-30B's weights on the CPU
BASELINES = ("full", "int4", "h2o", "infinigen")
SUBJECT = "infinigen"  # the paper's method: its claims are this policy's rows against the others'
# The paper's setting of each policy's knobs in its speed runs (a policy takes the knobs it has)
PAPER_KNOBS = {"infinigen": {"alpha": float(PAPER["alpha"]), "budget": float(MAX_KV), "dense_layers": 1,
                             "partial_ratio": PAPER["partial_ratio"]},
               "h2o": {"budget": 0.2}}


@dataclass(frozen=True)
class PaperSettings:
    profile: str = "a6000-pcie3"
    text: str | None = None  # None: Python's bundled docs
    prompt_len: int = 1920  # SmolLM2 runs
    steps: int = 24
    quick: bool = False


class QualityRuns:
    """SmolLM2 loaded once; teacher-forced quality runs written as traces, one per distinct setting."""

    def __init__(self, settings: PaperSettings, out: Path, log: Callable[[str], None], total: int):
        from infinisim.executor.prompts import read_prompt_file
        from infinisim.executor.session import Session

        self.session = Session("smollm2-135m")
        text = read_prompt_file(settings.text) if settings.text else None
        self.prompts = self.session.prompts(1, settings.prompt_len, text, settings.steps, forced=True,
                                            source=settings.text or "", field="--prompt-file")
        self.settings, self.out, self.log = settings, out / "traces", log
        self.source = self.prompts.source
        self.done: dict[str, str] = {}  # trace name -> path
        self.traces: dict[str, Any] = {}  # path -> Trace
        self.total, self.start = total, time.perf_counter()

    def run(self, policy: str, knobs: dict[str, Any]) -> str:
        from infinisim.executor.generate import SamplingConfig
        from infinisim.executor.kvcache import Measurement

        tag = f"{policy} {knobs}"
        if tag in self.done:
            return self.done[tag]
        elapsed = time.perf_counter() - self.start
        self.log(f"  executor [{len(self.done) + 1}/{self.total}, {elapsed:.0f} s]: {policy} {knobs or ''} "
                 f"({self.settings.prompt_len} + {self.settings.steps} forced tokens)")
        _, trace = self.session.run(policy, self.prompts, SamplingConfig(self.settings.steps, stop_at_eos=False),
                                    knobs, Measurement(quality=True), "infinisim reproduce paper")
        path = str(self.session.write(trace, self.out, knobs=knobs))
        self.done[tag], self.traces[path] = path, trace
        return path


def speed_configs(profile: str, speculated_at: dict[int, float], speculated_by_ratio: dict[float, float]
                  ) -> list[Config]:
    """Every simulator config of the paper's speed sweeps (duplicates collapse in the caller)."""
    p = PAPER

    def config(policy: str, model: str = p["model"], batch: int = 8, prompt: int = p["prompt_len"],
               alpha: int = p["alpha"], ratio: float = p["partial_ratio"], speculated: float | None = None) -> Config:
        kv = POLICIES[policy]
        swept = {k: v for k, v in (("alpha", float(alpha)), ("partial_ratio", ratio)) if k in kv.knob_names}
        knobs = tuple(sorted({**PAPER_KNOBS.get(policy, {}), **swept}.items()))
        share = (speculated if speculated is not None else speculated_at[alpha]) if kv.speculating else None
        return Config(profile, model, batch, prompt, p["gen_len"], policy, knobs, speculated_fraction=share,
                      weights_on_host=p["weights_on_host"].get(model, 0.0))

    out = [config(pol, batch=b) for b in p["batches"] for pol in BASELINES]
    out += [config(pol, prompt=n) for n in p["prompt_lens"] for pol in BASELINES]
    out += [config(pol, model=m, batch=4) for m in p["models"] for pol in BASELINES]
    out += [config("infinigen", alpha=a) for a in p["alphas"]]
    out += [config("infinigen", ratio=r, speculated=f) for r, f in speculated_by_ratio.items()]
    return out


@dataclass
class Measured:
    """What the executor measured on SmolLM2: quality traces and InfiniGen's within-alpha shares."""
    dense: list[str]  # resident (the reference) and int4
    by_fraction: list[str]  # infinigen, oracle, h2o at fixed fetched fractions
    by_alpha: dict[int, str]  # infinigen at the paper's setting, per alpha
    by_ratio: dict[float, str]  # infinigen at the paper's setting, per partial weight ratio
    speculated_at: dict[int, float]  # uncapped share within alpha 1..9 at the paper's setting
    speculated_by_ratio: dict[float, float]  # share within the paper's alpha, per partial ratio
    points: pd.DataFrame  # quality points of every run (`source`: its trace's path)
    ran: str  # what was run, for the figures

    def points_of(self, paths: list[str]) -> pd.DataFrame:
        return self.points[self.points["source"].isin(paths)]


def measure(settings: PaperSettings, out: Path, log: Callable[[str], None]) -> Measured:
    from infinisim.sim.workload import mean_speculated_fraction

    p = PAPER
    fractions = [0.1, 0.3] if settings.quick else [0.05, 0.1, 0.2, 0.4]
    alphas = [1, 4, 9] if settings.quick else p["alphas"]
    ratios = [0.1, 0.5, 1.0] if settings.quick else p["partial_ratios"]
    paper_knobs = {"alpha": float(p["alpha"]), "budget": MAX_KV / p["prompt_len"],  # 400 of 1920, as a share
                   "partial_ratio": p["partial_ratio"], "dense_layers": 1}
    dense = [("resident", {}), ("int4", {})]
    exactly = {"alpha": 1000.0, "dense_layers": 1}  # every speculating layer fetches exactly its budget
    by_fraction = [(pol, {k: v for k, v in {**exactly, "budget": f}.items() if k in POLICIES[pol].knob_names})
                   for f in fractions for pol in (SUBJECT, "oracle", "h2o")]
    by_alpha = {a: (SUBJECT, {**paper_knobs, "alpha": float(a)}) for a in alphas}
    by_ratio = {r: (SUBJECT, {**paper_knobs, "partial_ratio": r}) for r in ratios}
    planned = [*dense, *by_fraction, *by_alpha.values(), *by_ratio.values(), (SUBJECT, paper_knobs)]
    total = len({f"{pol} {knobs}" for pol, knobs in planned})
    log(f"accuracy on SmolLM2 through the executor ({'quick' if settings.quick else 'full'} set: {total} runs) ...")
    ex = QualityRuns(settings, out, log, total)
    dense = [ex.run(*run) for run in dense]
    by_fraction = [ex.run(*run) for run in by_fraction]
    by_alpha = {a: ex.run(*run) for a, run in by_alpha.items()}
    by_ratio = {r: ex.run(*run) for r, run in by_ratio.items()}
    paper_trace = ex.traces[ex.run(SUBJECT, paper_knobs)]  # already run when alpha 4 is in the sweep
    speculated_at = {a: mean_speculated_fraction(paper_trace, a) for a in p["alphas"]}
    log(f"  InfiniGen's uncapped share at alpha {p['alpha']} (SmolLM2): {speculated_at[p['alpha']]:.3f}")
    return Measured(dense, by_fraction, by_alpha, by_ratio, speculated_at,
                    {r: mean_speculated_fraction(ex.traces[path], p["alpha"]) for r, path in by_ratio.items()},
                    points_from(ex.traces),
                    f"infinisim reproduce paper (executor: SmolLM2, {settings.prompt_len}-token prompt from "
                    f"{ex.source}, {settings.steps} teacher-forced steps; traces in {ex.out})")
