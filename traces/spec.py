"""Model specs: the architecture facts both the executor and the simulator need.

Torch-free on purpose: a planner reads traces and simulates named models without torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from infinisim.core.errors import InfinisimError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" (RoPE, RMSNorm, SwiGLU, GQA) or "opt" (learned positions, LayerNorm, ReLU)
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    max_positions: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Llama-3 style {"rope_type": "llama3", "factor": ...}
    qkv_bias: bool = False  # Qwen2; OPT has biases everywhere
    tie_embeddings: bool = False
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    sliding_window: int | None = None  # attends only the last N positions (Mistral v0.1): not implemented

    def __post_init__(self) -> None:
        if self.family not in ("llama", "opt"):
            raise ValueError(f"model {self.name}: family must be 'llama' or 'opt', got {self.family!r}")
        for name in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size",
                     "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {self.name}: {name} must be at least 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model {self.name}: {self.n_heads} query heads are not a multiple of "
                             f"{self.n_kv_heads} KV heads")

    def param_count(self) -> int:
        return self.n_layers * self.layer_param_count() + self.embedding_param_count()

    def layer_param_count(self) -> int:
        """One transformer block's parameters (what weight offloading streams, layer by layer)."""
        d, hd = self.hidden, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.family == "opt":
            attn += hd * (self.n_heads * 2 + self.n_kv_heads * 2)
            ffn = 2 * d * self.ffn_hidden + self.ffn_hidden + d
            norms = 4 * d
        else:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0
            ffn = 3 * d * self.ffn_hidden
            norms = 2 * d
        return attn + ffn + norms

    def embedding_param_count(self) -> int:
        """Embeddings, the final norm and the LM head (they stay on the device)."""
        d = self.hidden
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.family == "opt":
            return embed + (self.max_positions + 2) * d + 2 * d
        return embed + d

    def weight_bytes(self, dtype: str) -> int:
        return self.param_count() * DTYPE_BYTES[dtype]

    def layer_weight_bytes(self, dtype: str) -> int:
        return self.layer_param_count() * DTYPE_BYTES[dtype]

    @property
    def streamed_weight_tensors(self) -> int:
        """Tensors a streamed block splits (one copy each): q, k, v, o and the FFN's matrices, and each
        projection's bias where it has one; the norms stay on the device (executor/weight_stream.py)."""
        return 6 + 6 if self.family == "opt" else 4 + 3 + (3 if self.qkv_bias else 0)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """K and V of one token across all layers."""
        return self.n_layers * 2 * self.n_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def shard(self, tp: int) -> ModelSpec:
        """What one of `tp` GPUs holds under tensor parallelism (Megatron-style): its share of the query
        and KV heads (their KV with them), of the FFN's columns and of the vocabulary; the hidden size
        and the norms whole. For planning, `tp` must divide the heads (every GPU alike: rank 0's share)."""
        if tp == 1:
            return self
        if tp < 1 or self.n_heads % tp or self.n_kv_heads % tp:
            raise InfinisimError(f"{self.name} has {self.n_heads} query and {self.n_kv_heads} KV heads: tensor "
                                 f"parallelism must divide both, got {tp}", field="--tp")
        return Shard.of(self, tp, 0).spec(self)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.sliding_window is None:  # traces of models without a window read as before
            del out["sliding_window"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise KeyError(f"unknown model spec field(s): {', '.join(sorted(unknown))}")
        args = dict(data)
        args["eos_token_ids"] = tuple(args.get("eos_token_ids") or ())
        return cls(**args)


def split(n: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share of n items over `parts` ranks, the first n % parts one larger."""
    base, extra = divmod(n, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class Shard:
    """One tensor-parallel rank's share of a model: [start, end) of its KV heads (and the query heads
    that read them), of the FFN's hidden columns and of the vocabulary. Heads need not divide evenly
    (the executor's ranks: the first take one more); the simulator's GPUs are rank 0's alike."""

    tp: int
    rank: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]

    @classmethod
    def of(cls, spec: ModelSpec, tp: int, rank: int) -> Shard:
        if not 1 <= tp <= spec.n_kv_heads:
            raise InfinisimError(f"{spec.name} has {spec.n_kv_heads} KV heads: at most that many ranks, got {tp}",
                                 field="--tp")
        kv = split(spec.n_kv_heads, tp, rank)
        group = spec.n_heads // spec.n_kv_heads
        return cls(tp, rank, kv, (kv[0] * group, kv[1] * group), split(spec.ffn_hidden, tp, rank),
                   split(spec.vocab_size, tp, rank))

    def spec(self, model: ModelSpec) -> ModelSpec:
        """The rank's model as the simulator takes it (its vocabulary: its share of the head)."""
        return dataclasses.replace(model, n_heads=self.heads[1] - self.heads[0],
                                   n_kv_heads=self.kv_heads[1] - self.kv_heads[0], ffn_hidden=self.ffn[1] - self.ffn[0],
                                   vocab_size=self.vocab[1] - self.vocab[0])

    def to_dict(self) -> dict[str, object]:
        return {"degree": self.tp, "rank": self.rank, "kv_heads": list(self.kv_heads), "heads": list(self.heads),
                "ffn": list(self.ffn), "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        """As a trace's `run.tp` holds it."""
        return cls(int(data["degree"]), int(data["rank"]), *(tuple(data[k]) for k in ("kv_heads", "heads", "ffn",
                                                                                      "vocab")))


def weight_parts(spec: ModelSpec, dtype: str, on_host: float) -> tuple[dict[str, float], dict[str, float]]:
    """Device and host bytes of the weights with a share `on_host` of every block in host memory (FlexGen's
    placement, as executor/weight_stream.py runs it): the device keeps the rest and two block-sized buffers
    of the streamed share (one in use, one filling)."""
    if on_host <= 0:
        return {"weights": float(spec.weight_bytes(dtype))}, {}
    streamed = on_host * spec.n_layers * spec.layer_weight_bytes(dtype)
    return ({"weights": float(spec.weight_bytes(dtype)) - streamed,
             "weight buffers": 2 * on_host * spec.layer_weight_bytes(dtype)}, {"weights": streamed})


def weights_to_fit(spec: ModelSpec, dtype: str, on_host: float, device_bytes: float, capacity: float) -> float | None:
    """The smallest share of the weights on the host (in hundredths) that brings the device under
    `capacity`; None if even all of them do not, or when it already fits."""
    # the device side of weight_parts is linear in the share: what all of it on the host saves, per share
    saved_per_share = spec.weight_bytes(dtype) - sum(weight_parts(spec, dtype, 1.0)[0].values())
    deficit = device_bytes - capacity
    if deficit <= 0 or saved_per_share <= 0:
        return None
    share = on_host + deficit / saved_per_share
    share = math.ceil(share * 100 - 1e-9) / 100
    return share if share <= 1 else None


def _llama(name: str, n_layers: int, hidden: int, n_heads: int, n_kv_heads: int, ffn: int, vocab: int,
           **kw: Any) -> ModelSpec:
    return ModelSpec(name, "llama", n_layers, hidden, n_heads, n_kv_heads, hidden // n_heads, ffn, vocab, **kw)


def _opt(name: str, n_layers: int, hidden: int, n_heads: int, ffn: int) -> ModelSpec:
    return ModelSpec(name, "opt", n_layers, hidden, n_heads, n_heads, hidden // n_heads, ffn, 50272,
                     max_positions=2048, activation="relu", tie_embeddings=True, bos_token_id=2, eos_token_ids=(2,))


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

# Published configurations (config.json of each checkpoint).
MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, max_positions=8192, rope_base=100000.0,
           tie_embeddings=True, bos_token_id=1, eos_token_ids=(2, 0)),
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, bos_token_id=1, eos_token_ids=(2,)),
    _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, bos_token_id=1, eos_token_ids=(2,)),
    _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, max_positions=8192, rope_base=500000.0,
           bos_token_id=128000, eos_token_ids=(128001,)),
    _llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, max_positions=131072, rope_base=500000.0,
           rope_scaling=_LLAMA3_SCALING, bos_token_id=128000, eos_token_ids=(128001,)),
    _llama("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, max_positions=131072, rope_base=500000.0,
           rope_scaling=_LLAMA3_SCALING, bos_token_id=128000, eos_token_ids=(128001,)),
    _llama("mistral-7b", 32, 4096, 32, 8, 14336, 32000, max_positions=32768, bos_token_id=1, eos_token_ids=(2,)),
    _llama("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, max_positions=32768, rope_base=1000000.0,
           norm_eps=1e-6, qkv_bias=True, eos_token_ids=(151643,)),
    _opt("opt-125m", 12, 768, 12, 3072),
    _opt("opt-6.7b", 32, 4096, 32, 16384),
    _opt("opt-13b", 40, 5120, 40, 20480),
    _opt("opt-30b", 48, 7168, 56, 28672),
    _opt("opt-66b", 64, 9216, 72, 36864),
]}


# The block `calibrate` times its prompts on (the executor's own prefill, random weights, as many layers as
# the caches cannot hold): the simulator scales its prefill roofline by what this block took against its
# own roofline (`sim.costs.Costs.prefill_efficiency`). A mid-sized Llama layer, no model's own shape.
CALIBRATION_BLOCK = ModelSpec("calibration-block", "llama", n_layers=1, hidden=768, n_heads=12, n_kv_heads=4,
                              head_dim=64, ffn_hidden=2048, vocab_size=256)


def named_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise InfinisimError(f"unknown model {name!r} (known: {', '.join(MODELS)})", field="--model") from None
