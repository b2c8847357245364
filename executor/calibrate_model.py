"""Calibration that runs the executor's own model code, where timing kernels alone misses what the
model does around them: the host's cost per dispatched op, InfiniGen's speculation, and prompt
blocks as the model composes them.

Each runs a random model built here (no weights are loaded) and reads the times off the
executor's own per-phase recorder, so a phase measured here is the phase of that name in a trace.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.model import Transformer
from infinisim.executor.policies import make_policy
from infinisim.traces.spec import CALIBRATION_BLOCK, ModelSpec, Shard


def tiny_model(n_heads: int, dev: torch.device, dt: torch.dtype, tp: tuple[int, int] = (1, 0)) -> Transformer:
    """A tiny random model; `tp` (degree, rank) > 1: this rank's share of it, whose layers issue the
    all-reduces a tensor-parallel rank's do (on a CPU, InfiniGen's speculation between them took
    2.3x as long as without them: 0.32-0.40 against 0.14-0.17 ms a layer; the head stays whole)."""
    kv = max(2, tp[0])
    spec = ModelSpec("calibration-tiny", "llama", n_layers=3, hidden=64, n_heads=kv * -(-n_heads // kv), n_kv_heads=kv,
                     head_dim=16, ffn_hidden=128, vocab_size=256)
    torch.manual_seed(0)
    return rank_share(Transformer(spec).to(device=dev, dtype=dt).eval(), tp)


def rank_share(model: Transformer, tp: tuple[int, int]) -> Transformer:
    """A random model as is, or (`tp` degree > 1) this rank's shard of it, whose layers all-reduce
    their partial outputs between the ranks (the head stays whole: every rank samples alike)."""
    degree, rank = tp
    if degree == 1:
        return model
    import torch.distributed as dist

    from infinisim.executor.parallel import shard_model

    shard = shard_model(model, Shard.of(model.spec, degree, rank), dist.group.WORLD)
    shard.output = model.output
    return shard


def block_shards(tp: int) -> int:
    """The degree CALIBRATION_BLOCK is sharded to under `calibrate --tp`: the run's, where every rank
    gets a KV head; else 1 (the block whole in each rank)."""
    return tp if tp <= CALIBRATION_BLOCK.n_kv_heads else 1


def launch_overhead(dev: torch.device, dt: torch.dtype) -> float:
    """Host seconds per dispatched op in the executor's own decode step, on a tiny random model (all
    tensors tiny, so the time is dispatch and Python); ops counted with a dispatch mode. Measured
    whole under --tp too: a rank's step less its all-reduces overpredicted attention by half."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_model(4, dev, dt)
    prompt = [list(range(1, 65))]

    class Count(TorchDispatchMode):
        ops, on = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += Count.on
            return func(*args, **(kwargs or {}))

    def after_step(record: object) -> None:
        Count.on = True  # decode steps only

    with Count():
        generate(model, prompt, make_policy("resident"), SamplingConfig(4, stop_at_eos=False), after_step)
    ops_per_step = Count.ops / 3
    resident = generate(model, prompt, make_policy("resident"), SamplingConfig(24, stop_at_eos=False))
    walls = sorted(r.times.wall_s for r in resident.steps[1:])
    return walls[len(walls) // 2] / ops_per_step


def speculation(dev: torch.device, dt: torch.dtype, shapes: tuple[tuple[int, int], ...], tp: tuple[int, int] = (1, 0)
                ) -> list[tuple[float, float]]:
    """(speculated scores, seconds) of one layer's InfiniGen speculation, run by the executor on a
    narrow model (8 query heads) at (batch, prompt length) shapes: its fixed and size-dependent host
    costs, without the projections of a real model (the simulator adds those from the roofline)."""
    model = tiny_model(8, dev, dt, tp)
    out = []
    for batch, length in shapes:
        prompts = [[1 + i % 250 for i in range(length)]] * batch
        run = generate(model, prompts, make_policy("infinigen", dense_layers=1), SamplingConfig(9, stop_at_eos=False))
        times = sorted(phases["spec"] for r in run.steps[1:] for phases in r.times.layer_phases.values()
                       if "spec" in phases)
        out.append((float(batch * model.spec.n_heads * (length + 4)), times[len(times) // 2]))
    return out


def block_model(dev: torch.device, dt: torch.dtype, weight_bytes: int, tp: tuple[int, int] = (1, 0)
                ) -> Transformer:
    """Random CALIBRATION_BLOCK layers, more of them than `weight_bytes` of weights (in this rank's
    share, under `tp`), so each layer's weights come from memory, as a real model's do. Under `tp`
    (see `block_shards`) this rank's shard: its layers issue a tensor-parallel rank's all-reduces."""
    shards = block_shards(tp[0])
    per_layer = CALIBRATION_BLOCK.layer_param_count() * dt.itemsize / shards
    n_layers = max(2, int(-(-weight_bytes // per_layer)))
    torch.manual_seed(0)
    whole = Transformer(dataclasses.replace(CALIBRATION_BLOCK, n_layers=n_layers)).to(device=dev, dtype=dt).eval()
    return rank_share(whole, (shards, tp[1]))


def prompt_blocks(model: Transformer, lengths: tuple[int, ...], repeats: int) -> list[tuple[float, float, float]]:
    """(prompt tokens, attention seconds, FFN seconds) per layer of the executor's own prefill of
    `block_model` (batch 1, resident): what the roofline of the kernels alone misses (RoPE and
    transposes on strided views, the mask, the cache write, allocations; on this project's 2-core
    CPU the block took 1.14-1.37x its roofline in attention, 1.06-1.24x in the FFN). Each time is the
    mean over the layers, the median over `repeats` prompts."""
    out = []
    for length in lengths:
        prompt = [[1 + i % 250 for i in range(length)]]
        attn, ffn = [], []
        for _ in range(repeats + 1):  # the first warms this length's allocations
            layers = generate(model, prompt, make_policy("resident"),
                              SamplingConfig(1, stop_at_eos=False)).steps[0].times.layer_phases.values()
            attn.append(statistics.mean(p["attn"] for p in layers))
            ffn.append(statistics.mean(p["ffn"] for p in layers))
        out.append((float(length), statistics.median(attn[1:]), statistics.median(ffn[1:])))
    return out


def decode_blocks(model: Transformer, batches: tuple[int, ...], steps: int
                  ) -> list[tuple[float, float, float, float]]:
    """(rows, FFN seconds, seconds per all-reduce, host seconds) per layer of the executor's own decode steps of
    `block_model` (resident, a 64-token prompt per sequence): its weights streamed from memory between
    the layer's other ops, which on this project's CPU took 1.06x the back-to-back projections' time
    at 1 and 4 rows and 0.83x at 16 (rank 0 of two's shard, between its all-reduces: 1.24x and 1.30x
    at 1 row); a rank's shard all-reduces twice a layer (0 unsharded). Host seconds: the step's time
    outside every timed phase over its layers (the layers' Python and the timing itself; on this
    project's CPU 57-61 us a layer here and 53-58 in SmolLM2's decode, against 30 in the tiny model
    whose steps measure the launch overhead: a model whose weights stream through the caches slows
    the host's own work too). The mean over the layers, the median over `steps` decode steps."""
    out = []
    for batch in batches:
        run = generate(model, [[1 + i % 250 for i in range(64)]] * batch, make_policy("resident"),
                       SamplingConfig(steps + 2, stop_at_eos=False))
        layers = [r.times.layer_phases.values() for r in run.steps[2:]]  # after one warm-up step
        ffn = [statistics.mean(p["ffn"] for p in step) for step in layers]
        comm = [statistics.mean(p.get("comm", 0.0) for p in step) / 2 for step in layers]
        host = [(r.times.wall_s - sum(r.times.step_phases.values()) - sum(sum(p.values()) for p in step))
                / len(step) for r, step in zip(run.steps[2:], layers, strict=True)]
        out.append((float(batch), statistics.median(ffn), statistics.median(comm), statistics.median(host)))
    return out
