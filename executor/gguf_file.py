"""Models and tokenizers from GGUF files (llama.cpp's format; weights dequantized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.executor.tokenizer import tokenizer_from_gguf
from infinisim.executor.weights import LoadedModel, materialize
from infinisim.traces.spec import ModelSpec

EOS_NAMES = {"<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>", "<|end_of_text|>"}
_GGUF_NAMES = {
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias", "attn_v.bias": "attention.wv.bias",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


def _gguf_file_name(ours: str) -> str:
    """The name a GGUF file gives our tensor `ours` (for naming a tensor it lacks)."""
    fixed = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    if ours in fixed:
        return fixed[ours]
    _, layer, rest = ours.split(".", 2)
    inverse = {v: k for k, v in _GGUF_NAMES.items()}
    return f"blk.{layer}.{inverse.get(rest, rest)}"


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (adjacent-pair rotary) back to rotate-half order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[object, dict[str, object]]:
    """The GGUF reader and its decoded metadata fields."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise InfinisimError(f"not a GGUF model file ({str(exc).splitlines()[0][:120]})", path) from None
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a few array types cannot be decoded; we never need them
            continue
    return reader, fields


def load_gguf(path: Path, dtype: str, device: torch.device, name: str | None = None) -> LoadedModel:
    import gguf

    reader, fields = read_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise InfinisimError(f"architecture {arch!r} is not supported (llama, qwen2, mistral)", path,
                             "general.architecture")

    def meta(key: str, default: object = None) -> object:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise InfinisimError("missing metadata", path, f"{arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise InfinisimError("per-frequency rope factors (rope_freqs) are not supported", path, "rope_freqs.weight")
    tokenizer = tokenizer_from_gguf(fields, path) if "tokenizer.ggml.tokens" in fields else None
    token_names = fields.get("tokenizer.ggml.tokens") or []
    eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in fields]
    eos += [i for i, t in enumerate(token_names) if t in EOS_NAMES and i not in eos]
    n_heads, hidden = int(meta("attention.head_count")), int(meta("embedding_length"))
    n_kv_heads = int(meta("attention.head_count_kv", n_heads))
    spec = ModelSpec(
        name=name or path.stem.lower(), family="llama", n_layers=int(meta("block_count")), hidden=hidden,
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=int(meta("rope.dimension_count", hidden // n_heads)),
        ffn_hidden=int(meta("feed_forward_length")), vocab_size=int(meta("vocab_size", len(token_names) or None)),
        max_positions=int(meta("context_length")), norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_base=float(meta("rope.freq_base", 10000.0)), qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos),
    )
    state: dict[str, Tensor] = {}
    file_names: dict[str, str] = {}
    for name, t in tensors.items():
        if name == "token_embd.weight":
            ours = "tok_embeddings.weight"
        elif name == "output_norm.weight":
            ours = "norm.weight"
        elif name == "output.weight":
            ours = "output.weight"
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in _GGUF_NAMES:
                raise InfinisimError("unknown tensor", path, name)
            ours = f"layers.{layer}.{_GGUF_NAMES[rest]}"
        else:
            raise InfinisimError("unknown tensor", path, name)
        try:
            w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape([int(d) for d in reversed(t.shape)])
        except (ValueError, IndexError, TypeError, NotImplementedError) as exc:
            raise InfinisimError(f"tensor data is truncated or unreadable ({type(exc).__name__})", path, name) \
                from None
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rotary(w, n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rotary(w, n_kv_heads)
        state[ours] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: GGUF data is a read-only mmap
        file_names[ours] = name
    return LoadedModel(materialize(spec, state, dtype, device, str(path), file_names, _gguf_file_name), tokenizer,
                       str(path))
