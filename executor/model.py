"""One transformer forward for the Llama family (RoPE, RMSNorm, SwiGLU, GQA) and OPT.

The attention layer does not own a KV cache: it hands its new K/V rows to the run's KV policy,
which decides where they live and which rows come back to attend over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from infinisim.traces.spec import ModelSpec

if TYPE_CHECKING:
    from infinisim.executor.timing import Recorder

OPT_POSITION_OFFSET = 2  # OPT's learned position table reserves two leading rows


class KVPolicy(Protocol):
    """What the model needs from a KV policy (see executor/policies/base.py)."""

    def on_attention_start(self, layer: int, residual: Tensor, step: Step) -> None:
        """Called before the layer's attention with the layer's input (the residual stream)."""
        ...

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step, mix: Mix) -> Tensor:
        """Store the new rows and attend: `mix` over the rows the policy chose (its `attend_kv`, see
        executor/policies/base.py). Returns the heads' outputs [batch, seq, heads * head_dim]."""
        ...


class Mix(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor) -> Tensor:
        """Attention of q over k, v where key_valid ([batch, 1 or kv_heads, n_keys]; the last
        `n_new` keys the new rows, in order, for the causal mask) -> [batch, seq, heads * head_dim]."""
        ...


@dataclass
class Step:
    """What one forward call writes: rows [start, start + n_new) of every sequence. The prefill
    writes the whole prompt (start 0); each decode step one row."""

    index: int
    start: int
    n_new: int
    valid: Tensor  # bool [batch, start + n_new]: False for left padding
    policy: KVPolicy
    recorder: Recorder
    rope: tuple[Tensor, Tensor] | None = None  # this step's (cos, sin), set by the model; None for OPT
    prefill: bool = False  # the prompt (policies' prefill_kv), else a decode step (decode_kv)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """As transformers' Llama: normalised in float32, cast back, then scaled (one fused op in float32)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(spec: ModelSpec) -> Tensor:
    inv_freq = 1.0 / (spec.rope_base ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
    scaling = spec.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind != "llama3":
        raise ValueError(f"model {spec.name}: unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled).float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        opt = spec.family == "opt"
        hd = spec.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, hd
        self.wq = nn.Linear(spec.hidden, spec.n_heads * hd, bias=opt or spec.qkv_bias)
        self.wk = nn.Linear(spec.hidden, spec.n_kv_heads * hd, bias=opt or spec.qkv_bias)
        self.wv = nn.Linear(spec.hidden, spec.n_kv_heads * hd, bias=opt or spec.qkv_bias)
        self.wo = nn.Linear(spec.n_heads * hd, spec.hidden, bias=opt)

    def project_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor) -> Tensor:
        """The heads' outputs, before the output projection (see `Mix`)."""
        bsz, _, seqlen, _ = q.shape
        n_keys = k.shape[2]
        mask = key_valid.repeat_interleave(self.n_heads // key_valid.shape[1], dim=1) if key_valid.shape[1] > 1 \
            else key_valid
        mask = mask[:, :, None, :]  # [batch, heads or 1, 1, keys]
        if seqlen > 1:
            # Query t sits at key position n_keys - seqlen + t; it sees keys up to there, and always
            # itself, so a left-pad query row is never fully masked (its output is unused).
            key_pos = torch.arange(n_keys, device=q.device)
            query_pos = key_pos[n_keys - seqlen:, None]
            mask = (mask & (key_pos <= query_pos)) | (key_pos == query_pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return out.transpose(1, 2).reshape(bsz, seqlen, -1)


class SwiGLU(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w1 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(spec.ffn_hidden, spec.hidden, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden, spec.ffn_hidden)
        self.fc2 = nn.Linear(spec.ffn_hidden, spec.hidden)
        self.act = {"relu": F.relu, "gelu": F.gelu}[spec.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def make_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden, eps=spec.norm_eps) if spec.family == "opt" else RMSNorm(spec.hidden, spec.norm_eps)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.index = index
        self.attention_norm = make_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = make_norm(spec)
        self.feed_forward = MLP(spec) if spec.family == "opt" else SwiGLU(spec)
        self.group: ProcessGroup | None = None  # tensor parallelism: the ranks whose partial outputs are summed

    def reduced(self, partial: Tensor, rec: Recorder) -> Tensor:
        """Tensor parallelism: the sum over ranks of a row-parallel output (timed as "comm")."""
        if self.group is not None:
            with rec.span(self.index, "comm"):
                dist.all_reduce(partial, group=self.group)
        return partial

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, step: Step) -> Tensor:
        i, rec, policy = self.index, step.recorder, step.policy
        policy.on_attention_start(i, x, step)
        with rec.span(i, "attn"):
            q, k_new, v_new = self.attention.project_qkv(self.attention_norm(x), rope)
        mixed = policy.attend(i, q, k_new, v_new, step, self.attention.mix)
        with rec.span(i, "attn"):
            out = self.attention.wo(mixed)
        x = x + self.reduced(out, rec)
        with rec.span(i, "ffn"):
            out = self.feed_forward(self.ffn_norm(x))
        return x + self.reduced(out, rec)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.max_positions + OPT_POSITION_OFFSET, spec.hidden) \
            if spec.family == "opt" else None
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.n_layers))
        self.norm = make_norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(spec) if spec.family == "llama" else torch.empty(0),
                             persistent=False)

    def forward(self, tokens: Tensor, positions: Tensor, step: Step, last_only: bool = True) -> Tensor:
        """tokens, positions: [batch, seq]. Returns float32 logits of the last (or every) position."""
        rec = step.recorder
        with rec.span(None, "embed"):
            x = self.tok_embeddings(tokens)
            rope = None
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(positions + OPT_POSITION_OFFSET)
            else:
                angles = positions[..., None].float() * self.inv_freq
                emb = torch.cat((angles, angles), dim=-1)
                rope = (emb.cos(), emb.sin())
        step.rope = rope
        for block in self.layers:
            x = block(x, rope, step)
        with rec.span(None, "head"):
            if last_only:
                x = x[:, -1:]
            logits = self.output(self.norm(x)).float()
        return logits
