"""The policy registry: every policy in it runs in the executor, the simulator and the planner, and
takes the same knobs with the same defaults in `run`, `simulate` and `plan`. Parametrised over the
registry, so a policy added to it is tested here without a new line."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from infinisim.cli import main
from infinisim.core.errors import InfinisimError
from infinisim.core.policies import KNOBS, POLICIES, budget_cap, partial_width
from infinisim.executor.policies import POLICIES as EXECUTOR_POLICIES
from infinisim.sim.policies import SIM_POLICIES
from infinisim.traces.trace import read_trace

SHAPE = ["--prompt-len", "24", "--gen-len", "3"]


def example_flags(name: str) -> list[str]:
    """Every knob of the policy set to its registry example (a valid value other than the default)."""
    return [arg for knob in POLICIES[name].knob_names for arg in (KNOBS[knob].flag, str(KNOBS[knob].example))]


def expected(name: str, examples: bool) -> dict:
    values = {k: KNOBS[k].example for k in POLICIES[name].knob_names} if examples else {}
    return POLICIES[name].make_knobs(values).to_dict()


def same(got: dict, want: dict) -> bool:
    """Knob dicts equal, NaN (a table's empty cell) read as None."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in got.items()}
    return clean == want


def test_every_layer_has_a_class_for_every_registry_policy():
    assert set(EXECUTOR_POLICIES) == set(SIM_POLICIES) == set(POLICIES)
    for name in POLICIES:
        assert EXECUTOR_POLICIES[name].name == SIM_POLICIES[name].name == name


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[tuple[str, bool], dict]:
    """Two `infinisim run`s of every registry policy on a tiny random model: defaults, and every knob
    at its example value (one run takes each policy's own knobs)."""
    out = {}
    every = ",".join(POLICIES)
    for examples in (False, True):
        folder = tmp_path_factory.mktemp("examples" if examples else "defaults")
        flags = [a for name in POLICIES for a in example_flags(name)] if examples else []
        flags = list(dict(zip(flags[::2], flags[1::2], strict=True)).items())  # each knob once
        assert main(["run", "--model", "smollm2-135m", "--random-weights", *SHAPE, "--batch", "2", "--ignore-eos",
                     "--policy", every, *[a for pair in flags for a in pair], "--out", str(folder), "--json"]) == 0
        for path in folder.glob("*.trace.parquet"):
            trace = read_trace(path)
            out[(trace.run["policy"], examples)] = trace.run["policy_knobs"]
    return out


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("examples", [False, True], ids=["defaults", "examples"])
def test_run_simulate_and_plan_take_the_same_knobs(name, examples, traces, tmp_path, capsys):
    want = expected(name, examples)
    flags = example_flags(name) if examples else []
    share = ["--speculated-fraction", "0.2"] if POLICIES[name].speculating else []

    got = traces[(name, examples)]  # run: the trace header records the knobs in force
    model_dependent = [k for k in want if KNOBS[k].default is None and want[k] is None and not KNOBS[k].optional]
    for k in model_dependent:  # e.g. alpha: the model family's default, resolved by the executor
        assert got.pop(k) is not None
    assert same(got, {k: v for k, v in want.items() if k not in model_dependent})

    capsys.readouterr()
    assert main(["simulate", "--model", "smollm2-135m", "--profile", "a6000-pcie3", "--policy", name, *SHAPE,
                 *flags, *share, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert result["fits"] and same(result["knobs"], want)

    assert main(["plan", "--model", "smollm2-135m", "--profile", "a6000-pcie3", "--policy", name, "--batch", "1",
                 *SHAPE, *flags, *share, "--serial", "--out", str(tmp_path / "plan")]) == 0
    row = pd.read_parquet(tmp_path / "plan" / "plan.parquet").iloc[0]
    assert row["fits"] and same({k: row[k] for k in want}, want)
    assert all(pd.isna(row[k]) for k in KNOBS if k not in want)  # other policies' knobs stay empty


def test_oracle_plans_with_a_speculated_fraction_timed_as_infinigen(tmp_path, capsys):
    assert main(["plan", "--model", "opt-6.7b", "--profile", "a6000-pcie3", "--batch", "4", "--prompt-len", "512",
                 "--gen-len", "6", "--policy", "oracle,infinigen", "--speculated-fraction", "0.1", "--serial",
                 "--out", str(tmp_path)]) == 0
    rows = pd.read_parquet(tmp_path / "plan.parquet").set_index("policy")
    assert rows["fits"].all() and rows.loc["oracle", "decode_ms"] == rows.loc["infinigen", "decode_ms"]
    assert main(["plan", "--model", "opt-6.7b", "--profile", "a6000-pcie3", "--policy", "oracle", "--serial",
                 "--out", str(tmp_path / "no-share")]) == 1
    assert "oracle needs a speculated fraction" in capsys.readouterr().err


def test_knob_ranges_are_checked_once_for_every_layer():
    for knob in KNOBS.values():
        assert knob.check(knob.example) == knob.example and knob.example != knob.default
        with pytest.raises(InfinisimError, match=knob.name):
            knob.check(float("nan") if knob.kind is not str else "no-such-choice")
    assert budget_cap(0.2, 100) == 20 and budget_cap(0.2, 7) == 2 and budget_cap(50, 7) == 7
    assert partial_width(0.3, 64) == 19 and partial_width(0.001, 64) == 1
    with pytest.raises(InfinisimError, match="no policy has a knob 'colour'"):
        POLICIES["h2o"].make_knobs({"colour": 1})


def test_the_papers_settings_are_one_flag_away(tmp_path, capsys):
    assert main(["run", "--model", "smollm2-135m", "--random-weights", *SHAPE, "--policy", "infinigen", "--preset",
                 "paper", "--out", str(tmp_path), "--json"]) == 0
    knobs = read_trace(next(tmp_path.glob("*.parquet"))).run["policy_knobs"]
    assert (knobs["alpha"], knobs["dense_layers"], knobs["budget"]) == (5.0, 1, 0.2)  # Llama family: alpha 5
    capsys.readouterr()
    assert main(["simulate", "--model", "opt-125m", "--profile", "l4", "--policy", "infinigen", "--preset", "paper",
                 "--budget", "0.3", "--speculated-fraction", "0.1", "--prompt-len", "512", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]["knobs"]
    assert (result["dense_layers"], result["budget"], result["alpha"]) == (1, 0.3, None)  # a flag overrides it
    defaults = POLICIES["infinigen"].make_knobs({})
    assert (defaults.dense_layers, defaults.alpha, defaults.budget) == (3, 8.0, 0.1)
