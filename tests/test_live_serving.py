"""The live server: continuous batching in the executor, its serving trace, and the comparison with
the serving simulator."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.link import EmulatedLink
from infinisim.executor.policies import make_policy
from infinisim.executor.serving import LiveBatch
from infinisim.executor.weights import materialize
from infinisim.hwprofiles.emulated import parse_link
from infinisim.sim.iterations import MemoryBudget, SequenceMemory
from infinisim.sim.server import Scheduler
from infinisim.traces.requests import Request, RequestStream, scaled
from infinisim.traces.spec import named_model
from infinisim.traces.trace import METADATA_KEY, read_trace, write_trace

POLICIES = [("resident", {}, None), ("full", {}, None), ("int4", {}, None), ("h2o", {}, None),
            ("infinigen", {}, None), ("infinigen", {"budget": 0.2}, None), ("oracle", {"budget": 0.2}, None),
            ("full", {}, "2GB/s"), ("infinigen", {"budget": 0.2}, "2GB/s")]  # the last two over an emulated link


def _alone(model, prompt, n, name, knobs):
    return generate(model, [prompt], make_policy(name, **knobs), SamplingConfig(n, stop_at_eos=False)).new_tokens[0]


@pytest.mark.parametrize("family", ["smollm2-135m", "opt-125m"])
def test_each_request_decodes_as_it_would_alone(family):
    """Sequences join a running batch at different times, leave it when done, and a later one takes a
    freed place: each one's greedy tokens are those it decodes alone, under every policy."""
    spec = replace(named_model(family), n_layers=5)
    model = materialize(spec, None, "float32", torch.device("cpu"), "random")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in (40, 17, 63, 25)]
    lengths = [12, 5, 9, 7]
    for name, knobs, link in POLICIES:
        batch = LiveBatch(model, name, knobs, EmulatedLink(parse_link(link)) if link else None)
        out = {}
        joins = {0: [0, 1], 2: [2], 4: [3]}  # iteration -> sequences prefilled before its decode step
        for iteration in range(40):
            for k in joins.get(iteration, []):
                out[k] = [batch.prefill(k, prompts[k], len(prompts[k]) + lengths[k])[0]]
            for k in [k for k in batch.running if len(out[k]) >= lengths[k]]:
                batch.release(k)
            keys = list(batch.running)
            if keys:
                tokens, times = batch.decode(keys)
                assert times.wall_s > 0
                for k, t in zip(keys, tokens, strict=True):
                    out[k].append(t)
        assert sorted(out) == [0, 1, 2, 3]
        for k in range(4):
            assert out[k] == _alone(model, prompts[k], lengths[k], name, knobs), (family, name, knobs, link, k)


def _stream(lengths, gap=0.0):
    return RequestStream(tuple(Request(i, i * gap, p, g) for i, (p, g) in enumerate(lengths)), "test")


@pytest.fixture(scope="module")
def session():
    from infinisim.executor.session import Session

    return Session("smollm2-135m", random_weights=True)


def test_preempted_request_completes_with_its_own_tokens(session):
    """KV memory for 50 rows: the second of two sequences is preempted as the first grows, recomputed
    from its prompt and generated tokens when readmitted, and still decodes what it would alone; a
    memory limit that fits two sequences never runs three."""
    from infinisim.analysis.live_serving import prompt_tokens, serve_live
    from infinisim.executor.prompts import bundled_text

    stream = _stream([(20, 12), (20, 12), (20, 12)])
    row = 1.0
    memory = MemoryBudget(0.0, 1e12, 50 * row, True, SequenceMemory(0, 0, 0), SequenceMemory(0, 0, row))
    served = serve_live(session, "resident", stream, Scheduler(max_seqs=8), memory=memory)
    r = served.result
    assert r.preemptions >= 1
    assert int(r.requests["preemptions"].sum()) == r.preemptions
    assert (r.requests["finished_s"] > 0).all()
    assert r.series["batch"].max() <= 2
    pool = [t % session.spec.vocab_size for t in session.tokenizer.encode(bundled_text()).ids]
    for req in stream.requests:
        assert served.outputs[req.id] == _alone(session.loaded.model, prompt_tokens(pool, req), req.gen_len,
                                                "resident", {})


