"""The planner: sweep expansion, identical results serially / over processes / on Dask, the cache
resuming an interrupted sweep, configs that do not fit, sweep-file errors, and table queries."""

from __future__ import annotations

import pandas as pd
import pytest

from infinisim.analysis import sweep as planner
from infinisim.analysis.planner import best_under, largest_batch, pareto
from infinisim.analysis.sweep import Sweep, load_sweep, run_sweep
from infinisim.cli import main
from infinisim.core.errors import InfinisimError


def small_sweep() -> Sweep:
    return Sweep(["a6000-pcie3", "l4"], ["opt-6.7b", "llama-3.1-70b"], [2, 8], [512], [6],
                 ["resident", "full", "infinigen"], knobs={"budget": [0.1, 0.2]}, speculated_fraction=0.1)


def _by_key(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values("key").reset_index(drop=True)


def test_configs_vary_knobs_only_where_they_apply():
    configs = small_sweep().configs()
    per_policy = pd.Series([c.policy for c in configs]).value_counts()
    assert per_policy["resident"] == per_policy["full"] == 2 * 2 * 2 and per_policy["infinigen"] == 2 * 2 * 2 * 2
    assert len({c.key() for c in configs}) == len(configs)


@pytest.mark.slow
def test_serial_processes_and_dask_agree(tmp_path):
    configs = small_sweep().configs()
    serial = run_sweep(configs, serial=True)
    local = run_sweep(configs, workers=2)
    dask = run_sweep(configs, scheduler="local")
    pd.testing.assert_frame_equal(_by_key(serial), _by_key(local))
    pd.testing.assert_frame_equal(_by_key(serial), _by_key(dask))
    assert serial["fits"].any() and not serial["fits"].all()


def test_does_not_fit_is_flagged_with_the_reason():
    rows = run_sweep(small_sweep().configs(), serial=True)
    big = rows[(rows.model == "llama-3.1-70b") & (rows.profile == "l4")]
    assert not big["fits"].any()
    assert big["does_not_fit"].str.startswith("device memory: needs").all()
    small = rows[(rows.model == "opt-6.7b") & (rows.profile == "a6000-pcie3") & (rows.policy == "full")]
    assert small["fits"].all() and (small["decode_ms"] > 0).all()


def test_cache_resumes_an_interrupted_sweep(tmp_path, monkeypatch):
    configs = small_sweep().configs()
    cache = tmp_path / "cache.jsonl"
    calls: list[str] = []
    real = planner.evaluate

    def counted(config):
        calls.append(config.key())
        return real(config)

    monkeypatch.setattr(planner, "evaluate", counted)

    def stop_after_five(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(configs, cache, serial=True, on_result=stop_after_five)
    assert len(calls) == 5 and len(cache.read_text().splitlines()) == 5
    with cache.open("a") as f:
        f.write('{"key": "cut off mid-wri')  # an interruption can leave half a line
    calls.clear()
    rows = run_sweep(configs, cache, serial=True)
    assert len(calls) == len(configs) - 5 and len(rows) == len(configs)
    calls.clear()
    again = run_sweep(configs, cache, serial=True)
    assert calls == [] and again.equals(rows)


def test_table_queries():
    rows = pd.DataFrame([
        {"profile": "p", "model": "m", "policy": "a", "prompt_len": 1, "gen_len": 1, "batch": 1, "fits": True,
         "decode_ms": 10.0, "tokens_per_s": 100.0},
        {"profile": "p", "model": "m", "policy": "a", "prompt_len": 1, "gen_len": 1, "batch": 4, "fits": True,
         "decode_ms": 30.0, "tokens_per_s": 300.0},
        {"profile": "p", "model": "m", "policy": "a", "prompt_len": 1, "gen_len": 1, "batch": 8, "fits": True,
         "decode_ms": 60.0, "tokens_per_s": 250.0},  # dominated by batch 4
        {"profile": "p", "model": "m", "policy": "a", "prompt_len": 1, "gen_len": 1, "batch": 16, "fits": False,
         "decode_ms": float("nan"), "tokens_per_s": float("nan")},
    ])
    assert pareto(rows)["batch"].tolist() == [1, 4]
    assert best_under(rows, target_ms=40)["batch"].tolist() == [4]
    assert best_under(rows, target_ms=5).empty
    assert largest_batch(rows, 65)["batch"].tolist() == [8]


@pytest.mark.parametrize(("text", "field", "message"), [
    ("profiles: [l4]\nmodels: [opt-13b]\nbatches: [1]\nprompt_lens: [64]\ngen_lens: [4]\npolicies: [full]\n"
     "colour: red\n", "colour", "unknown key"),
    ("profiles: [l4]\nmodels: [opt-13b]\nbatches: [1]\nprompt_lens: [64]\ngen_lens: [4]\n", "policies",
     "missing axis"),
    ("profiles: [l4]\nmodels: [opt-13b]\nbatches: [0]\nprompt_lens: [64]\ngen_lens: [4]\npolicies: [full]\n",
     "batches", "positive number"),
    ("profiles: [l4]\nmodels: [opt-13b]\nbatches: [1.5]\nprompt_lens: [64]\ngen_lens: [4]\npolicies: [full]\n",
     "batches", "whole number"),
    ("profiles: [l4\n", "line 2", "malformed YAML"),
])
def test_malformed_sweep_file(tmp_path, text, field, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(InfinisimError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: {field}:") and message in str(err.value)


def test_plan_cli(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("profiles: [a6000-pcie3, h100-sxm]\nmodels: [opt-6.7b]\nbatches: [1, 4, 16]\n"
                     "prompt_lens: [512]\ngen_lens: [6]\npolicies: [full, infinigen]\nspeculated_fraction: 0.1\n")
    out = tmp_path / "plan"
    assert main(["plan", "--sweep", str(sweep), "--target-ms", "80", "--serial", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12 configs: 12 fit" in text and "largest batch meeting 80 ms/step" in text
    table = pd.read_parquet(out / "plan.parquet")
    csv = pd.read_csv(out / "plan.csv")
    assert len(table) == len(csv) == 12 and list(table.columns) == list(csv.columns)
    assert table["fits"].all() and (table["decode_ms"] > 0).all()
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [a6000-pcie3]\n")
    assert main(["plan", "--sweep", str(bad)]) == 1
    assert "missing axis" in capsys.readouterr().err
