"""Weight offloading in the executor (executor/weight_stream.py): the same logits as resident weights,
a transfer-bound stream taking its bytes over the link, the trace's record of it and the replay."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from test_cli import infinisim

from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.link import EmulatedLink
from infinisim.executor.recording import run_policy
from infinisim.executor.weight_stream import WeightStream
from infinisim.executor.weights import materialize
from infinisim.hwprofiles.emulated import LinkSpec
from infinisim.sim.workload import from_trace
from infinisim.traces.spec import named_model
from infinisim.traces.trace import read_trace, write_trace

RUN = {"model": "x", "weights": "random"}


def small_opt():
    return materialize(replace(named_model("opt-125m"), n_layers=4), None, "float32", torch.device("cpu"), "random")


def logits_of(model, policy: str, share: float, prompts: list[list[int]]) -> tuple[list, list]:
    model = copy.deepcopy(model)  # a stream rebuilds the blocks it splits
    if share:
        WeightStream(model, share, torch.device("cpu"), None)
    gen, _ = run_policy(model, prompts, policy, SamplingConfig(5, stop_at_eos=False), RUN,
                        knobs={"dense_layers": 1} if policy == "infinigen" else None,
                        measure=Measurement(keep_logits=True))
    return gen.logits, gen.new_tokens


@pytest.mark.parametrize("share", [0.5, 1.0])
@pytest.mark.parametrize("policy", ["resident", "infinigen"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_weights_give_the_resident_logits(five_layer_smollm2, family, policy, share):
    """Every step's logits within 1e-5 (float32) of the model with every weight on the device, the
    same tokens; infinigen too (it reads a later layer's query weights while streaming)."""
    model = five_layer_smollm2 if family == "llama" else small_opt()
    prompts = [list(range(10, 90)), list(range(200, 260))]
    want, want_tokens = logits_of(model, policy, 0.0, prompts)
    got, tokens = logits_of(model, policy, share, prompts)
    assert tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_transfer_bound_weight_stream_takes_its_bytes_over_the_link(tmp_path, five_layer_smollm2):
    """Half of every block's weights over a slow link, resident KV: each decode step is its blocks' copies
    (copies per block x latency + streamed bytes / bandwidth, 0.9 s), within 5% (what compute does
    not overlap, the last block and the head, is ~2% of it);
    the trace says what streamed and the replay's workload streams the same share."""
    model = copy.deepcopy(five_layer_smollm2)
    bandwidth, latency = 40e6, 1e-3
    link = EmulatedLink(LinkSpec(bandwidth=bandwidth, latency=latency))
    stream = WeightStream(model, 0.5, torch.device("cpu"), link)
    info = stream.info
    assert info.copies_per_block == 7 and info.share == pytest.approx(0.5, abs=0.01)
    _, trace = run_policy(model, [list(range(10, 74))], "resident", SamplingConfig(4, stop_at_eos=False),
                          {**RUN, **info.to_dict()}, link=link)
    per_block = info.copies_per_block * latency + info.bytes_per_block / bandwidth
    n = model.spec.n_layers
    for step, rows in trace.layers[trace.layers.step > 1].groupby("step"):
        wall = trace.steps.set_index("step").loc[step, "wall_s"]
        assert wall == pytest.approx(n * per_block, rel=0.05), step
        assert rows.h2d_s.sum() == pytest.approx(n * per_block, rel=0.05)
        assert (rows.bytes_h2d == 0).all()  # bytes_h2d is the KV cache's
    back = read_trace(write_trace(trace, tmp_path / "w.trace.parquet"))
    assert back.run["weights_streamed_bytes_per_block"] == info.bytes_per_block
    assert from_trace(back).weights_on_host == pytest.approx(info.share)


def test_run_streams_weights_and_refuses_a_bad_share(tmp_path):
    args = ("run", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "16", "--gen-len", "2",
            "--ignore-eos", "--out", str(tmp_path))
    proc = infinisim(*args, "--weights-on-host", "0.25", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "25% of every block in host memory" in proc.stderr
    trace = read_trace(json.loads(proc.stdout)["summaries"][0]["trace"])
    assert trace.run["weights_on_host"] == pytest.approx(0.25, abs=0.01)
    assert "-wh0.25-" in json.loads(proc.stdout)["summaries"][0]["trace"]
    bad = infinisim(*args, "--weights-on-host", "1.5")  # a usage error: exit 2, one line naming the flag
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if "error:" in line] == \
        ["infinisim run: error: argument --weights-on-host: must be within [0, 1], got '1.5'"]
