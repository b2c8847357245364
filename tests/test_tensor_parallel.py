"""Tensor parallelism in the executor (executor/parallel.py): two gloo ranks give one process's logits,
for SmolLM2's geometry (three KV heads: an uneven split) and a random OPT; the shard arithmetic; the
all-reduce timed as comm; `run --tp 2` writes one trace per rank and replays."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_cli import infinisim

from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.parallel import launch
from infinisim.executor.recording import run_policy
from infinisim.hwprofiles.profile import load_profile, write_profile
from infinisim.traces.spec import Shard, named_model, split

PROMPTS = [list(range(10, 70)), list(range(300, 340))]


def small(model: str):
    from infinisim.executor.weights import materialize

    layers = 5 if model == "smollm2-135m" else 4
    return materialize(replace(named_model(model), n_layers=layers), None, "float32", torch.device("cpu"), "random")


def decode(model, policy: str) -> tuple[list, list, object]:
    knobs = {"dense_layers": 1, "budget": 1.0, "alpha": 1000.0} if policy == "infinigen" else None
    gen, trace = run_policy(model, PROMPTS, policy, SamplingConfig(4, stop_at_eos=False), {"model": "x"},
                            knobs=knobs, measure=Measurement(keep_logits=True))
    return [t.clone() for t in gen.logits], gen.new_tokens, trace


CASES = (("smollm2-135m", "resident"), ("smollm2-135m", "infinigen"), ("opt-125m", "full"))


def rank_logits(rank: int, tp: int) -> list[dict]:
    """One rank, every case: the model (the same random weights in every process), its shard, a decode."""
    import torch.distributed as dist

    from infinisim.executor.parallel import shard_model

    out = []
    for model_name, policy in CASES:
        whole = small(model_name)
        model = shard_model(whole, Shard.of(whole.spec, tp, rank), dist.group.WORLD)
        logits, tokens, trace = decode(model, policy)
        comm = float(trace.layers[trace.layers.step > 0].comm_s.sum())
        out.append({"logits": logits, "tokens": tokens, "comm_s": comm, "kv_heads": model.spec.n_kv_heads})
    return out


def test_split_and_shard_arithmetic():
    assert [split(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert [split(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    spec = named_model("smollm2-135m")
    shards = [Shard.of(spec, 2, r) for r in range(2)]
    assert [s.heads for s in shards] == [(0, 6), (6, 9)] and [s.kv_heads for s in shards] == [(0, 2), (2, 3)]
    assert sum(s.spec(spec).ffn_hidden for s in shards) == spec.ffn_hidden
    assert sum(s.spec(spec).vocab_size for s in shards) == spec.vocab_size
    from infinisim.core.errors import InfinisimError

    with pytest.raises(InfinisimError, match="at most that many ranks"):
        Shard.of(spec, 4, 0)


def test_two_gloo_ranks_give_one_process_logits():
    """Every step's logits on every rank within 1e-5 (float32) of the single-process model, the same
    tokens, for SmolLM2's geometry (resident; infinigen at a 100% budget) and a random OPT (full); each
    rank holds its share of the KV heads and times its all-reduces as comm. (One launch for the three.)"""
    ranks = launch(2, rank_logits)
    for case, (model_name, policy) in enumerate(CASES):
        want, want_tokens, _ = decode(small(model_name), policy)
        spec = named_model(model_name)
        shares = [Shard.of(spec, 2, i).kv_heads for i in range(2)]
        assert [r[case]["kv_heads"] for r in ranks] == [end - start for start, end in shares]
        for r in ranks:
            assert r[case]["tokens"] == want_tokens, (model_name, policy)
            assert r[case]["comm_s"] > 0
            for a, b in zip(r[case]["logits"], want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def failing_rank(rank: int, tp: int) -> None:
    if rank == 1:
        raise ValueError("broken on purpose")


def test_an_error_in_a_rank_is_one_line():
    from infinisim.core.errors import InfinisimError

    with pytest.raises(InfinisimError, match="rank 1: ValueError: broken on purpose"):
        launch(2, failing_rank)
    if torch.cuda.device_count() < 2:  # more ranks than GPUs: refused before any process starts
        with pytest.raises(InfinisimError, match="2 ranks on CUDA need 2 GPUs"):
            launch(2, failing_rank, device="cuda")


def test_run_tp2_writes_a_trace_per_rank_and_replays(tmp_path):
    proc = infinisim("run", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "32", "--gen-len", "3",
                     "--batch", "2", "--ignore-eos", "--tp", "2", "--policy", "resident,full", "--out", str(tmp_path),
                     "--json")
    assert proc.returncode == 0, proc.stderr
    summaries = json.loads(proc.stdout)["summaries"]
    assert [s["policy"] for s in summaries] == ["resident", "full"]
    from infinisim.sim.workload import from_trace
    from infinisim.traces.trace import read_trace

    for s in summaries:
        assert s["tp"] == 2 and len(s["traces"]) == 2 and all(c > 0 for c in s["decode_comm_ms_per_rank"])
        for rank, path in enumerate(s["traces"]):
            trace = read_trace(path)
            assert f"-tp2r{rank}-" in path and trace.run["tp"]["rank"] == rank
            w = from_trace(trace)
            assert w.tp == 2 and w.spec.n_kv_heads == (2, 1)[rank]
    # full's: both ranks replay together, one alone replays alone. On a link this slow the KV copies bind
    # (on the shipped one both ranks are bound by the same host launches and take the same time)
    shipped = load_profile("2x-rtx4090")
    slow_link = replace(shipped.link, h2d_bandwidth=5e7, d2h_bandwidth=5e7)
    write_profile(replace(shipped, link=slow_link), tmp_path / "slow.yaml")
    ranks = summaries[1]["traces"]
    both = infinisim("replay", *ranks, "--profile", str(tmp_path / "slow.yaml"), "--json")
    alone = infinisim("replay", ranks[1], "--profile", str(tmp_path / "slow.yaml"), "--json")
    assert both.returncode == 0 and alone.returncode == 0, both.stderr + alone.stderr
    rows, row = json.loads(both.stdout), json.loads(alone.stdout)[0]
    assert [r["lockstep"] for r in rows] == [True, True] and not row["lockstep"]
    assert rows[0]["decode_step_ms"] == rows[1]["decode_step_ms"]
    assert rows[1]["decode_ms_mean"] > 1.5 * row["decode_ms_mean"]  # rank 1 (one KV head) waits for rank 0
    assert infinisim("run", "--model", "smollm2-135m", "--random-weights", "--tp", "2", "--trace",
                     str(tmp_path / "x.trace.parquet")).returncode == 1


@pytest.mark.slow
def test_validate_tp2_calibrates_a_rank_and_replays_each_rank(tmp_path):
    proc = infinisim("validate", "--tp", "2", "--quick", "--model", "smollm2-135m", "--random-weights",
                     "--prompt-len", "32", "--gen-len", "3", "--policy", "resident", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    comparisons = json.loads(proc.stdout)["comparisons"]
    assert [(c["policy"], c["rank"]) for c in comparisons] == [("resident", 0), ("resident", 1)]
    assert all(c["lockstep"] for c in comparisons)  # the ranks replayed together: one step time for both
    assert comparisons[0]["per_step_ms"]["predicted"] == comparisons[1]["per_step_ms"]["predicted"]
    assert all(c["phases"]["comm"]["predicted_ms"] > 0 and c["phases"]["comm"]["measured_ms"] > 0
               for c in comparisons)
    profile = load_profile(str(tmp_path / "profile.yaml"))
    assert profile.node is not None and profile.node.gpus == 2 and "gloo" in profile.node.interconnect
    assert profile.node.interconnect_latency > 0  # from the block's all-reduces, as its decode issued them
    assert profile.node.measured_together  # every rank calibrated at once: its copies are one rank's share
    # the calibration block measured as rank 0's shard, between its all-reduces
    assert profile.device.block_shards == 2 and [b for b, _ in profile.device.decode_block_sweep] == [1, 4]
    # speculation timed on a rank's share of the tiny model (4 of its 8 query heads), between its all-reduces
    assert profile.device.speculation_sweep[0][0] == 1 * 4 * (64 + 4)


def test_ring_fit_takes_the_bandwidth_back_to_back_and_the_latency_as_the_model_issued_them():
    """All-reduces of the ring model (2(tp-1) steps of latency, 2(tp-1)/tp of the bytes): 200 us a step
    back to back, 500 us between the model's layers; 1 GB/s either way."""
    from infinisim.executor.parallel import ALL_REDUCE_SIZES, ring_fit

    def ring(nbytes: float, latency: float, tp: int = 2) -> float:
        return 2 * (tp - 1) * latency + 2 * (tp - 1) / tp * nbytes / 1e9

    back = [(float(b), ring(b, 2e-4)) for b in ALL_REDUCE_SIZES]
    in_model = [(3072.0, ring(3072, 5e-4)), (12288.0, ring(12288, 5e-4))]
    assert ring_fit(2, back, in_model) == pytest.approx((5e-4, 1e9))
    assert ring_fit(2, back, []) == pytest.approx((2e-4, 1e9))  # none measured in the model: the intercept
