"""`infinisim serve`, `plan --requests` and `report --serving` as a user runs them: tables, strict
JSON, files written, the Azure trace's attribution beside its results, one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_hardening import infinisim, snapshot

SMALL = ["--model", "opt-6.7b", "--profile", "a6000-pcie3"]


def _strict(text: str) -> object:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_serve_prints_the_latency_table_and_writes_its_files(tmp_path, azure_conv):
    proc = infinisim("serve", *SMALL, "--policy", "resident,full,infinigen", "--speculated-fraction", "0.1",
                     "--requests", str(azure_conv), "--max-requests", "40", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["policy", "done", "TTFT"] and len(lines) >= 4
    assert "Azure LLM inference trace 2023" in proc.stdout and "CC-BY 4.0" in proc.stdout  # its attribution
    meta = _strict((tmp_path / "s" / "serving.json").read_text())
    assert [r["policy"] for r in meta["rows"]] == ["resident", "full", "infinigen"] and meta["attribution"]
    table = pd.read_csv(tmp_path / "s" / "requests-infinigen.csv")
    too_long = table["prompt_len"] + table["gen_len"] > 2048  # beyond OPT's positions: refused, and said so
    assert len(table) == 40 and too_long.any() and (table["ttft_s"][~too_long] > 0).all()
    assert table["ttft_s"][too_long].isna().all() and table["too_long"].equals(too_long)
    assert f"({too_long.sum()} requests longer than opt-6.7b's positions were refused" in proc.stdout
    report = infinisim("report", "--serving", str(tmp_path / "s"), "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    assert "Latency per request" in (tmp_path / "r" / "report.md").read_text()


def test_serve_json_is_strict_and_synthetic_streams_run(tmp_path):
    trace = tmp_path / "ig.trace.parquet"
    assert infinisim("run", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "64", "--gen-len", "3",
                     "--policy", "infinigen", "--trace", str(trace)).returncode == 0
    proc = infinisim("serve", *SMALL, "--policy", "h2o,int4,infinigen", "--from-trace", str(trace), "--alpha", "6",
                     "--rate", "2", "--count", "30", "--prompt-len", "256", "--gen-len", "12", "--arrivals", "gamma",
                     "--cv", "2", "--prefill", "chunked", "--max-batched-tokens", "512", "--json")
    assert proc.returncode == 0, proc.stderr
    data = _strict(proc.stdout)
    assert [r["completed"] for r in data["rows"]] == [30, 30, 30] and data["attribution"] is None


def test_capacity_plan_and_its_report(tmp_path, azure_conv):
    out = tmp_path / "cap"
    proc = infinisim("plan", *SMALL, "--policy", "resident,infinigen", "--speculated-fraction", "0.1",
                     "--requests", str(azure_conv), "--max-requests", "60", "--slo", "ttft=2s,tpot=150ms",
                     "--serial", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "largest request rate within TTFT p99 <= 2 s, TPOT p99 <= 150 ms" in proc.stdout
    rows = pd.read_csv(out / "capacity.csv")
    assert list(rows["policy"]) == ["resident", "infinigen"] and (rows["max_rate"] > 0).all()
    tried = _strict((out / "capacity.json").read_text())["tried"]
    for row in rows.itertuples():  # the rate found meets the SLO; the next one tried above it does not
        ok = [t["rate"] for t in tried[row.key] if t["meets_slo"]]
        above = [t["rate"] for t in tried[row.key] if not t["meets_slo"] and t["rate"] > row.max_rate]
        assert max(ok) == pytest.approx(row.max_rate) and min(above) <= row.max_rate * 1.021
    again = infinisim("plan", *SMALL, "--policy", "resident,infinigen", "--speculated-fraction", "0.1",
                      "--requests", str(azure_conv), "--max-requests", "60", "--slo", "ttft=2s,tpot=150ms",
                      "--serial", "--out", str(out), "--json")  # from the cache
    assert again.returncode == 0 and [r["max_rate"] for r in _strict(again.stdout)] == list(rows["max_rate"])
    report = infinisim("report", "--serving", str(out), "--out", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r" / "report.md").read_text()
    assert "Capacity: the largest request rate" in page and "p99 latency vs request rate" in page


@pytest.mark.parametrize(("argv", "needles"), [
    (["serve", *SMALL, "--requests", "{root}/absent.csv"], ["absent.csv", "no such request trace"]),
    (["serve", *SMALL, "--requests", "{bad}"], ["bad.csv", "line 3: GeneratedTokens"]),
    (["serve", *SMALL, "--requests", "{folder}"], ["a-folder", "not a request trace"]),
    (["serve", *SMALL], ["--rate", "request trace"]),
    (["serve", *SMALL, "--rate", "1", "--slo", "ttft=soon"], ["--slo"]),
    (["serve", *SMALL, "--rate", "1", "--policy", "infinigen"], ["--speculated-fraction"]),
    (["serve", "--model", "llama-3.1-70b", "--profile", "l4", "--rate", "1"], ["does not fit"]),
    (["serve", *SMALL, "--rate", "1", "--out", "{file}"], ["not a folder"]),
    (["serve", *SMALL, "--requests", "{bad}", "--window", "99999,10"], ["bad.csv"]),
    (["plan", *SMALL, "--requests", "{bad}", "--out", "{root}/c"], ["bad.csv", "line 3"]),
    (["plan", *SMALL, "--requests", "{good}", "--batch", "4", "--out", "{root}/c"], ["--batch", "does not apply"]),
    (["report", "--serving", "{folder}", "--out", "{root}/r"], ["no serving.json or capacity.json"]),
])
def test_hostile_serving_input_is_one_line_and_touches_nothing(tmp_path, argv, needles):
    (tmp_path / "a-file.txt").write_text("keep me\n")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,10,-2\n")
    (tmp_path / "good.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,10,2\n")
    places = {"root": tmp_path, "file": tmp_path / "a-file.txt", "folder": tmp_path / "a-folder",
              "bad": tmp_path / "bad.csv", "good": tmp_path / "good.csv"}
    before = snapshot(tmp_path)
    proc = infinisim(*[a.format(**places) for a in argv])
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert snapshot(tmp_path) == before


def test_serve_help_names_every_flag_with_help_text():
    from infinisim.cli import build_parser

    proc = infinisim("serve", "--help")
    assert proc.returncode == 0
    for flag in ("--requests", "--rate", "--rate-scale", "--window", "--max-requests", "--count", "--lengths-from",
                 "--arrivals", "--cv", "--seed", "--max-seqs", "--max-batched-tokens", "--prefill", "--slo",
                 "--speculated-fraction", "--budget", "--out", "--json"):
        assert flag in proc.stdout, flag
    verbs = next(a for a in build_parser()._actions if a.dest == "command").choices
    for verb in ("serve", "plan"):
        missing = [a.option_strings for a in verbs[verb]._actions if a.option_strings and not a.help]
        assert not missing, (verb, missing)
