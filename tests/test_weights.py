"""Weight offloading in the simulator (FlexGen's placement): a share of every block's weights in host
memory, streamed over the link one layer ahead of its use; the memory plan; `--weights-on-host`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_simulator import ideal_profile

from infinisim.cli import main
from infinisim.hwprofiles.profile import load_profile
from infinisim.sim.engine import simulate
from infinisim.sim.memory import memory_plan, place_weights, weight_parts
from infinisim.sim.result import PHASES
from infinisim.sim.run import simulate_if_fits
from infinisim.sim.workload import synthetic
from infinisim.traces.spec import named_model


def test_a_transfer_bound_weight_stream_takes_weight_bytes_over_bandwidth():
    """resident (no KV moves) with instant compute: each decode step is its blocks' host-side weights,
    one copy per weight tensor: tensors x latency + share x block bytes / bandwidth per layer."""
    spec = named_model("opt-125m")
    p = ideal_profile(bandwidth=1e9, latency=1e-5)
    w = synthetic(spec, 2, 64, 5, "resident", "float16", weights_on_host=0.5)
    per_layer = spec.streamed_weight_tensors * 1e-5 + 0.5 * spec.layer_weight_bytes("float16") / 1e9
    for exact in (True, False):
        result = simulate_if_fits(w, p, exact=exact).result
        for s in range(w.n_steps):
            assert result.decode_step_s[s] == pytest.approx(spec.n_layers * per_layer, rel=1e-6)
            assert result.phase_s[s + 1, :, PHASES.index("h2d")].sum() == pytest.approx(spec.n_layers * per_layer)


def test_a_weight_stream_shorter_than_compute_adds_no_wait():
    """A small share streams behind the layer before it: the step is resident's. (Launch overhead set
    to 0: the host's 9 copy calls a layer are real host time, and at this size the H100 is host-bound.)"""
    spec, h100 = named_model("llama-3-8b"), load_profile("h100-sxm")
    p = replace(h100, device=replace(h100.device, launch_overhead=0.0))
    base = simulate(synthetic(spec, 32, 2048, 6, "resident"), p)
    streamed = simulate(synthetic(spec, 32, 2048, 6, "resident", weights_on_host=0.01), p)
    assert streamed.phase_s[2:, :, PHASES.index("h2d")].sum() > 0
    assert streamed.decode_step_s[1:] == pytest.approx(base.decode_step_s[1:], rel=1e-9)
    assert streamed.phase_s[2:, :, PHASES.index("wait")].sum() == pytest.approx(0, abs=1e-12)


def test_weights_placed_on_the_host_leave_the_device():
    spec = named_model("opt-30b")
    device, host = weight_parts(spec, "float16", 0.3)
    blocks = spec.n_layers * spec.layer_weight_bytes("float16")
    assert host["weights"] == pytest.approx(0.3 * blocks)
    assert device["weights"] + host["weights"] == pytest.approx(spec.weight_bytes("float16"))
    assert device["weight buffers"] == pytest.approx(2 * 0.3 * spec.layer_weight_bytes("float16"))


def test_does_not_fit_names_the_smallest_share_that_would_and_auto_takes_it():
    """The paper's OPT-30B point: batch 4 on the 48 GB A6000 needs weights on the host."""
    spec, p = named_model("opt-30b"), load_profile("a6000-pcie3")
    w = synthetic(spec, 4, 1900, 16, "full", "float16")
    problem = memory_plan(w, p).problem
    assert problem.startswith("device memory") and "--weights-on-host 0.24 would fit" in problem
    placed = place_weights(w, p)
    assert placed.weights_on_host == 0.24 and memory_plan(placed, p).problem is None
    tighter = synthetic(spec, 4, 1900, 16, "full", "float16", weights_on_host=0.23)
    assert memory_plan(tighter, p).problem is not None
    small = synthetic(named_model("opt-125m"), 1, 64, 4, "full")
    assert place_weights(small, p).weights_on_host == 0  # fits as it is: nothing moves
    huge = synthetic(named_model("llama-3.1-70b"), 64, 4096, 4, "resident")
    assert place_weights(huge, load_profile("l4")).weights_on_host == 0  # even all of them would not fit
    assert "--weights-on-host" not in memory_plan(huge, load_profile("l4")).problem


def test_simulate_and_plan_take_weights_on_host(tmp_path, capsys):
    import pandas as pd

    args = ["--model", "opt-30b", "--profile", "a6000-pcie3", "--batch", "4", "--prompt-len", "1900",
            "--gen-len", "8", "--policy", "full"]
    assert main(["simulate", *args, "--json"]) == 1
    assert "--weights-on-host 0.24 would fit" in json.loads(capsys.readouterr().out)[0]["does_not_fit"]
    assert main(["simulate", *args, "--weights-on-host", "auto", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["fits"] and row["weights_on_host"] == 0.24
    assert main(["plan", *args, "--weights-on-host", "0,0.3,auto", "--serial", "--out", str(tmp_path)]) == 0
    rows = pd.read_parquet(tmp_path / "plan.parquet").sort_values("weights_on_host")
    assert list(rows["weights_on_host"]) == [0.0, 0.24, 0.3] and list(rows["fits"]) == [False, True, True]
    assert list(rows["weights_auto"]) == [False, True, False]
    assert rows["decode_ms"].iloc[1] < rows["decode_ms"].iloc[2]  # less to stream