def test_serving_trace_round_trip_and_old_traces_read(session, tmp_path):
    from infinisim.analysis.live_serving import measured_result, serve_live
    from infinisim.traces import trace as trace_module

    stream = _stream([(30, 4), (12, 6)], gap=0.05)
    served = serve_live(session, "infinigen", stream, Scheduler(max_seqs=4), command="test")
    path = write_trace(served.trace, tmp_path / "s.trace.parquet")
    back = read_trace(path)
    assert back.serving["scheduler"]["max_seqs"] == 4
    assert list(back.steps["phase"]).count("prefill") == 2
    assert set(back.steps["batch"]) <= {1, 2}
    measured = measured_result(back)
    assert [r.arrival_s for r in measured.stream.requests] == [0.0, 0.05]
    first = measured.requests["first_token_s"]
    assert (first >= measured.requests["arrival_s"]).all() and (measured.requests["finished_s"] > first).all()
    assert back.run["new_tokens"] == [4, 6]

    # a replay of one batch is not what a serving trace holds: one line
    from infinisim.sim.workload import from_trace

    with pytest.raises(InfinisimError, match="validate --requests"):
        from_trace(back)

    # version 1 (before serving traces) still reads; a serving trace without its requests does not
    table = pq.read_table(path)
    header = json.loads(table.schema.metadata[METADATA_KEY])
    header.pop("content_hash")
    header["run"].pop("serving")
    header["version"] = 1
    header["steps"] = [{k: v for k, v in s.items() if k not in trace_module.SERVING_STEP_FIELDS}
                       for s in header["steps"]]
    header["content_hash"] = trace_module._content_hash({k: v for k, v in header.items()}, table)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(header).encode()}), tmp_path / "v1.parquet")
    old = read_trace(tmp_path / "v1.parquet")
    assert old.serving is None and "batch" not in old.steps
    header = json.loads(table.schema.metadata[METADATA_KEY])
    del header["run"]["serving"]["requests"]
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(header).encode()}), tmp_path / "bad.parquet")
    with pytest.raises(InfinisimError, match=r"bad\.parquet: header\.run\.serving\.requests: missing field"):
        read_trace(tmp_path / "bad.parquet")


def test_lengths_scale_keeps_the_shape():
    stream = _stream([(100, 10), (7, 1), (2000, 300)])
    small = scaled(stream, 2.0, length_scale=0.25)
    assert [(r.prompt_len, r.gen_len) for r in small.requests] == [(25, 2), (2, 1), (500, 75)]
    assert "lengths x0.25" in small.source
    with pytest.raises(InfinisimError, match="--length-scale"):
        scaled(stream, length_scale=0.0)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "infinisim.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.slow
