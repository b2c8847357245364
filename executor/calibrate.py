"""Measure the machine this runs on and describe it as a profile.

What is measured, each over the shapes decoding uses, with working sets larger than the caches
(decoding streams weights and KV from memory every step):
- host->device and device->host copies over a sweep of sizes (on a CPU-only machine: memcpy
  between two buffers, which is what the executor's copies are there);
- gathering scattered KV-sized rows into a staging buffer (the selective policies' host gather);
- matmul: the streaming rate of decode projections (bytes of weights per second) and the FLOP/s
  of a large matmul;
- decode attention: bytes of KV per second through scaled_dot_product_attention;
- the host's cost of issuing one small op (the launch overhead), InfiniGen's speculation and prompt
  blocks, on the executor's own code (executor.calibrate_model).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from infinisim.executor import calibrate_model as runs
from infinisim.executor.machine import cpu_name, last_level_cache, ram_bytes
from infinisim.hwprofiles.profile import WIDE_PROJECTION, Device, Host, Link, Profile
from infinisim.traces.spec import CALIBRATION_BLOCK

SWEEP_SIZES = (4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20)
QUICK_SWEEP_SIZES = (4 << 10, 256 << 10, 4 << 20)
# rows of the decode projections timed (the rate dips between 8 and 16 rows on some CPUs' GEMM kernels)
STREAM_ROWS = (1, 2, 4, 8, 12, 16, 32)

UNSTABLE = 0.3  # a measurement whose repeats spread more than this (IQR / median) is flagged
PLAUSIBLE_LAUNCH = (2e-7, 5e-5)  # seconds per dispatched op outside this: the machine was busy, or is odd
PLAUSIBLE_STREAM = 1e9  # weight streaming below 1 GB/s: the machine was busy


def _timer(device: torch.device, spreads: list[float]) -> Callable[[Callable[[], None], int], float]:
    """Median seconds per call of fn, over `repeats` timed calls after one warm-up; each call's
    spread (interquartile range / median) goes into `spreads`."""

    def measure(fn: Callable[[], None], repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        median = times[len(times) // 2]
        spreads.append((times[(3 * len(times)) // 4] - times[len(times) // 4]) / max(median, 1e-12))
        return median

    return measure


Measure = Callable[[Callable[[], object], int], float]


def _copies(measure: Measure, dev: torch.device, repeats: int, sizes: tuple[int, ...], working_set: int,
            log: Callable[[str], None]) -> tuple[list[tuple[float, float, float]], float]:
    """(size, h2d B/s, d2h B/s) per size, cycling through buffers larger than the caches as
    decoding does; and the pageable host->device bandwidth (CUDA only, else 0)."""
    cuda = dev.type == "cuda"
    sweep = []
    for size in sizes:
        n_bufs = max(1, working_set // size)
        hosts = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for _ in range(n_bufs)]
        targets = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(n_bufs)]

        def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
            for dst, src in zip(dsts, srcs, strict=True):
                dst.copy_(src, non_blocking=cuda)

        h2d = measure(lambda h=hosts, t=targets: copy_all(t, h), repeats) / n_bufs
        d2h = measure(lambda h=hosts, t=targets: copy_all(h, t), repeats) / n_bufs
        sweep.append((float(size), size / h2d, size / d2h))
        log(f"copy {size >> 10:>7} KiB: h2d {size / h2d / 1e9:6.2f} GB/s, d2h {size / d2h / 1e9:6.2f} GB/s")
    pageable = 0.0
    if cuda:
        plain = torch.empty(sizes[-1], dtype=torch.uint8)
        target = torch.empty(sizes[-1], dtype=torch.uint8, device=dev)
        pageable = sizes[-1] / measure(lambda: target.copy_(plain), repeats)
    return sweep, pageable


def _gather(measure: Measure, dt: torch.dtype, pinned: bool, repeats: int, n_rows: int) -> float:
    """B/s of gathering a 20% selection of scattered 256-byte rows (a KV head row: head dim 64 in
    float32, 128 in 16-bit) into a staging buffer, as the selective policies do."""
    row_values = 256 // dt.itemsize
    source = torch.randn(n_rows, row_values).to(dt)
    index = torch.randperm(n_rows)[: n_rows // 5]
    staging = torch.empty(len(index), row_values, dtype=dt, pin_memory=pinned)
    seconds = measure(lambda: torch.index_select(source, 0, index, out=staging), repeats)
    return staging.numel() * dt.itemsize / seconds


def _stream_rates(measure: Measure, dt: torch.dtype, dev: torch.device, repeats: int, working_set: int,
                  rows: tuple[int, ...], k: int, n: int) -> list[float]:
    """B/s of weights through decode projections of each number of rows by k x n weights, more of
    them than the caches hold (decoding reads every weight from memory each step)."""
    n_mats = max(2, working_set // (k * n * dt.itemsize))
    weights = [torch.empty(n, k, device=dev).uniform_(-1, 1).to(dt) for _ in range(n_mats)]
    rates = []
    for m in rows:
        x = torch.randn(m, 1, k, device=dev).to(dt)  # [batch, one new token, hidden], as decoding has it
        seconds = measure(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], repeats)
        rates.append(n_mats * k * n * dt.itemsize / seconds)
    return rates


def _streaming(measure: Measure, dt: torch.dtype, dev: torch.device, repeats: int, working_set: int,
               rows: tuple[int, ...], inners: tuple[int, ...]) -> list[tuple[float, float, float]]:
    """(rows, inner size k, B/s) of weights through decode projections by k x 2k weights. The rate
    depends on both: few rows and a short inner size stream slowest."""
    out = []
    for k in inners:
        rates = _stream_rates(measure, dt, dev, repeats, working_set, rows, k, 2 * k)
        out.extend((float(m), float(k), bw) for m, bw in zip(rows, rates, strict=True))
    return out


def _cached_streaming(measure: Measure, dt: torch.dtype, dev: torch.device, repeats: int, inners: tuple[int, ...]
                      ) -> list[tuple[float, float]]:
    """(weight bytes, B/s) of a one-row projection by a k x k weight it has just read (a live server's
    sequences each speculate with the same W_q, one after another: after the first it is in cache)."""
    out = []
    for k in inners:
        w = torch.randn(k, k, device=dev).to(dt)
        x = torch.randn(1, 1, k, device=dev).to(dt)
        seconds = measure(lambda x=x, w=w: [F.linear(x, w) for _ in range(16)], repeats) / 16
        out.append((float(k * k * dt.itemsize), k * k * dt.itemsize / seconds))
    return out


def _matmul_sweep(measure: Measure, dev: torch.device, repeats: int, m: int, sizes: tuple[int, ...]
                  ) -> list[tuple[float, float, float]]:
    """(inner size d, float32 FLOP/s, bfloat16 FLOP/s) of prompt-sized projections: m rows by
    FFN-like d x 4d and 4d x d weights."""
    out = []
    for d in sizes:
        rates = []
        for dt in (torch.float32, torch.bfloat16):
            seconds = 0.0
            for k, n in ((d, 4 * d), (4 * d, d)):
                x = torch.randn(m, k, device=dev).to(dt)
                w = torch.randn(n, k, device=dev).to(dt)
                seconds += measure(lambda x=x, w=w: F.linear(x, w), repeats)
            rates.append(2 * 2.0 * m * d * 4 * d / seconds)
        out.append((float(d), rates[0], rates[1]))
    return out


def _decode_attention(measure: Measure, dt: torch.dtype, dev: torch.device, repeats: int, length: int,
                      working_set: int) -> float:
    """B/s of KV through decode attention (8 x 32 query heads, 8 KV heads, head dim 64)."""
    b, heads, kv_heads, d = 8, 32, 8, 64
    n_layers = max(2, working_set // (2 * b * kv_heads * length * d * dt.itemsize))
    caches = [(torch.randn(b, kv_heads, length, d, device=dev).to(dt),
               torch.randn(b, kv_heads, length, d, device=dev).to(dt)) for _ in range(n_layers)]
    q = torch.randn(b, heads, 1, d, device=dev).to(dt)
    seconds = measure(lambda: [F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for k, v in caches], repeats)
    return n_layers * 2 * b * kv_heads * length * d * dt.itemsize / seconds


def _prefill_attention(measure: Measure, dt: torch.dtype, dev: torch.device, repeats: int, length: int) -> float:
    """FLOP/s (4 B H T^2 d) of prompt attention with an explicit causal mask, as the executor runs it."""
    b, heads, d = 1, 8, 64
    q, k, v = (torch.randn(b, heads, length, d, device=dev).to(dt) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool, device=dev).tril()[None, None]
    seconds = measure(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats)
    return 4.0 * b * heads * length * length * d / seconds


def _implausible(spreads: list[float], per_score: float, launch: float, streams: list[tuple[float, float, float]]
                 ) -> list[str]:
    """What looks wrong with the measurements (each is also a reason to calibrate again, on a quiet machine)."""
    out = []
    unstable = sum(s > UNSTABLE for s in spreads)
    if unstable:
        out.append(f"{unstable} of {len(spreads)} measurements varied by more than {UNSTABLE:.0%} between repeats "
                   f"(worst {max(spreads):.0%}): the machine may be busy")
    if per_score <= 0:
        out.append("InfiniGen's count-and-choose was not slower on the large case than the tiny one (noise): "
                   "taking the large case's time per score, an upper bound")
    if not PLAUSIBLE_LAUNCH[0] <= launch <= PLAUSIBLE_LAUNCH[1]:
        out.append(f"{launch * 1e6:.1f} us per dispatched op is outside the plausible "
                   f"{PLAUSIBLE_LAUNCH[0] * 1e6:g}-{PLAUSIBLE_LAUNCH[1] * 1e6:g} us")
    slow = [(int(m), int(k), bw) for m, k, bw in streams if bw < PLAUSIBLE_STREAM]
    if slow:
        out.append(f"weight streaming of {slow[0][0]} rows x inner {slow[0][1]} at {slow[0][2] / 1e9:.2f} GB/s is "
                   "implausibly slow")
    return out


def _selection(measure: Measure, dev: torch.device, repeats: int, large: tuple[int, int, int]
               ) -> tuple[float, float]:
    """InfiniGen's count-and-choose (executor.selection.choose_rows, the policy's own code): its cost
    per speculated score, from a tiny and a large case (the simulator extrapolates the measured
    speculation sweep with it)."""
    from infinisim.core.policies import budget_cap
    from infinisim.executor.selection import choose_rows

    def seconds(b: int, h: int, length: int) -> float:
        scores = torch.randn(b, h, length, device=dev) * 3
        valid = torch.ones(b, length, dtype=torch.bool, device=dev)
        budgets = [budget_cap(0.2, length)] * b
        return measure(lambda: choose_rows(scores, scores, valid, 5.0, budgets, h // 4, "softmax_sum", True)[0].cpu(),
                       repeats)

    small = (1, 8, 64)
    fixed, big = seconds(*small), seconds(*large)
    n_small, n_large = small[0] * small[1] * small[2], large[0] * large[1] * large[2]
    return (big - fixed) / (n_large - n_small), big / n_large  # (per score, an upper bound)


def _skew(measure: Measure, dev: torch.device, repeats: int, sizes: tuple[int, int]) -> tuple[float, float]:
    """(seconds per query row, fixed seconds) of building one KV head's skew (SVD, ordering, column
    choice), from two sizes: short prompts pay mostly the fixed part."""
    from infinisim.executor.selection import partial_columns, skew_matrix

    def seconds(rows: int) -> float:
        q, k = torch.randn(rows, 64, device=dev), torch.randn(rows // 4, 64, device=dev)
        return measure(lambda: partial_columns(q @ skew_matrix(q, k), 19), repeats)

    (small, t_small), (large, t_large) = ((n, seconds(n)) for n in sizes)
    per_row = max(t_large - t_small, 0.0) / (large - small) or t_large / large
    return per_row, max(t_small - per_row * small, 0.0)


def calibrate(device: str = "cpu", dtype: str = "float32", quick: bool = False, name: str | None = None,
              log: Callable[[str], None] = lambda _: None, tp: tuple[int, int] = (1, 0)) -> Profile:
    """Measure this machine (under two minutes; `quick`: a few seconds, smaller shapes) and return it
    as a profile. On a CPU-only machine the CPU plays the device and copies are memcpys. `tp`
    (degree, rank): run in every rank of a process group, speculation is timed as a rank's."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = getattr(torch, dtype)
    spreads: list[float] = []
    measure = _timer(dev, spreads)
    repeats = 3 if quick else 9
    working_set = (32 if quick else 256) << 20
    # a model's weights, read from memory by every decode step: measured through more than the caches hold
    # (a server CPU's last-level cache can be larger than 256 MB), within an eighth of the RAM. (A small
    # model's KV cache can stay in such a cache: decode attention keeps the 256 MB set.)
    streamed = working_set if quick or cuda else int(min(max(working_set, 2 * last_level_cache()), ram_bytes() / 8))

    sweep, pageable = _copies(measure, dev, repeats, QUICK_SWEEP_SIZES if quick else SWEEP_SIZES,
                              working_set // 4, log)
    gather_bw = _gather(measure, dt, cuda, repeats, (1 << 18) if quick else (1 << 20))
    log(f"gather of 256-byte rows: {gather_bw / 1e9:.2f} GB/s")
    stream_rows = (1, 8) if quick else STREAM_ROWS
    streams = _streaming(measure, dt, dev, repeats, streamed, stream_rows,
                         (512, 2048) if quick else (512, 1024, 2048, 4096))
    for k in sorted({p[1] for p in streams}):
        log(f"decode projections, inner size {int(k):>4}: " + ", ".join(
            f"{int(m)} rows {bw / 1e9:.1f}" for m, inner, bw in streams if inner == k) + " GB/s")
    wide = list(zip(map(float, stream_rows), _stream_rates(measure, dt, dev, repeats, streamed, stream_rows,
                                                           *WIDE_PROJECTION), strict=True))
    log(f"a vocabulary-wide projection ({WIDE_PROJECTION[0]} x {WIDE_PROJECTION[1]}): "
        + ", ".join(f"{int(m)} rows {bw / 1e9:.1f}" for m, bw in wide) + " GB/s")
    stream_bw = sorted(p[2] for p in streams)[len(streams) // 2]  # the median
    cached = _cached_streaming(measure, dt, dev, repeats, (512, 2048) if quick else (512, 1024, 2048, 4096))
    log("a one-row projection by a weight in cache: " + ", ".join(
        f"{int(b) >> 10} KiB {bw / 1e9:.1f} GB/s" for b, bw in cached))
    matmuls = _matmul_sweep(measure, dev, repeats, 128 if quick else 512,
                            (256, 1024) if quick else (256, 512, 1024, 2048))
    for d, f32, bf16 in matmuls:
        log(f"prompt-sized matmul, inner size {int(d):>5}: {f32 / 1e12:.3f} TFLOP/s float32, "
            f"{bf16 / 1e12:.3f} bfloat16")
    attention_bw = _decode_attention(measure, dt, dev, repeats, 1024 if quick else 4096, working_set)
    log(f"decode attention: {attention_bw / 1e9:.2f} GB/s of KV")
    prefill = [(float(t), _prefill_attention(measure, dt, dev, min(repeats, 5), t))
               for t in ((128, 512) if quick else (256, 1024, 4096))]
    log("prompt attention with a causal mask: " + ", ".join(f"{int(t)} tokens {f / 1e12:.3f}" for t, f in prefill)
        + " TFLOP/s")
    selection_per_score, selection_bound = _selection(measure, dev, repeats, (2, 8, 1024) if quick else (8, 32, 4096))
    log(f"InfiniGen count-and-choose: {selection_per_score * 1e9:.2f} ns per speculated score")
    skew_row, skew_head = _skew(measure, dev, repeats, (256, 1024) if quick else (256, 8192))
    log(f"skew build: {skew_head * 1e6:.0f} us per KV head + {skew_row * 1e9:.1f} ns per query row")
    launch = runs.launch_overhead(dev, dt)
    log(f"executor: {launch * 1e6:.1f} us per dispatched op")
    speculation = runs.speculation(dev, dt, ((1, 64), (1, 512)) if quick else ((1, 64), (1, 1024), (4, 2048)), tp)
    log("InfiniGen speculation per layer: " + ", ".join(f"{int(n)} scores {t * 1e3:.3f} ms" for n, t in speculation))
    block = runs.block_model(dev, dt, streamed, tp)
    prompts = runs.prompt_blocks(block, (64, 256) if quick else (64, 256, 1024), 1 if quick else 2)
    log("the executor's prefill per layer: " + ", ".join(
        f"{int(t)} tokens attn {a * 1e3:.2f} ms ffn {f * 1e3:.2f} ms" for t, a, f in prompts))
    decodes = runs.decode_blocks(block, (1, 4) if quick else (1, 4, 8, 16), 3 if quick else 9)
    log("the executor's decode FFN per layer: " + ", ".join(f"{int(b)} rows {f * 1e3:.3f} ms" for b, f, _, _ in decodes)
        + "".join(f"; all-reduce of {int(b)} rows {c * 1e3:.3f} ms" for b, _, c, _ in decodes if c > 0))
    # on CUDA the spans are device time: the wall outside them is not the host's own work
    layer_host = None if cuda else decodes[0][3]
    if layer_host is not None:
        log(f"the executor's decode step outside its phases: {layer_host * 1e6:.1f} us a layer")
    del block
    node = None
    if tp[0] > 1:  # the all-reduce as the block's decode issued it (where sharded), and back to back
        from infinisim.executor.parallel import measure_interconnect

        in_model = [(rows * CALIBRATION_BLOCK.hidden * dt.itemsize, comm) for rows, _, comm, _ in decodes if comm > 0]
        # every rank calibrates at once: the copies and host bandwidths above are already one rank's share
        node = replace(measure_interconnect(tp[0], device, in_model, 8 if quick else 20, log), measured_together=True)

    warnings = _implausible(spreads, selection_per_score, launch, streams)
    if selection_per_score <= 0:  # the large case was no slower than the tiny one: noise; take the upper bound
        selection_per_score = selection_bound
    for warning in warnings:
        log(f"warning: {warning}")
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        dev_name, memory = props.name, float(props.total_memory)
    else:
        dev_name, memory = f"{cpu_name()} (CPU as device)", ram_bytes()
    device_part = Device(
        name=dev_name, memory=memory, matmul_flops=max(p[2] for p in matmuls),
        matmul_flops_fp32=max(p[1] for p in matmuls), memory_bandwidth=stream_bw, launch_overhead=launch,
        matmul_efficiency=1.0, bandwidth_efficiency=1.0, attention_efficiency=min(1.0, attention_bw / stream_bw),
        matmul_sweep=tuple(matmuls), stream_sweep=tuple(streams), wide_stream_sweep=tuple(wide),
        prefill_attention_sweep=tuple(prefill),
        speculation_sweep=tuple(speculation), prefill_block_sweep=tuple(prompts), cached_stream_sweep=tuple(cached),
        decode_block_sweep=tuple((rows, ffn) for rows, ffn, _, _ in decodes), block_shards=runs.block_shards(tp[0]),
        decode_layer_host=layer_host, selection_per_score=selection_per_score, skew_per_row=skew_row,
        skew_per_head=skew_head)
    top = sweep[-1]
    link = Link(name="PCIe (measured)" if cuda else "memcpy between buffers (measured)",
                h2d_bandwidth=top[1], d2h_bandwidth=top[2], pageable_bandwidth=pageable or top[1],
                latency=sweep[0][0] / sweep[0][1], duplex=True, sweep=tuple(sweep))
    host = Host(name=cpu_name(), cores=os.cpu_count() or 1, memory=ram_bytes(),
                memory_bandwidth=stream_bw if not cuda else gather_bw, gather_bandwidth=gather_bw)
    return Profile(
        name=name or f"calibrated-{platform.node() or 'host'}", kind="gpu" if cuda else "cpu",
        description=(f"Measured by `infinisim calibrate` ({'quick, ' if quick else ''}{dtype}, torch "
                     f"{torch.__version__}, {torch.get_num_threads()} threads) on {platform.node()}. Efficiencies "
                     "are folded into the measured rates (1.0); attention's is relative to the streaming rate."
                     + "".join(f" Warning: {w}." for w in warnings)),
        sources=(f"infinisim calibrate on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",),
        device=device_part, link=link, host=host, node=node)
