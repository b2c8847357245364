"""Turning a finished generation into a trace (the executor's side of the contract)."""

from __future__ import annotations

import datetime
import platform
import sys
from collections.abc import Callable

import pandas as pd
import torch

from infinisim.executor.generate import Generation, SamplingConfig, StepRecord, generate
from infinisim.executor.kvcache import TIMING_ONLY, Measurement
from infinisim.executor.link import EmulatedLink
from infinisim.executor.machine import cpu_name
from infinisim.executor.model import Transformer
from infinisim.executor.policies import make_policy
from infinisim.traces.spec import ModelSpec
from infinisim.traces.trace import LAYER_COLUMNS, LIST_COLUMNS, Trace


def environment(device: torch.device) -> dict[str, object]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device_name": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def trace_from_generation(gen: Generation, spec: ModelSpec, run: dict[str, object], device: torch.device) -> Trace:
    steps, rows = [], []
    for record in gen.steps:
        t = record.times
        steps.append({"step": record.index, "phase": record.phase, "n_new": record.n_new, "kv_len": record.kv_len,
                      "wall_s": t.wall_s, "embed_s": t.step_phases.get("embed", 0.0),
                      "head_s": t.step_phases.get("head", 0.0), "nll": record.nll,
                      "evicted": t.step_counts.get("evicted", 0)})
        for layer in range(spec.n_layers):
            row = {name: [] if name in LIST_COLUMNS else 0 for name in LAYER_COLUMNS}
            row.update(step=record.index, layer=layer)
            row.update(t.layer_counts.get(layer, {}))
            row["copies"] = t.copies.get(layer, [])
            row["done_s"] = t.done.get(layer, 0.0)
            row.update({f"{phase}_s": seconds for phase, seconds in t.layer_phases.get(layer, {}).items()})
            rows.append(row)
    layers = pd.DataFrame(rows, columns=list(LAYER_COLUMNS)).astype(
        {name: ("float64" if dtype == "double" else str(dtype)) for name, dtype in LAYER_COLUMNS.items()
         if name not in LIST_COLUMNS})
    return Trace(spec, run, environment(device), pd.DataFrame(steps), layers)


def run_policy(model: Transformer, prompts: list[list[int]], policy_name: str, sampling: SamplingConfig,
               run_info: dict[str, object], on_step: Callable[[StepRecord], None] | None = None,
               knobs: dict[str, object] | None = None, measure: Measurement = TIMING_ONLY,
               link: EmulatedLink | None = None) -> tuple[Generation, Trace]:
    """Generate through one policy and describe the run as a trace (not yet written). `measure`
    says what else to measure: teacher forcing (each step's NLL), quality, the fetched positions."""
    policy = make_policy(policy_name, **(knobs or {}))
    gen = generate(model, prompts, policy, sampling, on_step, measure, link)
    device = model.tok_embeddings.weight.device
    run = {
        **run_info,
        "policy": policy.name,
        "policy_knobs": policy.settings(),
        "batch": len(prompts),
        "prompt_lens": gen.prompt_lens,
        "gen_len": sampling.max_new_tokens,
        "new_tokens": [len(t) for t in gen.new_tokens],
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "device": device.type,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
                     "stop_at_eos": sampling.stop_at_eos},
        "teacher_forced": measure.forced is not None,
        "quality": measure.quality,
        "record_selection": measure.record_selection,
        "alpha_counts_every": measure.alpha_counts_every,
        "link": link.spec.to_dict() if link is not None else None,
    }
    return gen, trace_from_generation(gen, model.spec, run, device)
