"""Prefill and decode a batch through a KV policy, timing every step: the executor's main loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.executor.kvcache import TIMING_ONLY, Measurement, PolicyContext
from infinisim.executor.link import EmulatedLink
from infinisim.executor.model import Step, Transformer
from infinisim.executor.policies import Policy
from infinisim.executor.timing import Recorder, Timings


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InfinisimError(f"generation length must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InfinisimError(f"must be a finite number >= 0, got {self.temperature}", field="--temperature")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise InfinisimError(f"must be in (0, 1], got {self.top_p}", field="--top-p")


@dataclass
class StepRecord:
    index: int
    phase: str  # "prefill" or "decode"
    n_new: int  # positions written by this step, per sequence
    kv_len: int  # positions in the cache after this step (padded batch)
    times: Timings
    nll: float | None = None  # teacher forcing: mean negative log-likelihood of the forced tokens


@dataclass
class Generation:
    new_tokens: list[list[int]]  # per sequence, up to and including EOS
    prompt_lens: list[int]
    steps: list[StepRecord] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)  # per step [batch, vocab], when asked for


def sample(logits: Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> Tensor:
    """logits: [batch, vocab] float32 -> [batch] token ids."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > cfg.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate(model: Transformer, prompts: list[list[int]], policy: Policy, cfg: SamplingConfig,
             on_step: Callable[[StepRecord], None] | None = None, measure: Measurement = TIMING_ONLY,
             link: EmulatedLink | None = None) -> Generation:
    """Left-pads the prompts into one batch, prefills, then decodes one token per step.

    With `measure.forced` (teacher forcing): per sequence, the tokens to feed instead of sampled
    ones, one per step (its length caps the steps); selection and fetching happen exactly as in
    generation, and each step's negative log-likelihood of the forced token is recorded.
    With `link` (CPU only), host<->device copies cross an emulated link (executor/link.py).
    """
    spec = model.spec
    device = model.tok_embeddings.weight.device
    forced = measure.forced
    if not prompts or any(not p for p in prompts):
        raise InfinisimError("every prompt needs at least one token")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if forced is not None:
        if len(forced) != batch or len({len(f) for f in forced}) != 1 or not forced[0]:
            raise InfinisimError("teacher forcing needs one non-empty continuation per prompt, all the same length")
        cfg = SamplingConfig(min(cfg.max_new_tokens, len(forced[0])), stop_at_eos=False)
        forced_tokens = torch.tensor(forced, device=device)
    capacity = longest + cfg.max_new_tokens
    if spec.family == "opt" and capacity > spec.max_positions:
        raise InfinisimError(f"prompt + generation = {capacity} positions exceeds {spec.name}'s learned "
                             f"position table ({spec.max_positions})")
    if max(max(p) for p in prompts) >= spec.vocab_size:
        raise InfinisimError(f"a prompt token id is outside {spec.name}'s vocabulary ({spec.vocab_size})")

    tokens = torch.zeros(batch, longest, dtype=torch.long)
    valid = torch.ones(batch, capacity, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, longest - len(p):] = torch.tensor(p)
        valid[b, :longest - len(p)] = False
    tokens, valid = tokens.to(device), valid.to(device)
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)

    if link is not None and device.type == "cuda":
        raise InfinisimError("an emulated link is for CPU runs: on CUDA the copies cross the real one", field="--link")
    policy.setup(PolicyContext(spec.n_layers, batch, spec.n_kv_heads, spec.head_dim, capacity,
                               model.tok_embeddings.weight.dtype, device, model, measure, link))
    recorder = Recorder(cuda=device.type == "cuda", drain=link.drain if link is not None else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    eos = torch.tensor(spec.eos_token_ids or [-1], device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[Tensor] = []
    result = Generation([], [len(p) for p in prompts])

    def next_token(index: int, logits: Tensor) -> Tensor:
        with recorder.span(None, "head"):
            if forced is not None:
                return forced_tokens[:, index]
            chosen = sample(logits[:, -1], cfg, gen)
            return torch.where(finished, eos[0].clamp(min=0), chosen)

    with torch.inference_mode():
        for index in range(cfg.max_new_tokens):
            recorder.begin()
            if index == 0:
                logits = prefill(model, tokens, positions, valid, policy, recorder)
            else:  # the token sampled last step sits at cache position longest + index - 1
                logits = decode_one(model, index, longest + index - 1, tokens, positions, valid, policy, recorder)
            token = next_token(index, logits)
            record = StepRecord(index, "prefill" if index == 0 else "decode", tokens.shape[1], longest + index,
                                recorder.finish())
            if forced is not None:
                log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
                record.nll = -log_probs.gather(-1, token[:, None]).mean().item()
            result.steps.append(record)
            if measure.keep_logits:
                result.logits.append(logits[:, -1])
            if on_step is not None:
                on_step(record)
            out.append(token)
            if cfg.stop_at_eos:
                finished |= torch.isin(token, eos)
                if bool(finished.all()):
                    break
            tokens, positions = token[:, None], positions[:, -1:] + 1

    generated = torch.stack(out, dim=1).tolist()
    eos_ids = set(spec.eos_token_ids)
    for row in generated:
        cut = next((i + 1 for i, t in enumerate(row) if cfg.stop_at_eos and t in eos_ids), len(row))
        result.new_tokens.append(row[:cut])
    return result


def prefill(model: Transformer, tokens: Tensor, positions: Tensor, valid: Tensor, policy: Policy,
            recorder: Recorder, last_only: bool = True) -> Tensor:
    """The whole (left-padded) prompt [B, T] in one forward: each layer's rows [0, T) go to the
    policy's `prefill_kv`. Returns float32 logits of the last (or every) position."""
    step = Step(0, 0, tokens.shape[1], valid[:, :tokens.shape[1]], policy, recorder, prefill=True)
    return model(tokens, positions, step, last_only)


def decode_one(model: Transformer, index: int, start: int, token: Tensor, position: Tensor, valid: Tensor,
               policy: Policy, recorder: Recorder) -> Tensor:
    """Decode step `index`: each sequence's newest token [B, 1] at cache position `start`; each
    layer's one new row goes to the policy's `decode_kv`. Returns float32 logits [B, 1, vocab]."""
    step = Step(index, start, 1, valid[:, :start + 1], policy, recorder, prefill=False)
    return model(token, position, step)


def prefill_logits(model: Transformer, tokens: list[int], policy: Policy) -> Tensor:
    """float32 logits of every position of one prompt (for perplexity and reference checks)."""
    device = model.tok_embeddings.weight.device
    spec = model.spec
    policy.setup(PolicyContext(spec.n_layers, 1, spec.n_kv_heads, spec.head_dim, len(tokens),
                               model.tok_embeddings.weight.dtype, device, model))
    recorder = Recorder(cuda=device.type == "cuda")
    recorder.begin()
    with torch.inference_mode():
        logits = prefill(model, torch.tensor([tokens], device=device), torch.arange(len(tokens), device=device)[None],
                         torch.ones(1, len(tokens), dtype=torch.bool, device=device), policy, recorder,
                         last_only=False)
    recorder.finish()
    return logits[0]
