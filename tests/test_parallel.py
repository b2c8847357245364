"""Tensor parallelism in the simulator: heads (with their KV), FFN columns and vocabulary split over
a node's GPUs, a ring all-reduce after attention and after the FFN, each GPU offloading its own KV
over its own link (or a shared one); multi-GPU node profiles."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from test_simulator import ideal_profile

from infinisim.cli import main
from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.profile import Node, load_profile, write_profile
from infinisim.sim.engine import simulate
from infinisim.sim.lockstep import simulate_ranks
from infinisim.sim.memory import memory_plan
from infinisim.sim.result import PHASES
from infinisim.sim.run import simulate_if_fits
from infinisim.sim.workload import synthetic
from infinisim.traces.spec import Shard, named_model


def node_profile(gpus: int = 4, per_link: int = 1, bandwidth: float = 1e9, latency: float = 1e-5,
                 ring_bandwidth: float = 1e10, ring_latency: float = 2e-6):
    p = ideal_profile(bandwidth=bandwidth, latency=latency)
    return replace(p, node=Node(gpus, "test ring", ring_bandwidth, ring_latency, per_link))


def test_ring_all_reduce_closed_form():
    p = node_profile(ring_bandwidth=1e10, ring_latency=2e-6)
    assert p.all_reduce_seconds(8e6, 4) == pytest.approx(2 * 3 * 2e-6 + 2 * 3 / 4 * 8e6 / 1e10)
    assert p.all_reduce_seconds(8e6, 1) == 0


def test_the_compute_stream_waits_for_two_all_reduces_a_layer():
    """resident with instant compute: a decode step is 2 all-reduces of batch x hidden per layer, then
    the head's all-gather of every GPU's share of the logits (comm, in the head's row)."""
    spec, p = named_model("llama-3-8b"), node_profile(gpus=4)
    w = synthetic(spec, 8, 128, 4, "resident", "float16", tp=4)
    result = simulate(w, p)
    each = p.all_reduce_seconds(8 * spec.hidden * 2, 4)
    gather = p.all_gather_seconds(8 * w.spec.vocab_size * 4 * 2, 4)
    assert gather == pytest.approx(3 * p.node.interconnect_latency
                                   + 3 / 4 * 8 * w.spec.vocab_size * 4 * 2 / p.node.interconnect_bandwidth)
    for s in range(w.n_steps):
        assert result.decode_step_s[s] == pytest.approx(spec.n_layers * 2 * each + gather, rel=1e-6)
        assert result.phase_s[s + 1, -1, PHASES.index("comm")] == pytest.approx(gather)
        assert result.phase_s[s + 1, :-1, PHASES.index("comm")].sum() == pytest.approx(spec.n_layers * 2 * each)


@pytest.mark.parametrize("per_link", [1, 2])
def test_each_gpu_moves_its_own_kv_shard_over_its_link(per_link):
    """full, transfer-bound (instant compute and ring): each GPU's step is its layers' K and V copies of
    its share of the KV heads; two GPUs behind one host link take twice as long."""
    spec = named_model("llama-3-8b")
    p = node_profile(gpus=2, per_link=per_link, ring_bandwidth=1e30, ring_latency=0.0)
    one, two = (synthetic(spec, 2, 256, 4, "full", "float16", tp=tp) for tp in (1, 2))
    assert two.bytes_h2d[1, 0] * 2 == one.bytes_h2d[1, 0]  # half the KV heads each
    result = simulate(two, p)
    for s in range(1, two.n_steps):
        expected = sum(2 * 1e-5 + per_link * two.bytes_h2d[s, layer] / 1e9 for layer in range(spec.n_layers))
        assert result.decode_step_s[s] == pytest.approx(expected, rel=1e-6)


def uneven_ranks(policy: str = "full"):
    """SmolLM2's three KV heads over two ranks (two and one), each rank's workload as its trace has it."""
    whole = named_model("smollm2-135m")
    return [replace(synthetic(Shard.of(whole, 2, r).spec(whole), 2, 256, 4, policy, "float32"), tp=2)
            for r in range(2)]


def test_ranks_in_lockstep_wait_for_the_busiest_inside_each_all_reduce():
    """A CPU profile (everything in turn) with instant compute: a layer's time before its first all-reduce
    is its KV copy, twice as long on rank 0 (two KV heads) as on rank 1. Together, both ranks take rank 0's
    time alone, and rank 1's extra comm is exactly the difference."""
    p = replace(node_profile(gpus=2, ring_latency=1e-4), kind="cpu")
    ranks = uneven_ranks()
    alone = [simulate(w, p) for w in ranks]
    together = simulate_ranks(ranks, p)
    slow, fast = (a.decode_step_s for a in alone)
    assert (slow > fast * 1.2).all()
    for result in together:
        assert result.decode_step_s == pytest.approx(slow, rel=1e-9)
    comm = PHASES.index("comm")
    extra = together[1].phase_s[1:, :, comm].sum(-1) - alone[1].phase_s[1:, :, comm].sum(-1)
    assert extra == pytest.approx(slow - fast, rel=1e-9)
    assert together[0].phase_s[1:, :, comm].sum() == pytest.approx(alone[0].phase_s[1:, :, comm].sum(), rel=1e-9)


def test_identical_ranks_in_lockstep_are_each_rank_alone():
    spec, p = named_model("llama-3-8b"), node_profile(gpus=2)
    w = synthetic(spec, 4, 512, 6, "infinigen", "float16", tp=2, speculated_fraction=0.1)
    alone = simulate(w, p).decode_step_s
    for result in simulate_ranks([w, w], p):
        assert result.decode_step_s == pytest.approx(alone, rel=1e-12)
    with pytest.raises(InfinisimError, match="not one run's 3 ranks"):
        simulate_ranks([w, w, w], p)


def test_tensor_parallel_memory_and_the_planning_example():
    """Llama-3.1-70B: does not fit one H100 (weights on the host would), fits 8x H100 SXM at TP 8."""
    spec = named_model("llama-3.1-70b")
    single = memory_plan(synthetic(spec, 8, 4096, 4, "resident"), load_profile("h100-sxm"))
    assert single.problem.startswith("device memory") and "--weights-on-host" in single.problem
    node = load_profile("8x-h100-sxm")
    assert "--tp" not in single.problem  # one GPU: no degree to suggest
    on_node = memory_plan(synthetic(spec, 8, 4096, 4, "resident"), node).problem
    assert on_node.endswith("--weights-on-host 0.59 or --tp 2 would fit")  # the smallest of each that would
    eight = synthetic(spec, 8, 4096, 4, "resident", tp=8)
    plan = memory_plan(eight, node)
    assert plan.problem is None and plan.device_parts["weights"] == pytest.approx(
        spec.shard(8).weight_bytes("float16"))
    assert spec.shard(8).weight_bytes("float16") < spec.weight_bytes("float16") / 7.5
    exact, direct = (simulate_if_fits(eight, node, exact=e).result.decode_step_s for e in (True, False))
    assert direct == pytest.approx(exact, rel=1e-9)


def test_tensor_parallel_refusals(tmp_path, capsys):
    with pytest.raises(InfinisimError, match="--tp"):
        named_model("llama-3-8b").shard(3)  # 8 KV heads
    with pytest.raises(InfinisimError, match="needs 2 GPUs; profile h100-sxm has 1"):
        load_profile("h100-sxm").for_tensor_parallel(2)
    assert main(["simulate", "--model", "llama-3-8b", "--profile", "l4", "--tp", "2"]) == 1
    assert "--tp" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3-8b", "--profile", "4x-l4", "--policy", "full", "--batch", "4",
                 "--prompt-len", "1024", "--gen-len", "4", "--tp", "1,2,4", "--serial", "--out", str(tmp_path)]) == 0
    rows = pd.read_parquet(tmp_path / "plan.parquet").sort_values("tp")
    assert list(rows["tp"]) == [1, 2, 4] and rows["fits"].all()
    assert rows["device_gb"].is_monotonic_decreasing and (rows["comm_ms"].iloc[1:] > 0).all()


