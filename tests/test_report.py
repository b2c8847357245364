"""Expected accuracy from quality traces, the planner's accuracy column, self-contained reports, and
`infinisim reproduce paper` end to end."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from infinisim.analysis.accuracy import expected, quality_points
from infinisim.cli import main
from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.recording import run_policy
from infinisim.traces.trace import write_trace


def test_expected_accuracy_interpolates_only_inside_the_measured_range():
    points = pd.DataFrame({"policy": ["infinigen"] * 2 + ["h2o"], "fetched_fraction": [0.1, 0.3, 0.2],
                           "recall": [0.8, 0.9, 0.7], "topk_overlap": [0.5, 0.7, 0.4],
                           "perplexity_ratio": [1.2, 1.0, 1.5]})
    mid = expected(points, "infinigen", 0.2)
    assert mid["expected_recall"] == pytest.approx(0.85) and mid["expected_ppl_ratio"] == pytest.approx(1.1)
    assert expected(points, "infinigen", 0.3)["expected_recall"] == pytest.approx(0.9)
    assert np.isnan(expected(points, "infinigen", 0.05)["expected_recall"])  # below the lowest point
    assert np.isnan(expected(points, "infinigen", 0.5)["expected_recall"])
    assert expected(points, "h2o", 0.2)["expected_recall"] == pytest.approx(0.7)
    assert np.isnan(expected(points, "oracle", 0.2)["expected_recall"])  # never measured
    assert expected(points, "full", 1.0) == {"expected_recall": 1.0, "expected_topk": 1.0, "expected_ppl_ratio": 1.0}


@pytest.fixture(scope="module")
def quality_traces(smollm2, tmp_path_factory):
    """Teacher-forced runs of the embedded model: dense, infinigen at two fixed shares, h2o, int4."""
    out = tmp_path_factory.mktemp("quality")
    ids = smollm2.tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 12)
                                   + " Python is a programming language that lets you work quickly.").ids
    prompt, forced = [ids[:96]], [ids[96:101]]
    paths = {}
    for tag, policy, knobs in (("resident", "resident", {}), ("ig10", "infinigen", {"alpha": 1000.0, "budget": 0.1}),
                               ("ig40", "infinigen", {"alpha": 1000.0, "budget": 0.4}),
                               ("h2o", "h2o", {"budget": 0.3}), ("int4", "int4", {}),
                               ("a2", "infinigen", {"alpha": 2.0, "budget": 1.0}),
                               ("a6", "infinigen", {"alpha": 6.0, "budget": 1.0})):
        _, trace = run_policy(smollm2.model, prompt, policy, SamplingConfig(5, stop_at_eos=False),
                              {"model": "smollm2-135m", "weights": "embedded"}, knobs=knobs,
                              measure=Measurement(forced=forced, quality=True))
        paths[tag] = str(write_trace(trace, out / f"{tag}.trace.parquet"))
    _, plain = run_policy(smollm2.model, prompt, "infinigen", SamplingConfig(2, stop_at_eos=False),
                          {"model": "smollm2-135m", "weights": "embedded"})
    paths["plain"] = str(write_trace(plain, out / "plain.trace.parquet"))
    return paths


def test_quality_points_from_real_traces(quality_traces):
    points = quality_points([quality_traces[k] for k in ("resident", "ig10", "ig40", "h2o", "int4")]).set_index(
        "source")
    ig10, ig40 = points.loc[quality_traces["ig10"]], points.loc[quality_traces["ig40"]]
    assert ig10.fetched_fraction == pytest.approx(0.1, abs=0.02) and ig40.fetched_fraction == pytest.approx(0.4,
                                                                                                            abs=0.02)
    assert 0 < ig10.recall < ig40.recall <= 1
    dense = points.loc[quality_traces["resident"]]
    assert dense.perplexity_ratio == 1.0 and dense.recall == 1.0 and np.isfinite(ig10.perplexity_ratio)
    assert points.loc[quality_traces["int4"]].fetched_fraction == 1.0
    with pytest.raises(InfinisimError, match=r"plain.trace.parquet: run.quality: not a quality trace"):
        quality_points([quality_traces["plain"]])


def test_plan_gets_the_accuracy_to_expect(quality_traces, tmp_path, capsys):
    out = tmp_path / "plan"
    traces = [quality_traces[k] for k in ("resident", "ig10", "ig40", "h2o")]
    assert main(["plan", "--model", "opt-6.7b", "--profile", "a6000-pcie3", "--batch", "1,4", "--prompt-len", "512",
                 "--gen-len", "4", "--policy", "full,infinigen,int4", "--speculated-fraction", "1",
                 "--budget", "0.2,0.9", "--serial", "--quality", *traces, "--out", str(out)]) == 0
    assert "expected_recall" in capsys.readouterr().out
    rows = pd.read_parquet(out / "plan.parquet")
    ig = rows[rows.policy == "infinigen"].set_index("budget")
    points = quality_points(traces).set_index("source")
    lo, hi = points.loc[quality_traces["ig10"]], points.loc[quality_traces["ig40"]]
    share = ig.loc[0.2, "fetched_fraction"].iloc[0]
    assert share == pytest.approx(0.2, abs=0.01)  # the budget caps the wanted share
    want = lo.recall + (hi.recall - lo.recall) * (share - lo.fetched_fraction) / (hi.fetched_fraction
                                                                                 - lo.fetched_fraction)
    assert ig.loc[0.2, "expected_recall"].to_numpy() == pytest.approx(want)
    assert ig.loc[0.9, "expected_recall"].isna().all()  # 90% is outside what was measured
    assert (rows[rows.policy == "full"]["expected_recall"] == 1.0).all()
    assert rows[rows.policy == "int4"]["expected_recall"].isna().all()  # no int4 quality trace given
    assert json.loads((out / "plan.json").read_text())["command"].startswith("infinisim plan --model opt-6.7b")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "data", "action")]


def _decode(png: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated PNG fails here
    return image.size


def test_report_is_self_contained_and_every_image_decodes(quality_traces, tmp_path, capsys):
    import base64

    from infinisim.analysis.validation import compare
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.engine import simulate
    from infinisim.sim.workload import from_trace
    from infinisim.traces.trace import read_trace

    plan = tmp_path / "plan"
    assert main(["plan", "--model", "opt-6.7b,opt-13b", "--profile", "a6000-pcie3,h100-pcie5", "--batch", "2,8",
                 "--prompt-len", "512,1024", "--gen-len", "4", "--policy", "full,h2o,infinigen",
                 "--from-trace", quality_traces["a6"], "--alpha", "2,6", "--budget", "1.0", "--serial",
                 "--target-ms", "500", "--out", str(plan)]) == 0
    workload = from_trace(read_trace(quality_traces["ig10"]))
    comparison = compare(workload, simulate(workload, load_profile("a6000-pcie3")))
    measured = np.array(comparison["per_step_ms"]["measured"])  # the floor: the measured mean's own MAPE
    assert comparison["step"]["mape_floor"] == pytest.approx(np.mean(abs(measured - measured.mean()) / measured) * 100,
                                                             rel=1e-3)
    (tmp_path / "validation.json").write_text(json.dumps({"comparisons": [comparison], "command": "made by a test"},
                                                         default=float))
    out = tmp_path / "report"
    traces = [quality_traces[k] for k in ("resident", "ig10", "ig40", "h2o", "a2", "a6")]
    assert main(["report", "--plan", str(plan), "--validation", str(tmp_path / "validation.json"), "--trace", *traces,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    page = (out / "report.html").read_text()
    parser = _Refs()
    parser.feed(page)
    images = [value for tag, name, value in parser.refs if tag == "img"]
    for tag, name, value in parser.refs:
        embedded = tag == "img" and name == "src" and value.startswith("data:image/png;base64,")
        assert value.startswith("#") or embedded, (tag, name, value[:60])
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert not re.search(r"url\(|@import|https?://", page)
    figures = sorted((out / "figures").glob("*.png"))
    # pareto, speedup vs batch / prompt / model, alpha (simulated), simulated breakdown, validation,
    # measured breakdown, accuracy vs fetched fraction, accuracy vs alpha (measured), timeline
    assert len(images) == len(figures) == 11
    assert {f.name for f in figures} >= {"plan-alpha.png", "trace-alpha.png", "timeline.png", "plan-pareto.png"}
    for data in images:
        width, height = _decode(base64.b64decode(data.removeprefix("data:image/png;base64,")))
        assert width > 300 and height > 150
    markdown = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", markdown)
    assert sorted(linked) == sorted(f"figures/{f.name}" for f in figures)
    assert all(_decode((out / f).read_bytes()) for f in linked)
    assert "Made by:" in markdown and "infinisim plan --model opt-6.7b,opt-13b" in markdown  # each figure's source
    assert "| profile | model | policy |" in markdown


def test_report_errors(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r")]) == 1
    assert "give --plan, --validation, --trace or --serving" in capsys.readouterr().err
    assert main(["report", "--plan", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert f"{tmp_path}: no plan.parquet here" in capsys.readouterr().err
    bad = tmp_path / "validation.json"
    bad.write_text("{not json")
    assert main(["report", "--validation", str(bad), "--out", str(tmp_path / "r")]) == 1
    assert f"{bad}: not a validation result" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.html").exists()


@pytest.mark.slow
def test_reproduce_paper_quick(tmp_path, capsys):
    out = tmp_path / "paper"
    assert main(["reproduce", "paper", "--quick", "--prompt-len", "192", "--gen-len", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    speed = pd.read_csv(out / "paper-speed.csv")
    batch = speed[(speed.model == "opt-13b") & (speed.prompt_len == 1920) & (speed.policy != "infinigen")]
    assert sorted(batch[batch.policy == "full"]["batch"]) == [4, 8, 12, 16, 20]
    thirty = speed[speed.model == "opt-30b"]  # the paper's model-size point: 30% of the weights on the host
    assert len(thirty) == 4 and thirty["fits"].all() and (thirty["weights_on_host"] == 0.3).all()
    assert (speed.loc[speed.model != "opt-30b", "weights_on_host"] == 0).all()
    alphas = speed[(speed.policy == "infinigen") & (speed.batch == 8) & (speed.prompt_len == 1920)
                   & (speed.partial_ratio == 0.2)].sort_values("alpha")
    assert list(alphas["alpha"]) == list(range(1, 10))
    assert alphas["fetched_fraction"].is_monotonic_increasing and alphas["total_s"].is_monotonic_increasing
    accuracy = pd.read_csv(out / "paper-accuracy.csv")
    assert set(accuracy.policy) == {"resident", "int4", "infinigen", "oracle", "h2o"}
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for heading in ("The paper's claims beside ours", "Speedup vs batch size", "Speedup vs prompt length",
                    "Speedup vs model size", "Sensitivity to alpha", "Sensitivity to the partial weight ratio",
                    "Accuracy vs fetched fraction", "Timeline excerpt", "Where a decode step"):
        assert heading in md and heading.replace("'", "&#x27;") in page
    assert "1.63x-32.93x" in md and "opt-30b: 30% of every block's weights in host memory" in md
    assert len(list((out / "figures").glob("*.png"))) == 8 and len(list((out / "traces").glob("*.parquet"))) == 14
