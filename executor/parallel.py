"""Tensor parallelism with torch.distributed (gloo on a CPU, NCCL on CUDA), as Megatron-LM splits a
transformer: each rank holds its share of the KV heads (and the query heads that read them, with
their KV cache, under its own KV policy), of the FFN's hidden columns and of the vocabulary; the
embeddings and norms whole. Attention's output projection and the FFN's down projection are
row-parallel: their partial outputs are summed by an all-reduce (timed as the layer's "comm"), and
their biases added on rank 0 only. The head computes its slice of the vocabulary and the ranks
gather the logits (in the step's "head" time), so every rank samples the same token.

Heads need not divide evenly: the first ranks take one KV head more (SmolLM2's three KV heads over
two ranks are two and one); the FFN and the vocabulary split the same way.

Shapes: H query heads, G KV heads, d head dim, F FFN hidden, V vocabulary.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from infinisim.core.errors import InfinisimError
from infinisim.executor.model import Transformer
from infinisim.hwprofiles.profile import Node, Profile
from infinisim.traces.spec import Shard, split


class VocabParallelHead(nn.Module):
    """The head's slice of the vocabulary; the ranks' logits gathered into the whole."""

    def __init__(self, weight: Tensor, vocab: int, shard: Shard, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [V / tp, hidden]
        self.vocab, self.group, self.tp = vocab, group, shard.tp
        self.widest = split(vocab, shard.tp, 0)[1]  # rank 0's share is the largest: every rank pads to it

    def forward(self, x: Tensor) -> Tensor:
        local = F.linear(x, self.weight)
        padded = F.pad(local, (0, self.widest - local.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        sizes = [split(self.vocab, self.tp, r) for r in range(self.tp)]
        return torch.cat([p[..., :end - start] for p, (start, end) in zip(parts, sizes, strict=True)], dim=-1)


def shard_model(model: Transformer, shard: Shard, group: dist.ProcessGroup) -> Transformer:
    """The rank's Transformer from the whole one (on the same device): sliced copies of its weights."""
    spec = model.spec
    local = replace(shard.spec(spec), vocab_size=spec.vocab_size)  # the embeddings stay whole
    d = spec.head_dim
    heads, kv, ffn = (shard.heads[0] * d, shard.heads[1] * d), (shard.kv_heads[0] * d, shard.kv_heads[1] * d), shard.ffn
    column = {"wq": heads, "wk": kv, "wv": kv, "w1": ffn, "w3": ffn, "fc1": ffn}  # output rows [start, end)
    row = {"wo": heads, "w2": ffn, "fc2": ffn}  # input columns [start, end); their partial outputs are summed
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        leaf, weight = (parts[-2] if len(parts) > 2 else ""), parts[-1] == "weight"
        if leaf in column:
            start, end = column[leaf]
            tensor = tensor[start:end]
        elif leaf in row:  # the bias once: rank 0's
            start, end = row[leaf]
            tensor = tensor[:, start:end] if weight else tensor if shard.rank == 0 else torch.zeros_like(tensor)
        state[name] = tensor.clone()
    with torch.device("meta"):
        out = Transformer(local)
    head = state.pop("output.weight", None)
    head = model.output.weight.detach() if head is None else head
    out.load_state_dict(state, strict=False, assign=True)
    out.output = VocabParallelHead(head[shard.vocab[0]:shard.vocab[1]].clone(), spec.vocab_size, shard, group)
    out.inv_freq = model.inv_freq
    for block in out.layers:
        block.group = group
    return out.eval()