def test_node_profiles_round_trip_and_are_checked(tmp_path):
    node = load_profile("8x-h100-sxm")
    assert node.node.gpus == 8 and node.node.gpus_per_host_link == 2
    back = load_profile(write_profile(node, tmp_path / "n.yaml"))
    assert back.node == node.node and back.device == node.device
    shared = node.for_tensor_parallel(8)
    assert shared.link.h2d_bandwidth == pytest.approx(node.link.h2d_bandwidth / 2)  # two GPUs a switch
    # a profile calibrated with every rank copying at once (calibrate --tp) holds one GPU's share already
    together = replace(node, node=replace(node.node, measured_together=True))
    assert together.for_tensor_parallel(8).link == node.link and together.for_tensor_parallel(8).host == node.host
    again = load_profile(write_profile(together, tmp_path / "t.yaml"))
    assert again.node.measured_together and "measured_together" not in (tmp_path / "n.yaml").read_text()
    bad = (tmp_path / "n.yaml").read_text().replace("gpus: 8", "gpus: 1")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(InfinisimError, match=r"node\.gpus"):
        load_profile(tmp_path / "bad.yaml")
    for name in ("8x-a100-sxm", "4x-l4", "2x-rtx4090"):
        assert load_profile(name).node.gpus in (2, 4, 8)


def test_serving_over_a_tensor_parallel_node(tmp_path, capsys, azure_conv):
    """serve --tp and plan --requests --tp: Llama-3.1-70B does not fit one H100 at all, and serves the
    trace over 4 of the node's GPUs; more GPUs sustain a higher rate."""
    from infinisim.analysis.serving import ServeConfig
    from infinisim.sim.serving import simulate_serving
    from infinisim.traces.requests import RequestStream, read_requests

    whole = read_requests(azure_conv)
    stream = RequestStream(whole.requests[:60], whole.source)
    node = load_profile("8x-h100-sxm")
    result = simulate_serving(stream, ServeConfig("8x-h100-sxm", "llama-3.1-70b", "resident", tp=4).costs(node))
    assert np.isfinite(result.requests["finished_s"]).all() and result.rejected == 0
    with pytest.raises(InfinisimError, match="--tp"):
        ServeConfig("h100-sxm", "llama-3.1-70b", "resident", tp=2).costs()
    assert main(["serve", "--model", "llama-3.1-70b", "--profile", "8x-h100-sxm", "--tp", "4", "--policy", "resident",
                 "--requests", str(azure_conv), "--window", "0,60", "--json"]) == 0
    assert '"tp": 4' in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-70b", "--profile", "8x-h100-sxm", "--policy", "resident",
                 "--tp", "4,8", "--requests", str(azure_conv), "--max-requests", "200", "--serial",
                 "--out", str(tmp_path)]) == 0
    rows = pd.read_csv(tmp_path / "capacity.csv").sort_values("tp")
    assert list(rows["tp"]) == [4, 8] and rows["max_rate"].iloc[1] > rows["max_rate"].iloc[0] > 0
    assert main(["plan", "--model", "llama-3-8b", "--profile", "l4", "--weights-on-host", "auto",
                 "--requests", str(azure_conv), "--out", str(tmp_path / "w")]) == 1
    assert "--weights-on-host" in capsys.readouterr().err
