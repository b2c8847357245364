"""The serving simulator: request streams (files and synthetic), continuous batching against the
static simulation it is built on, admission, memory limits, preemption, determinism, SLOs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.profile import load_profile
from infinisim.sim.engine import simulate
from infinisim.sim.iterations import IterationCosts
from infinisim.sim.latency import SLO, latencies, parse_slo, summarize_serving
from infinisim.sim.server import Scheduler
from infinisim.sim.serving import simulate_serving
from infinisim.sim.workload import synthetic
from infinisim.traces.requests import Request, RequestStream, read_requests, scaled, synthetic_stream, to_rate
from infinisim.traces.spec import named_model


def stream_of(*requests: tuple[float, int, int]) -> RequestStream:
    return RequestStream(tuple(Request(i, t, p, g) for i, (t, p, g) in enumerate(requests)), "test")


@pytest.mark.parametrize(("policy", "share", "profile"), [("infinigen", 0.1, "a6000-pcie3"), ("full", None, "l4"),
                                                          ("resident", None, "h100-sxm"), ("h2o", None, "a6000-pcie3")])
def test_one_request_alone_is_the_static_prediction(policy, share, profile):
    spec, prof = named_model("opt-6.7b"), load_profile(profile)
    prompt, gen = 700, 40
    static = simulate(synthetic(spec, 1, prompt, gen, policy, "float16", None, share), prof)
    result = simulate_serving(stream_of((3.0, prompt, gen)), IterationCosts(spec, prof, policy, "float16", None, share))
    r = result.requests
    assert r["first_token_s"][0] - 3.0 == pytest.approx(static.step_s[0], rel=1e-9)  # TTFT: the prefill
    assert r["finished_s"][0] - r["first_token_s"][0] == pytest.approx(static.decode_step_s.sum(), rel=1e-9)
    assert latencies(result)["tpot_s"][0] == pytest.approx(static.decode_step_s.mean(), rel=1e-9)


def costs(policy: str = "resident", share: float | None = None, device_gb: float | None = None) -> IterationCosts:
    prof = load_profile("a100-80gb-pcie4")
    if device_gb is not None:
        prof = replace(prof, device=replace(prof.device, memory=device_gb * 1e9))
    return IterationCosts(named_model("llama-3-8b"), prof, policy, "float16", None, share)


def test_requests_are_admitted_in_arrival_order():
    stream = synthetic_stream(40.0, 80, seed=3, prompt_len=1500, gen_len=30)  # more than one iteration admits
    r = simulate_serving(stream, costs(), Scheduler(max_seqs=8, max_batched_tokens=3000)).requests
    order = np.argsort(r["arrival_s"], kind="stable")
    assert (np.diff(r["admitted_s"][order]) >= 0).all()
    assert (r["admitted_s"] >= r["arrival_s"]).all() and np.isfinite(r["finished_s"]).all()
    assert (np.diff(r["admitted_s"][order]) > 0).any()  # the queue really held requests back


def _room_for(c: IterationCosts, sequences: int, prompt: int, gen: int) -> float:
    """A device memory (GB) where `sequences` sequences of prompt + gen rows fit, and no more."""
    m = c.memory(8192, 256)
    one = m.device.of(prompt, prompt + gen)
    return (m.device_fixed + sequences * one + 0.5 * one) / 1e9


def test_a_memory_that_fits_two_sequences_never_runs_three():
    base = costs()
    gb = _room_for(base, 2, 1000, 100)
    stream = stream_of(*[(0.01 * i, 1000, 100) for i in range(6)])
    result = simulate_serving(stream, costs(device_gb=gb))
    assert result.series["batch"].max() == 2 and result.preemptions == 0
    assert np.isfinite(result.requests["finished_s"]).all()


def test_preemption_is_counted_and_the_preempted_request_completes():
    base = costs()
    gb = _room_for(base, 1, 1000, 400)  # two prompts fit, but not both grown by 400 tokens
    gb = max(gb, (base.memory(8192, 256).device_fixed + 2 * base.memory(8192, 256).device.of(1000, 1001)) / 1e9 + 1e-3)
    result = simulate_serving(stream_of((0.0, 1000, 400), (0.0, 1000, 400)), costs(device_gb=gb))
    r = result.requests
    assert result.preemptions >= 1 and r["preemptions"].sum() == result.preemptions
    assert np.isfinite(r["finished_s"]).all() and result.rejected == 0
    assert result.series["batch"].max() == 2  # both ran together before one was preempted


def test_a_request_that_never_fits_is_rejected_not_waited_for():
    base = costs()
    gb = _room_for(base, 1, 500, 10)
    result = simulate_serving(stream_of((0.0, 500, 10), (0.5, 6000, 10), (1.0, 500, 10), (1.5, 20000, 10)),
                              costs(device_gb=gb))
    assert result.rejected == 1 and np.isnan(result.requests["finished_s"][1])  # beyond the KV memory
    assert result.too_long == 1 and result.requests["too_long"].tolist() == [False, False, False, True]  # > 8192
    assert np.isfinite(result.requests["finished_s"][[0, 2]]).all()
    assert summarize_serving(result)["completed"] == 2


def test_same_seed_same_result_and_chunked_prefill():
    lengths = stream_of((0.0, 3000, 50), (0.0, 200, 300))
    a = synthetic_stream(6.0, 60, seed=7, lengths=lengths)
    b = synthetic_stream(6.0, 60, seed=7, lengths=lengths)
    assert a == b and a != synthetic_stream(6.0, 60, seed=8, lengths=lengths)
    whole = simulate_serving(a, costs("infinigen", 0.1))
    again = simulate_serving(b, costs("infinigen", 0.1))
    assert all(np.array_equal(whole.requests[k], again.requests[k], equal_nan=True) for k in whole.requests)
    chunked = simulate_serving(a, costs("infinigen", 0.1), Scheduler(max_batched_tokens=512, prefill="chunked"))
    assert np.isfinite(chunked.requests["finished_s"]).all()
    assert chunked.series["prefill_tokens"].max() <= 512  # no iteration takes more than the token budget
    assert (chunked.series["batch"][chunked.series["prefill_tokens"] > 0] > 0).any()  # decodes ride along


def test_gamma_arrivals_keep_the_rate_and_rate_scaling():
    s = synthetic_stream(5.0, 4000, seed=1, arrival="gamma", cv=3.0)
    assert s.rate == pytest.approx(5.0, rel=0.1)
    gaps = np.diff(s.arrays()[0])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.2)
    assert to_rate(s, 10.0).rate == pytest.approx(10.0, rel=1e-9)
    windowed = scaled(s, 2.0, window=(100.0, 50.0))
    assert windowed.requests[0].arrival_s == 0 and windowed.duration_s <= 25.0


def test_slo_and_latency_table():
    assert parse_slo("ttft=2s,tpot=100ms,p=99") == SLO(2.0, 0.1, 99.0)
    assert parse_slo("tpot=50ms") == SLO(2.0, 0.05, 99.0)
    for bad in ("ttft=fast", "x=1", "p=101", "ttft=-1s", "tpot="):
        with pytest.raises(InfinisimError, match="--slo"):
            parse_slo(bad)
    summary = summarize_serving(simulate_serving(synthetic_stream(2.0, 30, seed=2, prompt_len=512, gen_len=20),
                                                 costs()), SLO(2.0, 0.1))
    assert summary["completed"] == 30 and summary["meets_slo"]
    assert summary["ttft_p50_s"] <= summary["ttft_p90_s"] <= summary["ttft_p99_s"]
    assert summary["goodput_rps"] <= summary["throughput_rps"]


@pytest.mark.parametrize(("text", "where"), [
    ("", "empty file"),
    ("TIMESTAMP,ContextTokens\n1,2\n", "GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,-3,5\n", "line 3: ContextTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10,5\n1,10,2.5\n", "line 3: GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,10,5\n", "line 2: TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n5,10,5\n4,10,5\n", "line 3: TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n0,10\n", "line 2"),
])
def test_malformed_request_traces_name_file_line_and_field(tmp_path, text, where):
    path = tmp_path / "requests.csv"
    path.write_text(text)
    with pytest.raises(InfinisimError, match=where) as info:
        read_requests(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_azure_trace_reads(azure_conv):
    stream = read_requests(azure_conv)
    assert len(stream) > 19000 and stream.requests[0].arrival_s == 0
    assert 5.0 < stream.rate < 6.0  # about 5.5 requests per second over an hour


def test_a_hopeless_stream_stops_early_with_the_same_verdict():
    stream = synthetic_stream(50.0, 400, seed=4, prompt_len=1024, gen_len=100)  # far beyond one L4
    c = IterationCosts(named_model("llama-3-8b"), load_profile("l4"), "resident", "float16")
    slo = SLO(2.0, 0.1)
    whole = simulate_serving(stream, c)
    early = simulate_serving(stream, c, stop_at=slo)
    assert early.stopped and not whole.stopped
    assert not summarize_serving(whole, slo)["meets_slo"]
    assert len(early.series["batch"]) < len(whole.series["batch"]) / 2  # it gave up well before the end
    fine = synthetic_stream(0.2, 40, seed=4, prompt_len=256, gen_len=20)
    assert not simulate_serving(fine, c, stop_at=slo).stopped and summarize_serving(simulate_serving(fine, c), slo)[
        "meets_slo"]


@pytest.mark.parametrize("policy", ["resident", "infinigen", "h2o"])
def test_decode_runs_at_once_equal_one_step_at_a_time(policy):
    stream = synthetic_stream(3.0, 60, seed=5, lengths=stream_of((0.0, 900, 60), (0.0, 300, 150), (0.0, 2000, 20)))
    share = 0.1 if policy == "infinigen" else None
    c = costs(policy, share, device_gb=_room_for(costs(policy, share), 3, 900, 100))  # tight: preemptions happen
    fast, slow = simulate_serving(stream, c), simulate_serving(stream, c, fast_forward=False)
    assert fast.preemptions == slow.preemptions > 0
    for key in fast.requests:
        np.testing.assert_allclose(fast.requests[key], slow.requests[key], rtol=1e-12, atol=1e-9)
    for key in fast.series:
        np.testing.assert_allclose(fast.series[key], slow.series[key], rtol=1e-9, atol=1e-9)


def test_capacity_search_serial_processes_and_dask_agree_and_resume(tmp_path):
    from infinisim.analysis.planner import make_capacity
    from infinisim.analysis.serving import StreamSpec, capacity_configs
    from infinisim.analysis.sweep import Sweep

    sweep = Sweep(["a6000-pcie3", "l4"], ["opt-6.7b"], [1], [1], [1], ["resident", "infinigen"],
                  speculated_fraction=0.1)
    stream = StreamSpec(rate=1.0, count=40, prompt_len=300, gen_len=30, seed=3)
    configs = capacity_configs(sweep, stream, SLO(2.0, 0.1), Scheduler())
    serial, _ = make_capacity(configs, tmp_path / "serial", serial=True)
    local, _ = make_capacity(configs, tmp_path / "local", workers=2)
    dask, _ = make_capacity(configs, tmp_path / "dask", scheduler="local")
    assert serial["fits"].all() and (serial["max_rate"] > 0).all()
    assert serial["max_rate"].tolist() == local["max_rate"].tolist() == dask["max_rate"].tolist()
    cache = (tmp_path / "serial" / "capacity-cache.jsonl").read_text().splitlines()
    (tmp_path / "serial" / "capacity-cache.jsonl").write_text("\n".join(cache[:2]) + "\n" + cache[2][:30])  # cut
    calls = []
    resumed, _ = make_capacity(configs, tmp_path / "serial", serial=True,
                               progress=lambda done, total: calls.append(done))
    assert resumed["max_rate"].tolist() == serial["max_rate"].tolist()
    assert calls == [3, 4]  # two from the cache, the cut one and the last searched again


def test_weights_streamed_from_the_host_serve_as_the_static_prediction_and_free_the_device():
    """A share of the weights on the host: one request alone takes the static (event) simulation's
    prefill and decode time; the device keeps the rest of the weights and two block buffers, the
    host the streamed share."""
    spec, prof = named_model("opt-6.7b"), load_profile("a6000-pcie3")
    prompt, gen = 300, 12
    static = simulate(synthetic(spec, 1, prompt, gen, "full", "float16", weights_on_host=0.4), prof)
    streamed = IterationCosts(spec, prof, "full", "float16", weights_on_host=0.4)
    result = simulate_serving(stream_of((1.0, prompt, gen)), streamed)
    r = result.requests
    assert r["first_token_s"][0] - 1.0 == pytest.approx(static.step_s[0], rel=1e-9)
    assert r["finished_s"][0] - r["first_token_s"][0] == pytest.approx(static.decode_step_s.sum(), rel=0.01)
    resident, offloaded = IterationCosts(spec, prof, "full", "float16").memory(2048, 8), streamed.memory(2048, 8)
    block = spec.layer_weight_bytes("float16")
    assert resident.device_fixed - offloaded.device_fixed == pytest.approx(0.4 * block * (spec.n_layers - 2))
    assert resident.host_capacity - offloaded.host_capacity == pytest.approx(0.4 * block * spec.n_layers)