def rank_log(rank: int) -> Callable[[str], None]:
    """A rank's log: rank 0's lines on stderr; the other ranks run the same steps and say nothing."""
    def log(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
    return log


def launch(tp: int, worker: Callable[..., Any], *args: Any, device: str = "cpu") -> list[Any]:
    """Run `worker(rank, tp, *args)` in `tp` processes joined in one process group (gloo on a CPU,
    NCCL on CUDA); each rank's CPU threads are this machine's cores over tp. Returns each rank's
    result, in rank order; an error in any rank is raised here as one line."""
    if device == "cuda" and tp > torch.cuda.device_count():
        raise InfinisimError(f"{tp} ranks on CUDA need {tp} GPUs; this machine has {torch.cuda.device_count()}",
                             field="--tp")
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="infinisim-tp-") as folder:
        store = f"file://{os.path.join(folder, 'rendezvous')}"
        procs = [ctx.Process(target=_rank, args=(rank, tp, store, device, results, worker, args), daemon=True)
                 for rank in range(tp)]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        try:
            while len(out) < tp:
                try:
                    rank, ok, value = results.get(timeout=5)
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        raise InfinisimError(f"tensor-parallel rank {procs.index(dead[0])} died (exit code "
                                             f"{dead[0].exitcode})", field="--tp") from None
                    continue
                if not ok:
                    raise InfinisimError(f"rank {rank}: {value}")
                out[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.terminate()
    return [out[r] for r in range(tp)]


def _rank(rank: int, tp: int, store: str, device: str, results: mp.Queue, worker: Callable[..., Any],
          args: tuple[Any, ...]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(backend, init_method=store, rank=rank, world_size=tp)
        # by value: a queue would share tensors through this process, which exits before they are read
        results.put((rank, True, pickle.dumps(worker(rank, tp, *args))))
    except InfinisimError as exc:
        results.put((rank, False, str(exc)))
    except BaseException as exc:  # the parent reports it as one line; the details go to this rank's stderr
        traceback.print_exc()
        results.put((rank, False, f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


ALL_REDUCE_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)  # bytes: decode rows to prefill


def _all_reduce_times(sizes: tuple[int, ...], repeats: int, device: str) -> list[float]:
    """This rank's seconds per all-reduce of float32 tensors of each size, back to back, the median
    of five rounds (in a process group of the ranks, each running this at once)."""
    import statistics
    import time

    out = []
    for size in sizes:
        x = torch.ones(size // 4, device=device)
        rounds = []
        for _ in range(6):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(repeats):
                dist.all_reduce(x)
            if device == "cuda":
                torch.cuda.synchronize()
            rounds.append((time.perf_counter() - start) / repeats)
        out.append(statistics.median(rounds[1:]))  # the first round warms up
    return out


def measure_interconnect(tp: int, device: str, in_model: list[tuple[float, float]], repeats: int = 20,
                         log: Callable[[str], None] = lambda _: None) -> Node:
    """The all-reduce between the `tp` ranks of the current process group as the simulator's ring
    model (2(tp-1) steps of latency plus 2(tp-1)/tp of the bytes over the bandwidth): the bandwidth
    fitted to all-reduces back to back, from decode rows to prefill sizes; the latency from
    `in_model`, (bytes, seconds) of the all-reduces the executor's decode of the calibration block
    issued between its layers' compute. On this project's 2-core CPU those took 1.1-1.3 ms each in three
    calibrations, where back to back the fitted step ran from 244 to 477 us between calibrations
    (predicting SmolLM2's in-model 0.95-1.05 ms at -10% to -50%)."""
    times = _all_reduce_times(ALL_REDUCE_SIZES, repeats, device)
    for size, t in zip(ALL_REDUCE_SIZES, times, strict=True):
        log(f"all-reduce of {size >> 10:>5} KiB over {tp} ranks, back to back: {t * 1e6:.0f} us")
    latency, bandwidth = ring_fit(tp, list(zip(ALL_REDUCE_SIZES, times, strict=True)), in_model)
    log(f"ring fit: {latency * 1e6:.1f} us per step ({'in the model' if in_model else 'back to back'}), "
        f"{bandwidth / 1e9:.2f} GB/s")
    name = "NCCL between GPUs (measured)" if device == "cuda" else "gloo between processes on this host (measured)"
    return Node(gpus=tp, interconnect=name, interconnect_bandwidth=bandwidth, interconnect_latency=latency,
                gpus_per_host_link=1)


def ring_fit(tp: int, back_to_back: list[tuple[float, float]], in_model: list[tuple[float, float]]
             ) -> tuple[float, float]:
    """(latency per ring step, bandwidth) of the ring model from (bytes, seconds) all-reduces: the
    bandwidth from the slope over the back-to-back sizes, the latency from the `in_model` ones less
    their bytes' time (the median), or without them from the back-to-back intercept."""
    import numpy as np

    sizes, times = (np.array(v, dtype=float) for v in zip(*back_to_back, strict=True))
    slope, intercept = np.polyfit(sizes, times, 1)
    steps = 2 * (tp - 1)
    bandwidth = float(max(steps / tp / max(slope, 1e-15), 1e8))
    per_step = [(t - steps / tp * nbytes / bandwidth) / steps for nbytes, t in in_model] or [intercept / steps]
    return float(np.clip(np.median(per_step), 0.0, 1e-3)), bandwidth


def _calibrate_rank(rank: int, tp: int, device: str, dtype: str, quick: bool, name: str | None) -> Profile:
    from infinisim.executor.calibrate import calibrate

    return calibrate(device, dtype, quick, name, log=lambda line: print(f"  {line}", file=sys.stderr, flush=True)
                     if rank == 0 else None, tp=(tp, rank))


def calibrate_ranks(tp: int, device: str = "cpu", dtype: str = "float32", quick: bool = False,
                    name: str | None = None, log: Callable[[str], None] = lambda _: None) -> Profile:
    """A profile of one of `tp` ranks on this machine: `calibrate` run in all `tp` ranks at once (each
    with the threads a rank gets, sharing the memory bus as the ranks of a run do; speculation and
    the calibration block timed on a rank's share, between its all-reduces; rank 0's measurements
    kept), with the all-reduce between them as its node."""
    log(f"calibrating in {tp} ranks at once (rank 0's measurements are kept) ...")
    profile = launch(tp, _calibrate_rank, device, dtype, quick, name, device=device)[0]
    return replace(profile, description=profile.description + f" One of {tp} tensor-parallel ranks, "
                   f"calibrated with all {tp} running.")