def test_run_and_validate_requests_end_to_end(azure_conv, tmp_path):
    """`run --requests` serves the trace live and writes serving traces; `validate --trace` on them
    serves the same requests in the simulator and compares; a live server refuses what it cannot do."""
    common = ["--requests", str(azure_conv), "--max-requests", "4", "--length-scale", "0.03", "--random-weights",
              "--max-seqs", "2"]
    run = _cli("run", *common, "--policy", "resident,full", "--out", str(tmp_path / "runs"), "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["rows"]
    assert [r["policy"] for r in rows] == ["resident", "full"] and all(r["completed"] == 4 for r in rows)
    assert "Azure" in json.loads(run.stdout)["attribution"]
    traces = sorted(str(p) for p in (tmp_path / "runs").glob("*-serve4-*.trace.parquet"))
    assert len(traces) == 2
    val = _cli("validate", "--trace", *traces, "--quick", "--out", str(tmp_path / "val"), cwd=tmp_path)
    assert val.returncode == 0, val.stderr
    data = json.loads((tmp_path / "val" / "serving_validation.json").read_text())
    assert sorted(c["policy"] for c in data["comparisons"]) == ["full", "resident"]
    for c in data["comparisons"]:
        assert c["completed"] == {"measured": 4, "predicted": 4}
        assert c["aggregate"]["ttft_p50_s"]["measured"] > 0 and c["aggregate"]["ttft_p50_s"]["predicted"] > 0
    assert (tmp_path / "val" / "serving_validation.png").stat().st_size > 1000
    assert "measured" in val.stdout and "predicted" in val.stdout

    for extra, field in ((["--prefill", "chunked"], "--prefill"), (["--tp", "2"], "--tp"),
                         (["--temperature", "0.7"], "--temperature")):
        bad = _cli("run", *common, *extra, "--out", str(tmp_path / "x"), cwd=tmp_path)
        assert bad.returncode == 1 and f"{field}:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------- the simulator's model of the live server


def test_sequences_apart_cost_batch_times_one_sequence():
    """A live server's decode step: the attention side of a batch of b sequences apart costs b times one
    sequence's (its fixed costs and its own launches), the projections, FFN and the rest of the
    launches stay batched; at batch 1 apart adds only the server's own ops."""
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.costs import APART_ATTEND_OPS, ATTEND_OPS, SEQUENCE_OPS, Costs
    from infinisim.sim.iterations import IterationCosts

    profile, spec = load_profile("l4"), named_model("llama-3-8b")
    batched, apart, one = (Costs(profile, spec, "float16", b, a) for b, a in ((8, False), (8, True), (1, False)))
    assert apart.speculation(1000, 0.3) == pytest.approx(tuple(8 * v for v in one.speculation(1000, 0.3)))
    assert apart.speculation(1000, 0.3).seconds > batched.speculation(1000, 0.3).seconds
    assert apart.copy(8e6, "h2d", 2).kernels == 8 * batched.copy(8e6, "h2d", 2).kernels
    assert apart.copy(8e6, "h2d", 2).seconds == pytest.approx(8 * one.copy(1e6, "h2d", 2).seconds)
    # each sequence issues its own mask and attention (APART_ATTEND_OPS), the rest stays batched, and the
    # server hands each sequence its rows (SEQUENCE_OPS a layer): as benchmarks/count_ops.py --live counts
    assert apart.attend(1000).kernels == ATTEND_OPS["llama"] + 7 * APART_ATTEND_OPS
    assert apart.bookkeeping(3).kernels == 8 * (3 + SEQUENCE_OPS) and batched.bookkeeping(3).kernels == 3
    assert apart.attend(1000).seconds == pytest.approx(batched.attend(1000).seconds)  # the same bytes, wo batched
    assert apart.ffn() == batched.ffn() and apart.qkv() == batched.qkv()
    for name in ("resident", "full"):
        live, served = (IterationCosts(spec, profile, name, sequences_apart=a) for a in (True, False))
        assert live.decode(1, 900) >= served.decode(1, 900)  # the server's own ops, if the host binds
        assert live.decode(8, 900) > served.decode(8, 900)

    # with a measured rate for a weight in cache, sequences after the first read the model's W_q from it
    warm_bw = 4 * profile.device.memory_bandwidth
    cached = replace(profile, device=replace(profile.device, cached_stream_sweep=((1e6, warm_bw), (1e9, warm_bw))))
    apart_c, one_c = Costs(cached, spec, "float16", 8, True), Costs(cached, spec, "float16", 1)
    w_q = spec.hidden * spec.n_heads * spec.head_dim * 2
    saved = one_c.linear(spec.hidden, spec.n_heads * spec.head_dim) - w_q / warm_bw
    assert saved > 0
    assert apart_c.speculation(1000, 0.3).seconds == pytest.approx(8 * one_c.speculation(1000, 0.3).seconds - 7 * saved)


def test_skew_build_has_a_fixed_part_per_kv_head():
    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.costs import Costs

    profile = load_profile("l4")
    device = replace(profile.device, skew_per_row=1e-6, skew_per_head=5e-4)
    spec = named_model("llama-3-8b")
    costs = Costs(replace(profile, device=device), spec, "float16", 1)
    rows = 100 * spec.n_heads // spec.n_kv_heads
    assert costs.skew_build(100).seconds == pytest.approx(spec.n_kv_heads * (rows * 1e-6 + 5e-4))


def test_live_batch_with_weights_streamed_decodes_as_alone():
    """Half of every block's weights streamed from host memory: the live batch still decodes each
    request as it decodes alone with its weights resident."""
    from infinisim.executor.weight_stream import WeightStream

    spec = replace(named_model("smollm2-135m"), n_layers=4)
    resident = materialize(spec, None, "float32", torch.device("cpu"), "random")
    streamed = materialize(spec, None, "float32", torch.device("cpu"), "random")
    streamed.load_state_dict(resident.state_dict())
    WeightStream(streamed, 0.5, torch.device("cpu"), None)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in (30, 11)]
    batch = LiveBatch(streamed, "resident")
    out = {k: [batch.prefill(k, p, len(p) + 6)[0]] for k, p in enumerate(prompts)}
    for _ in range(5):
        tokens, _ = batch.decode([0, 1])
        for k, t in zip([0, 1], tokens, strict=True):
            out[k].append(t)
    for k, p in enumerate(prompts):
        assert out[k] == _alone(resident, p, 6, "resident", {})


def test_simulator_and_analysis_import_without_torch():
    """The layers above the executor load it only when they run it: every module of sim/ and
    analysis/ (the live server's and its comparison's included) imports with torch unavailable."""
    code = ("import sys, importlib, pkgutil; sys.modules['torch'] = None\n"
            "import infinisim.sim as s, infinisim.analysis as a\n"
            "for p in (s, a):\n"
            "    for m in pkgutil.iter_modules(p.__path__): importlib.import_module(p.__name__ + '.' + m.name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
