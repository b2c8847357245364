"""An executor session: the device, the loaded model, the prompts, runs through policies, traces
written under one naming scheme. What `run`, `validate` and `reproduce paper` have in common."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import Generation, SamplingConfig, StepRecord
from infinisim.executor.kvcache import TIMING_ONLY, Measurement, check_fits
from infinisim.executor.link import EmulatedLink
from infinisim.executor.loaders import LoadedModel, load_model
from infinisim.executor.parallel import shard_model
from infinisim.executor.prompts import bundled_text, text_windows
from infinisim.executor.recording import run_policy
from infinisim.executor.weight_stream import WeightStream, share_to_fit
from infinisim.hwprofiles.emulated import LinkSpec
from infinisim.traces.spec import ModelSpec, Shard
from infinisim.traces.trace import Trace, trace_filename, write_trace


def pick_device(name: str | None) -> torch.device:
    """The device asked for, or CUDA when present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InfinisimError("no CUDA device is available", field="--device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Prompts:
    tokens: list[list[int]]  # per sequence
    forced: list[list[int]] | None  # teacher forcing: per sequence, the tokens that follow
    source: str  # where the text came from, for the trace

    @property
    def longest(self) -> int:
        return max(map(len, self.tokens))


def check_shape(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, dtype: str, device: torch.device
                ) -> None:
    """Refuse, before any prompt is drawn or cache allocated, a run the model cannot hold (beyond its
    positions) or the machine cannot (its KV cache alone is larger than the memory available)."""
    capacity = prompt_len + gen_len
    if capacity > spec.max_positions:
        raise InfinisimError(f"prompt + generation = {capacity} positions is beyond {spec.name}'s "
                             f"{spec.max_positions}", field="--prompt-len")
    if spec.sliding_window is not None and capacity > spec.sliding_window:
        raise InfinisimError(f"{spec.name} attends within a sliding window of {spec.sliding_window} positions, which "
                             f"the forward pass does not implement: keep prompt + generation within it "
                             f"({capacity} asked)", field="--prompt-len")
    check_fits(f"a KV cache of {batch} x {capacity} positions", batch * capacity * spec.kv_bytes_per_token(dtype),
               device)


class Session:
    """One model loaded once; prompts drawn with its tokenizer; runs written as traces."""

    def __init__(self, model: str, dtype: str = "float32", device: str | None = None, random_weights: bool = False,
                 log: Callable[[str], None] = lambda _: None, link: LinkSpec | None = None,
                 weights_on_host: float | str = 0.0, shard: tuple[int, int] | None = None):
        """weights_on_host: the share of every block's weights streamed from host memory (FlexGen's
        weight offloading, executor/weight_stream.py), or "auto" (the smallest that fits the device).
        shard: (degree, rank) of tensor parallelism, inside a process group (executor/parallel.py):
        this process holds and runs its rank's share."""
        self.device = pick_device(device)
        if link is not None and self.device.type == "cuda":
            raise InfinisimError("an emulated link is for CPU runs: on CUDA the copies cross the real one",
                                 field="--link")
        self.link = EmulatedLink(link) if link is not None else None
        streamed = weights_on_host == "auto" or weights_on_host > 0
        sharded = shard is not None and shard[0] > 1
        # loaded on the CPU when the device is to hold only a part: it never holds the whole model
        load_on = torch.device("cpu") if streamed or sharded else self.device
        log(f"loading {model}{' (random weights)' if random_weights else ''} on {load_on.type} in {dtype} ...")
        self.loaded: LoadedModel = load_model(model, dtype, load_on, random_weights)
        self.name, self.spec, self.tokenizer = model, self.loaded.model.spec, self.loaded.tokenizer
        self.dtype = dtype
        self.shard: Shard | None = None
        if sharded:
            import torch.distributed as dist

            self.shard = Shard.of(self.spec, *shard)
            self.loaded.model = shard_model(self.loaded.model, self.shard, dist.group.WORLD)
        local = self.loaded.model.spec  # this process's part of the model
        share = share_to_fit(local, dtype, self.device) if weights_on_host == "auto" else float(weights_on_host)
        self.weights: WeightStream | None = None
        if share > 0:  # the stream moves the device's part there
            self.weights = WeightStream(self.loaded.model, share, self.device, self.link)
            log(f"weights: {self.weights.info.share:.0%} of every block in host memory "
                f"({self.weights.info.bytes_per_block / 1e6:.1f} MB a block streamed, one layer ahead)")
        else:
            self.loaded.model.to(self.device)

    def check(self, batch: int, prompt_len: int, gen_len: int) -> None:
        check_shape(self.spec, batch, prompt_len, gen_len, self.dtype, self.device)

    def prompts(self, batch: int, prompt_len: int | None = None, text: str | None = None, gen_len: int = 0,
                forced: bool = False, source: str = "text", field: str = "--prompt") -> Prompts:
        """`batch` prompts for a run of `gen_len` new tokens, each followed by those tokens to
        teacher-force when `forced`. With `text` and no `prompt_len`: all of the text (the last
        gen_len tokens forced); with `prompt_len`: windows of prompt_len (+ gen_len forced) tokens
        from `text` (default: Python's bundled docs), a different one per sequence."""
        if self.tokenizer is None:
            raise InfinisimError("this model has no tokenizer to make a prompt with: give a model with a "
                                 "tokenizer.json, or a named model with --random-weights", field=field)
        forced_len = gen_len if forced else 0
        if prompt_len is None:
            if text is None:
                raise InfinisimError("give a prompt text or a prompt length", field=field)
            ids = [t % self.spec.vocab_size for t in self.tokenizer.encode(text).ids]
            if len(ids) <= forced_len:
                raise InfinisimError(f"the text has {len(ids)} tokens: --quality needs more than --gen-len "
                                     f"({forced_len})" if forced_len else "the prompt has no tokens", field=field)
            self.check(batch, len(ids) - forced_len, gen_len)
            windows = [ids] * batch
        else:
            self.check(batch, prompt_len, gen_len)
            windows = text_windows(self.tokenizer, bundled_text() if text is None else text, batch,
                                   prompt_len + forced_len, self.spec.vocab_size, wrap=text is None)
            if windows is None:
                raise InfinisimError(f"the text is shorter than {batch} x {prompt_len + forced_len} tokens "
                                     "(prompt + forced)", field=field)
            source = "pydoc_data" if text is None else source
        split = [len(w) - forced_len for w in windows]
        return Prompts([w[:n] for w, n in zip(windows, split, strict=True)],
                       [w[n:] for w, n in zip(windows, split, strict=True)] if forced_len else None, source)

    def run(self, policy: str, prompts: Prompts, sampling: SamplingConfig, knobs: dict[str, object] | None = None,
            measure: Measurement = TIMING_ONLY, command: str = "",
            on_step: Callable[[StepRecord], None] | None = None) -> tuple[Generation, Trace]:
        """Decode the prompts through one policy; the trace is described, not yet written."""
        if prompts.forced is not None:
            measure = replace(measure, forced=prompts.forced)
        run_info = {"model": self.name, "weights": self.loaded.source, "prompt_source": prompts.source,
                    "command": command, **(self.weights.info.to_dict() if self.weights is not None else {}),
                    **({"tp": self.shard.to_dict()} if self.shard is not None else {})}
        return run_policy(self.loaded.model, prompts.tokens, policy, sampling, run_info, on_step, knobs, measure,
                          self.link)

    def write(self, trace: Trace, out: str | Path, file: str | Path | None = None,
              knobs: dict[str, object] | None = None) -> Path:
        """The trace as `file`, or in folder `out` under its standard name (which names the knobs given)."""
        return write_trace(trace, file or Path(out) / trace_filename(trace, knobs))
