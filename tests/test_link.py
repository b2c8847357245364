"""The emulated link: copies take latency + bytes / bandwidth of wall time on copy-engine threads,
overlap compute, share one link (or not, duplex), and are ordered and waited on as on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.link import EmulatedLink, memcpy
from infinisim.hwprofiles.emulated import LinkSpec, parse_link

MB = 1 << 20


def pairs(n_bytes: int, count: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.empty(n_bytes, dtype=torch.uint8), torch.randint(0, 255, (n_bytes,), dtype=torch.uint8))
            for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64])
def test_the_copy_threads_memcpy_writes_strided_rows_of_any_dtype_exactly(dtype):
    cache = torch.zeros(2, 3, 16, 8).to(dtype)  # a KV store: rows [:10] of every (sequence, head)
    rows = (torch.randn(2, 3, 10, 8) * 100).to(dtype)
    memcpy(cache[:, :, :10], rows)
    assert torch.equal(cache[:, :, :10], rows) and not cache[:, :, 10:].any()
    back = torch.empty(2, 3, 10, 8, dtype=dtype)
    memcpy(back, cache[:, :, :10])  # and from a strided source
    assert torch.equal(back, rows)
    with pytest.raises(ValueError, match="float32"):
        memcpy(torch.empty(4, dtype=torch.float32), torch.zeros(4, dtype=torch.int32))


def test_importing_infinisim_keeps_openmp_workers_spinning_200ms_unless_the_user_chose():
    probe = "import infinisim, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = [sys.executable, "-c", probe]
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "20000000"
    env["GOMP_SPINCOUNT"] = "1000"
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "1000"


def test_a_transfer_bound_sequence_takes_latency_plus_bytes_over_bandwidth():
    link = EmulatedLink(LinkSpec(bandwidth=200e6, latency=2e-3))
    copies = pairs(2 * MB, 8)
    t0 = time.perf_counter()
    handles = [link.submit("h2d", [pair]) for pair in copies]
    handles[-1].synchronize()
    expected = 8 * (2e-3 + 2 * MB / 200e6)  # 8 x (2 ms + 10.5 ms)
    assert time.perf_counter() - t0 == pytest.approx(expected, rel=0.05)
    assert all(torch.equal(dst, src) for dst, src in copies)  # the data really moved
    assert all(h.end >= h.start for h in handles) and handles[0].end <= handles[1].start + 1e-3  # in issue order


def test_a_copy_shorter_than_the_compute_it_overlaps_adds_no_wait():
    link = EmulatedLink(LinkSpec(bandwidth=200e6, latency=0.0))
    handle = link.submit("h2d", pairs(4 * MB))  # 21 ms on the link
    time.sleep(0.06)  # the compute thread works meanwhile
    t0 = time.perf_counter()
    handle.synchronize()
    assert time.perf_counter() - t0 < 2e-3


@pytest.mark.parametrize(("duplex", "factor"), [(False, 2.0), (True, 1.0)])
def test_h2d_and_d2h_share_a_link_and_overlap_on_a_duplex_one(duplex, factor):
    link = EmulatedLink(LinkSpec(bandwidth=200e6, latency=0.0, duplex=duplex))
    one = 6 * MB / 200e6  # 31 ms each
    a, b = pairs(6 * MB), pairs(6 * MB)
    t0 = time.perf_counter()
    up, down = link.submit("h2d", a), link.submit("d2h", b)
    up.synchronize()
    down.synchronize()
    assert time.perf_counter() - t0 == pytest.approx(factor * one, rel=0.08)


def test_h2d_waits_for_the_d2h_issued_before_it():
    link = EmulatedLink(LinkSpec(bandwidth=200e6, latency=0.0, duplex=True))
    down = link.submit("d2h", pairs(4 * MB))
    up = link.submit("h2d", pairs(MB), after=[down])
    up.synchronize()
    assert up.start >= down.end - 1e-4


def test_link_flag_parsing():
    spec = parse_link("0.5GB/s,10us")
    assert (spec.bandwidth, spec.latency, spec.duplex) == (0.5e9, pytest.approx(10e-6), False)
    assert parse_link("2 GB/s, duplex").duplex
    scaled = parse_link("scaled-pcie3", measure=lambda: 10e9)
    assert scaled.bandwidth == pytest.approx(10e9 * 12.5e9 / 768e9)  # memcpy x PCIe 3.0 / A6000 memory
    assert scaled.latency == pytest.approx(10e-6 * 768e9 / 10e9)
    for bad in ("fast", "0.5GB/s,10us,3us", "nan GB/s", "0GB/s"):
        with pytest.raises(InfinisimError, match="--link"):
            parse_link(bad)


def test_infinigen_prefetch_starts_before_the_previous_layer_computes_and_full_waits(tmp_path, five_layer_smollm2):
    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.recording import run_policy
    from infinisim.traces.trace import read_trace, write_trace

    prompts = [list(range(10, 330)), list(range(400, 720))]
    link = EmulatedLink(LinkSpec(bandwidth=100e6, latency=1e-4, duplex=True, name="test"))
    traces = {}
    for name in ("infinigen", "full"):
        _, trace = run_policy(five_layer_smollm2, prompts, name, SamplingConfig(4, stop_at_eos=False),
                              {"model": "x", "weights": "random"}, knobs={"dense_layers": 1}, link=link)
        traces[name] = read_trace(write_trace(trace, tmp_path / f"{name}.trace.parquet"))
    ig = traces["infinigen"]
    assert ig.run["link"] == {"name": "test", "bandwidth": 100e6, "latency": 1e-4, "duplex": True}
    decode = ig.layers[ig.layers.step > 1].set_index(["step", "layer"])
    n = ig.model.n_layers
    for step in decode.index.get_level_values(0).unique():
        for layer in range(1, n - 1):  # layer+1's rows, speculated at the start of `layer`
            h2d_starts = [decode.loc[(step, layer + 1), "copies"][i + 1]
                          for i in range(0, len(decode.loc[(step, layer + 1), "copies"]), 3)
                          if decode.loc[(step, layer + 1), "copies"][i] == 0]
            assert h2d_starts and min(h2d_starts) < decode.loc[(step, layer), "done_s"]
    full = traces["full"].layers[traces["full"].layers.step > 0]
    assert (full.wait_s > 0.5 * full.h2d_s).all()  # nothing to overlap: full waits for its copy


def test_a_transfer_bound_step_is_its_copies(tmp_path, five_layer_smollm2):
    """full over a slow shared link: each decode step is the sum over its copies (K and V of every
    layer, each way) of latency + bytes / bandwidth, within 5% (the compute, about 25 ms a step on
    this machine, is under 1% of the copies' 3.3 s)."""
    from infinisim.executor.generate import SamplingConfig
    from infinisim.executor.recording import run_policy

    bandwidth, latency = 0.6e6, 1e-3
    link = EmulatedLink(LinkSpec(bandwidth=bandwidth, latency=latency))
    _, trace = run_policy(five_layer_smollm2, [list(range(10, 266))], "full", SamplingConfig(2, stop_at_eos=False),
                          {"model": "x", "weights": "random"}, link=link)
    for step, rows in trace.layers[trace.layers.step > 0].groupby("step"):
        copies = 2 * 2 * len(rows)  # K and V, host->device and device->host, per layer
        expected = copies * latency + (rows.bytes_h2d.sum() + rows.bytes_d2h.sum()) / bandwidth
        wall = trace.steps.set_index("step").loc[step, "wall_s"]
        assert wall == pytest.approx(expected, rel=0.05), step


def test_the_gpu_kit_dry_run(tmp_path):
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["ok"] and set(result["correctness"]) == {"resident", "full", "infinigen", "oracle", "copy_streams",
                                                           "weights_on_host"}
    assert result["correctness"]["weights_on_host"]["ok"]
    assert [v["policy"] for v in result["validation"]] == ["resident", "full", "infinigen", "h2o", "int4"]
    assert [v["policy"] for v in result["validation_weights_on_host"]] == ["resident"]  # --tiny: one policy
    assert (tmp_path / "profile.yaml").exists() and (tmp_path / "validation.png").exists()
    assert sorted(v["policy"] for v in result["serving"]) == ["infinigen", "resident"]
    assert all(v["aggregate"]["ttft_p50_s"]["measured"] > 0 for v in result["serving"])
    assert (tmp_path / "serving" / "serving_validation.png").exists()
