"""The simulator against closed-form cases, determinism, memory fit, replay and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import simpy

from infinisim.cli import main
from infinisim.executor.generate import SamplingConfig
from infinisim.executor.loaders import load_model
from infinisim.executor.recording import run_policy
from infinisim.hwprofiles.profile import Device, Host, Link, Profile, load_profile
from infinisim.sim.costs import Costs
from infinisim.sim.engine import Stream, simulate
from infinisim.sim.memory import memory_plan
from infinisim.sim.result import PHASES
from infinisim.sim.tables import copy_time
from infinisim.sim.workload import from_trace, speculated_fraction_per_layer, synthetic
from infinisim.traces.spec import named_model
from infinisim.traces.trace import write_trace

INSTANT = 1e30  # compute so fast it vanishes next to the copies


def ideal_profile(bandwidth: float = 1e9, latency: float = 1e-5, duplex: bool = True, kind: str = "gpu") -> Profile:
    device = Device(name="ideal", memory=1e12, matmul_flops=INSTANT, matmul_flops_fp32=INSTANT,
                    memory_bandwidth=INSTANT, launch_overhead=0.0, matmul_efficiency=1.0, bandwidth_efficiency=1.0,
                    attention_efficiency=1.0, prefill_attention_sweep=((1.0, INSTANT),),
                    speculation_sweep=((1.0, 0.0),), selection_per_score=0.0, skew_per_row=0.0)
    link = Link(name="test link", h2d_bandwidth=bandwidth, d2h_bandwidth=bandwidth, pageable_bandwidth=bandwidth,
                latency=latency, duplex=duplex)
    host = Host(name="test host", cores=8, memory=1e12, memory_bandwidth=1e11, gather_bandwidth=1e9)
    return Profile("ideal", kind, "closed-form tests", ("by construction",), device, link, host)


def test_link_model_closed_form():
    p = ideal_profile(bandwidth=2e9, latency=1e-5)
    assert copy_time(p, 4e6, "h2d") == pytest.approx(1e-5 + 4e6 / 2e9)
    swept = replace(p, link=replace(p.link, sweep=((1e3, 1e8, 1e8), (1e6, 1e9, 1e9))))
    assert copy_time(swept, 1e6, "h2d") == pytest.approx(1e-3)  # at a measured point: its rate
    assert copy_time(swept, 2e6, "h2d") == pytest.approx(2e6 / 1e9)  # above the sweep: the last rate
    mid = copy_time(swept, 10**4.5, "h2d")
    assert 10**4.5 / 1e9 < mid < 10**4.5 / 1e8  # between the measured rates


def test_transfer_bound_step_is_bytes_over_bandwidth_plus_latency():
    """full on a link with instant compute: each layer's step time is its two copies (K and V),
    each latency + bytes / bandwidth; the one-row write-back overlaps on the duplex link. (The first
    decode step also waits for the prompt's write-back, still on the device->host engine.)"""
    spec = named_model("opt-125m")
    p = ideal_profile(bandwidth=1e9, latency=1e-5)
    w = synthetic(spec, 2, 100, 5, "full", "float16")
    result = simulate(w, p)
    first = result.decode_step_s[0] - result.phase_s[1, :, PHASES.index("h2d")].sum()
    assert first == pytest.approx(spec.n_layers * 2 * (1e-5 + 100 * w.bytes_d2h[0, 0] / 2 / 1e9), rel=1e-6)
    for s in range(1, w.n_steps):
        expected = sum(2 * 1e-5 + w.bytes_h2d[s, layer] / 1e9 for layer in range(spec.n_layers))
        assert result.decode_step_s[s] == pytest.approx(expected, rel=1e-6)
        assert result.phase_s[s + 1, :, PHASES.index("h2d")].sum() == pytest.approx(expected, rel=1e-6)


def _streams(duplex: bool) -> tuple[simpy.Environment, dict[str, Stream], list]:
    env = simpy.Environment()
    log: list = []
    link = simpy.Resource(env, 1)
    engines = {"compute": simpy.Resource(env, 1), "h2d": link, "d2h": link if not duplex else simpy.Resource(env, 1)}
    streams = {name: Stream(env, name, engine, lambda *a: log.append(a)) for name, engine in engines.items()}
    return env, streams, log


def test_copy_overlapped_by_compute_takes_the_max():
    for compute_s, copy_s in ((3.0, 1.0), (1.0, 3.0)):
        env, streams, _ = _streams(duplex=True)
        work = streams["compute"].submit([("attn", 0, compute_s)], [])
        copied = streams["h2d"].submit([("h2d", 1, copy_s)], [])
        after = streams["compute"].submit([("attn", 1, 0.0)], [work, copied])  # the next layer needs both
        env.run()
        assert env.now == pytest.approx(max(compute_s, copy_s))
        assert after.processed


def test_two_copies_sharing_a_link_take_their_sum():
    env, streams, _ = _streams(duplex=False)
    streams["h2d"].submit([("h2d", 0, 2.0)], [])
    streams["d2h"].submit([("d2h", 0, 1.5)], [])
    env.run()
    assert env.now == pytest.approx(3.5)
    env, streams, _ = _streams(duplex=True)  # a duplex link moves both directions at once
    streams["h2d"].submit([("h2d", 0, 2.0)], [])
    streams["d2h"].submit([("d2h", 0, 1.5)], [])
    env.run()
    assert env.now == pytest.approx(2.0)


def test_stream_waits_and_reports_the_stall():
    env, streams, log = _streams(duplex=True)
    copied = streams["h2d"].submit([("h2d", 0, 2.0)], [])
    streams["compute"].submit([("attn", 0, 0.5)], [copied])
    env.run()
    name, _, start, waited, _ = log[-1]
    assert name == "compute" and start == pytest.approx(2.0) and waited == pytest.approx(2.0)


def test_cpu_profile_serialises_everything():
    """On a CPU-only machine copies and compute share the cores: the step is their sum."""
    spec = named_model("opt-125m")
    gpu, cpu = load_profile("a6000-pcie3"), replace(load_profile("a6000-pcie3"), kind="cpu")
    w = synthetic(spec, 4, 512, 4, "infinigen", "float16", speculated_fraction=0.1)
    on_cpu = simulate(w, cpu)
    busy = on_cpu.phase_s[1:].sum(axis=(1, 2)) - on_cpu.phase_s[1:, :, PHASES.index("wait")].sum(axis=1)
    assert np.allclose(on_cpu.decode_step_s, busy, rtol=1e-9)
    assert on_cpu.phase_s[1:, :, PHASES.index("wait")].sum() == 0
    on_gpu = simulate(w, gpu)
    assert (on_gpu.decode_step_s < on_cpu.decode_step_s).all()  # the GPU overlaps prefetch with compute
    # one memory: InfiniGen's chosen rows are gathered into the slot and its dense layers attend the
    # host rows in place, so nothing is copied in (`full`'s whole copies remain: its memcpy is the point)
    h2d, gather, d2h = (on_cpu.phase_s[1:, :spec.n_layers, PHASES.index(p)] for p in ("h2d", "gather", "d2h"))
    chosen = w.speculating
    assert (h2d == 0).all() and (gather[:, chosen] > 0).all() and (gather[:, ~chosen] == 0).all()
    assert (d2h > 0).all() and (w.bytes_h2d[1:, ~chosen] > 0).all()  # the bytes a link would carry are counted
    full = simulate(synthetic(spec, 4, 512, 4, "full", "float16"), cpu)
    assert (full.phase_s[1:, :spec.n_layers, PHASES.index("h2d")] > 0).all()
    linked = simulate(w, cpu.with_link(5e8, 1e-5, True, "emulated"))
    assert (linked.phase_s[1:, :spec.n_layers, PHASES.index("h2d")] > 0).all()  # over a link they cross it


def test_deterministic():
    spec = named_model("llama-3-8b")
    w = synthetic(spec, 8, 2048, 16, "infinigen", "bfloat16",
                  speculated_fraction=np.linspace(0.05, 0.3, spec.n_layers))
    a, b = simulate(w, load_profile("h100-sxm"), timeline=True), simulate(w, load_profile("h100-sxm"), timeline=True)
    assert np.array_equal(a.step_s, b.step_s) and np.array_equal(a.phase_s, b.phase_s) and a.spans == b.spans


def test_policies_rank_as_expected_on_the_paper_testbed():
    spec, p = named_model("opt-13b"), load_profile("a6000-pcie3")
    ms = {policy: simulate(synthetic(spec, 8, 1920, 8, policy, "float16",
                                     speculated_fraction=0.1 if policy == "infinigen" else None), p).summary()
          ["decode_ms_mean"] for policy in ("resident", "full", "int4", "h2o", "infinigen")}
    assert ms["resident"] < ms["infinigen"] < ms["full"] and ms["int4"] < ms["full"] and ms["h2o"] < ms["full"]


def test_does_not_fit(capsys):
    spec = named_model("llama-3.1-70b")
    w = synthetic(spec, 1, 1024, 8, "resident", "float16")
    problem = memory_plan(w, load_profile("l4")).problem
    assert problem.startswith("device memory: needs") and "weights" in problem
    assert memory_plan(w, load_profile("h200")).problem is not None  # 141 GB of weights on 141 GB
    assert memory_plan(synthetic(named_model("llama-3-8b"), 1, 1024, 8, "full", "float16"),
                       load_profile("l4")).problem is None
    assert main(["simulate", "--model", "llama-3.1-70b", "--profile", "l4", "--policy", "resident",
                 "--prompt-len", "1024", "--gen-len", "8"]) == 1
    assert "does not fit: device memory" in capsys.readouterr().out


def test_infinigen_budget_and_alpha_from_trace(tiny_traces):
    trace = tiny_traces["infinigen"]
    low, high = speculated_fraction_per_layer(trace, 1), speculated_fraction_per_layer(trace, 9)
    speculating = ~np.isnan(low)
    assert speculating.sum() == trace.model.n_layers - 1 and (high[speculating] >= low[speculating]).all()
    spec = named_model("llama-3-8b")
    w = synthetic(spec, 4, 1000, 6, "infinigen", "float16", {"budget": 0.05, "dense_layers": 1},
                  speculated_fraction=1.0)
    assert (w.fetched[:, 1:] == np.ceil(0.05 * (w.kv_len[:, 1:] - 1))).all()  # capped by the budget
    assert (w.fetched[:, 0] == w.kv_len[:, 0] - 1).all()  # the dense first layer fetches everything


@pytest.fixture(scope="module")
def tiny_traces(tmp_path_factory):
    loaded = load_model("smollm2-135m", "float32", "cpu", random_weights=True)
    prompts = [list(range(10, 90)), list(range(200, 260))]
    out = {}
    for name in ("resident", "full", "infinigen", "h2o", "int4"):
        _, out[name] = run_policy(loaded.model, prompts, name, SamplingConfig(5, stop_at_eos=False),
                                  {"model": "smollm2-135m", "weights": "random"}, knobs={"dense_layers": 1})
    return out


def test_replay_moves_the_traced_bytes(tiny_traces, tmp_path):
    p = load_profile("a100-80gb-pcie4")
    for name, trace in tiny_traces.items():
        w = from_trace(trace)
        result = simulate(w, p)
        assert w.n_steps == 4 and len(result.decode_step_s) == 4 and (result.decode_step_s > 0).all()
        decode = trace.layers[trace.layers.step > 0]
        assert w.bytes_h2d.sum() == decode.bytes_h2d.sum()
        moved = result.phase_s[1:, :, PHASES.index("h2d")].sum()
        assert (moved > 0) == (name != "resident")
        if name == "infinigen":
            n = trace.model.n_layers
            assert result.phase_s[1:, 1:n, PHASES.index("spec")].min() > 0  # every speculating layer
            assert result.phase_s[1:, 0, PHASES.index("spec")].max() == 0


def test_replay_cli_with_timeline(tiny_traces, tmp_path, capsys):
    path = write_trace(tiny_traces["infinigen"], tmp_path / "ig.trace.parquet")
    timeline = tmp_path / "timeline.json"
    assert main(["replay", str(path), "--profile", "h100-pcie5", "--timeline", str(timeline), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results[0]["policy"] == "infinigen" and results[0]["decode_steps"] == 4 and results[0]["fits"]
    events = json.loads(timeline.read_text())["traceEvents"]
    names = {e["tid"] for e in events if e["ph"] == "X"}
    assert {0, 1, 2, 3} <= names  # host (gather), compute, speculation, H2D copies all appear
    bad = tmp_path / "bad.trace.parquet"
    bad.write_bytes(path.read_bytes()[:500])
    assert main(["replay", str(bad), "--profile", "h100-pcie5"]) == 1
    assert "not a readable trace" in capsys.readouterr().err


def test_costs_scale_as_rooflines():
    spec = named_model("llama-3-8b")
    c = Costs(load_profile("h100-sxm"), spec, "bfloat16", 1)
    weight_bytes = spec.hidden * spec.ffn_hidden * 2
    assert c.linear(spec.hidden, spec.ffn_hidden) == pytest.approx(
        (weight_bytes + 2 * (spec.hidden + spec.ffn_hidden)) / (3350e9 * 0.8))  # batch 1: bandwidth-bound
    big = Costs(load_profile("h100-sxm"), spec, "bfloat16", 4096)
    assert big.linear(spec.hidden, spec.ffn_hidden) == pytest.approx(
        2 * 4096 * spec.hidden * spec.ffn_hidden / (989e12 * 0.7))  # a big batch: compute-bound
    assert c.attend(2000).seconds > c.attend(1000).seconds


def test_prefill_scales_by_the_calibrated_block_over_its_roofline():
    """A profile whose calibration block took 1.5x / 1.2x its roofline at 64 tokens and 1.2x / 1.1x at
    1024 (plus its launches, which a CPU's host runs): any model's prompt attention and FFN take those
    factors times their own roofline, log-interpolated between, clamped outside; launches unscaled."""
    from infinisim.sim.costs import ATTEND_OPS, FFN_OPS, QKV_OPS
    from infinisim.traces.spec import CALIBRATION_BLOCK

    plain = replace(load_profile("a6000-pcie3"), kind="cpu")
    launch = plain.device.launch_overhead
    block = Costs(plain, CALIBRATION_BLOCK, "float32", 1)
    rows = []
    for tokens, attn_x, ffn_x in ((64, 1.5, 1.2), (1024, 1.2, 1.1)):
        ffn = block.ffn(tokens)
        roof = block.prefill_qkv(tokens).seconds + block.prefill_attend(tokens).seconds
        attn = attn_x * roof + launch * (QKV_OPS["llama"] + ATTEND_OPS["llama"])
        rows.append((tokens, attn, ffn_x * ffn.seconds + launch * ffn.kernels))
    swept = replace(plain, device=replace(plain.device, prefill_block_sweep=tuple(rows)))
    spec = named_model("smollm2-135m")
    c = Costs(swept, spec, "float32", 1)
    assert c.prefill_efficiency(64) == pytest.approx((1.5, 1.2))
    assert c.prefill_efficiency(32) == pytest.approx((1.5, 1.2))
    assert c.prefill_efficiency(4096) == pytest.approx((1.2, 1.1))
    assert c.prefill_efficiency(256) == pytest.approx((np.sqrt(1.5 * 1.2), np.sqrt(1.2 * 1.1)))  # log midpoint
    lanes = c.prefill_efficiency(np.array([64, 1024]))  # the serving simulator's prompts at once
    assert np.allclose(lanes[0], [1.5, 1.2]) and np.allclose(lanes[1], [1.2, 1.1])
    assert Costs(plain, spec, "float32", 1).prefill_efficiency(256) == (1.0, 1.0)  # no sweep: the roofline

    w = synthetic(spec, 1, 256, 2, "resident", "float32")
    before, after = simulate(w, plain).phase_s[0, :spec.n_layers], simulate(w, swept).phase_s[0, :spec.n_layers]
    attn_x, ffn_x = c.prefill_efficiency(256)
    layer_ops = QKV_OPS["llama"] + ATTEND_OPS["llama"] + FFN_OPS["llama"]  # a layer's one op: its launches go first
    for phase, factor, ops in (("attn", attn_x, layer_ops), ("ffn", ffn_x, 0)):
        i = PHASES.index(phase)
        assert np.allclose(after[:, i] - launch * ops, factor * (before[:, i] - launch * ops), rtol=1e-9)


def test_decode_projections_scale_by_the_calibrated_block_decode_over_its_roofline():
    """A profile whose calibration block's decode FFN took 1.3x its matmuls' roofline at 1 row and
    1.1x at 16 (plus its activation and launches): a decode step's projections take those factors
    times their roofline at the batch's rows (log-interpolated, clamped); prompts do not."""
    from infinisim.sim.costs import FFN_OPS
    from infinisim.traces.spec import CALIBRATION_BLOCK, Shard

    for shards in (1, 2):  # calibrate --tp 2 measures rank 0's shard of the block (half its FFN columns)
        s = Shard.of(CALIBRATION_BLOCK, shards, 0).spec(CALIBRATION_BLOCK) if shards > 1 else CALIBRATION_BLOCK
        plain = replace(load_profile("a6000-pcie3"), kind="cpu")
        plain = replace(plain, device=replace(plain.device, block_shards=shards))
        launch, rows = plain.device.launch_overhead, []
        for batch, factor in ((1, 1.3), (16, 1.1)):
            block = Costs(plain, s, "float32", batch)
            matmuls = 3 * block.linear(s.hidden, s.ffn_hidden, batch)
            rows.append((batch, factor * matmuls + launch * FFN_OPS["llama"]
                         + block.elementwise(3.0 * batch * s.ffn_hidden * 4)))
        swept = replace(plain, device=replace(plain.device, decode_block_sweep=tuple(rows)))
        spec = named_model("smollm2-135m")
        for batch, factor in ((1, 1.3), (4, np.sqrt(1.3 * 1.1)), (16, 1.1), (64, 1.1)):
            c, roof = Costs(swept, spec, "float32", batch), Costs(plain, spec, "float32", batch)
            assert c.decode_efficiency == pytest.approx(factor) and roof.decode_efficiency == 1.0
            assert c.ffn().seconds - roof.ffn().seconds == pytest.approx(
                (factor - 1) * 3 * roof.linear(spec.hidden, spec.ffn_hidden))
            assert c.qkv().seconds > roof.qkv().seconds
            assert c.ffn(batch * 256).seconds == roof.ffn(batch * 256).seconds  # a prompt's rows: not a decode step


def test_the_calibrated_host_time_outside_a_decode_layers_phases_is_charged_once_a_layer():
    """A profile whose block decode spent H a layer outside its phases charges every decode layer
    H less the resident policy's own counted launches, once a layer whatever the batch or policy
    (the layer's Python), on top of each policy's counted ops; none measured (or less than the
    launches): nothing extra."""
    from infinisim.sim.costs import RESIDENT_HOST_OPS

    plain = replace(load_profile("a6000-pcie3"), kind="cpu")
    launch, spec = plain.device.launch_overhead, named_model("smollm2-135m")
    measured = replace(plain, device=replace(plain.device, decode_layer_host=60e-6))
    below = replace(plain, device=replace(plain.device, decode_layer_host=RESIDENT_HOST_OPS * launch / 2))
    extra = 60e-6 - RESIDENT_HOST_OPS * launch
    for batch, apart in ((1, False), (8, False), (8, True)):
        for ops in (RESIDENT_HOST_OPS, 14):
            base = Costs(plain, spec, "float32", batch, apart=apart).bookkeeping(ops)
            with_host = Costs(measured, spec, "float32", batch, apart=apart).bookkeeping(ops)
            assert with_host.kernels == base.kernels and with_host.seconds == pytest.approx(base.seconds + extra)
            assert Costs(below, spec, "float32", batch, apart=apart).bookkeeping(ops) == base
    for policy in ("resident", "full"):  # a whole step: the bookkeeping phase grows by layers x extra
        w = synthetic(spec, 1, 64, 4, policy, "float32")
        phase = PHASES.index("bookkeeping")
        steps = [simulate(w, p, memory=memory_plan(w, p)).phase_s[2, :, phase].sum() for p in (plain, measured)]
        assert steps[1] - steps[0] == pytest.approx(spec.n_layers * extra)


def test_a_vocabulary_wide_projection_streams_at_the_wide_sweeps_rate():
    """With a wide sweep (a 1024 x 32768 weight: 20 GB/s at 1 row, 5 at 8, 10 at 16), a weight of the
    grid's aspect (k x 2k) streams at the grid's rate, one of the wide aspect or wider (the LM head) at
    the wide sweep's at its rows (log-interpolated in rows), and between the two log-linearly in n / k."""
    from infinisim.hwprofiles.profile import WIDE_PROJECTION

    grid = tuple((m, k, bw) for m, bw in ((1, 30e9), (16, 12e9)) for k in (512.0, 4096.0))
    wide = ((1.0, 20e9), (8.0, 5e9), (16.0, 10e9))
    plain = replace(load_profile("a6000-pcie3"), kind="cpu")
    plain = replace(plain, device=replace(plain.device, stream_sweep=grid))
    swept = replace(plain, device=replace(plain.device, wide_stream_sweep=wide))
    c, roof = Costs(swept, named_model("smollm2-135m"), "float32", 1), Costs(plain, named_model("smollm2-135m"),
                                                                            "float32", 1)
    assert WIDE_PROJECTION[1] / WIDE_PROJECTION[0] == 32
    for m, at_rows in ((1, 20e9), (8, 5e9), (4, 20e9 * (5e9 / 20e9) ** (2 / 3)), (12, 7.5e9)):
        assert c.weight_stream_bw(m, 1024, 2048) == roof.weight_stream_bw(m, 1024) == c.weight_stream_bw(m, 1024)
        assert c.weight_stream_bw(m, 576, 576 * 32) == pytest.approx(at_rows)
        assert c.weight_stream_bw(m, 576, 49152) == pytest.approx(at_rows)  # wider: clamped at the sweep's
        base = roof.weight_stream_bw(m, 1024)
        assert c.weight_stream_bw(m, 1024, 8192) == pytest.approx(np.sqrt(base * at_rows))  # aspect 8: log midpoint
        assert roof.weight_stream_bw(m, 576, 49152) == roof.weight_stream_bw(m, 576)  # no wide sweep: the grid's
    spec = named_model("smollm2-135m")
    weight = spec.hidden * spec.vocab_size * 4
    assert c.head().seconds == pytest.approx((weight + 4 * (spec.hidden + spec.vocab_size)) / 20e9)


@pytest.mark.slow
def test_validate_runs_calibrates_replays_and_plots(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["validate", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "48", "--gen-len", "4",
                 "--batch", "2", "--policy", "resident,full,infinigen", "--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "infinigen" in table and "decode time ratio" in table
    report = json.loads((out / "validation.json").read_text())
    assert [c["policy"] for c in report["comparisons"]] == ["resident", "full", "infinigen"]
    for c in report["comparisons"]:
        assert c["decode_steps"] == 3 and 0 <= c["step"]["mape"] < 1e4 and c["decode_ms_predicted"] > 0
        assert len(c["per_step_ms"]["measured"]) == 3 and "attn" in c["phases"]
    assert report["relative"][0]["measured"] == 1.0
    assert load_profile(out / "profile.yaml").kind == "cpu"
    from PIL import Image

    with Image.open(out / "validation.png") as image:
        image.verify()
    traces = sorted(str(p) for p in out.glob("*.trace.parquet"))
    assert len(traces) == 3
    assert main(["validate", "--trace", *traces, "--profile", "a6000-pcie3", "--out", str(tmp_path / "w")]) == 0
