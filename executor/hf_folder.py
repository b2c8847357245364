"""Models from Hugging Face folders (config.json + *.safetensors + tokenizer.json). Every
config.json value is read typed, and every one the forward pass does not implement is refused."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text
from infinisim.executor.kvcache import check_fits
from infinisim.executor.tokenizer import tokenizer_from_file
from infinisim.executor.weights import LoadedModel, materialize
from infinisim.traces.spec import ModelSpec

_HF_LLAMA_NAMES = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
_HF_OPT_NAMES = {
    "self_attn_layer_norm": "attention_norm", "final_layer_norm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.out_proj": "attention.wo", "fc1": "feed_forward.fc1", "fc2": "feed_forward.fc2",
}


def spec_from_hf_config(cfg: object, path: Path) -> ModelSpec:
    """A ModelSpec from an HF config.json, refusing (one line: file and field) every value the
    forward pass does not implement, so a model is never run silently wrong."""
    if not isinstance(cfg, dict):
        raise InfinisimError("config.json must be a JSON object", path)
    read = _ConfigReader(cfg, path)
    kind = read.text("model_type")
    name = path.parent.name.lower()
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(read.ids("eos_token_id")) if eos is not None else ()
    bos = read.whole("bos_token_id", None, low=0)
    if kind == "opt":
        read.refuse("do_layer_norm_before", lambda v: v is False, "post-layer-norm OPT (opt-350m)")
        read.refuse("word_embed_proj_dim", lambda v: v != cfg.get("hidden_size"), "a projected embedding (opt-350m)")
        read.refuse("enable_bias", lambda v: v is False, "OPT without biases")
        read.refuse("layer_norm_elementwise_affine", lambda v: v is False, "layer norms without weights")
        read.refuse("_remove_final_layer_norm", lambda v: v is True, "OPT without its final layer norm")
        hidden, heads = read.whole("hidden_size"), read.whole("num_attention_heads")
        activation = read.text("activation_function", "relu")
        if activation not in ("relu", "gelu"):
            raise InfinisimError(f"activation {activation!r} is not implemented (relu, gelu)", path,
                                 "activation_function")
        return read.spec(name, "opt", read.whole("num_hidden_layers"), hidden, heads, heads, hidden // heads,
                         read.whole("ffn_dim"), read.whole("vocab_size"),
                         max_positions=read.whole("max_position_embeddings"), activation=activation,
                         tie_embeddings=read.flag("tie_word_embeddings", True), bos_token_id=bos,
                         eos_token_ids=eos_ids)
    if kind not in ("llama", "mistral", "qwen2"):
        raise InfinisimError(f"{kind!r} is not supported (llama, mistral, qwen2, opt)", path, "model_type")
    read.refuse("hidden_act", lambda v: v != "silu", "an activation other than silu")
    read.refuse("mlp_bias", lambda v: v is True, "biases in the MLP")
    read.refuse("partial_rotary_factor", lambda v: v != 1, "rotary embeddings on part of the head")
    if kind != "qwen2":  # Llama's attention_bias also puts a bias on the output projection
        read.refuse("attention_bias", lambda v: v is True, "attention biases (with an output bias)")
    window = read.whole("sliding_window", None)
    if kind == "qwen2" and not read.flag("use_sliding_window", False):
        window = None
    hidden, heads = read.whole("hidden_size"), read.whole("num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise InfinisimError(f"must be an object, got {rope!r}", path, "rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default", "linear", "llama3"):
        raise InfinisimError(f"rope scaling {rope_type!r} is not implemented (default, linear, llama3)", path,
                             "rope_scaling")
    return read.spec(
        name, "llama", read.whole("num_hidden_layers"), hidden, heads, read.whole("num_key_value_heads", heads),
        read.whole("head_dim", hidden // heads), read.whole("intermediate_size"), read.whole("vocab_size"),
        max_positions=read.whole("max_position_embeddings", 4096), norm_eps=read.number("rms_norm_eps", 1e-6),
        rope_base=read.number("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=None if rope_type in (None, "default") else dict(rope),
        qkv_bias=read.flag("attention_bias", kind == "qwen2"), tie_embeddings=read.flag("tie_word_embeddings", False),
        bos_token_id=bos, eos_token_ids=eos_ids, sliding_window=window)


_REQUIRED = object()


class _ConfigReader:
    """Typed reads of config.json fields: each bad value is one line naming the file and field."""

    def __init__(self, cfg: dict, path: Path):
        self.cfg, self.path = cfg, path

    def _get(self, key: str, default: object) -> object:
        if key not in self.cfg or self.cfg[key] is None:
            if default is _REQUIRED:
                raise InfinisimError("missing field" if key not in self.cfg else "missing value (null)", self.path,
                                     key)
            return default
        return self.cfg[key]

    def whole(self, key: str, default: object = _REQUIRED, low: int = 1) -> int:
        value = self._get(key, default)
        if value is None:
            return value  # an optional field left out
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise InfinisimError(f"must be a whole number, got {value!r}", self.path, key)
        if value < low:
            raise InfinisimError(f"must be at least {low}, got {value!r}", self.path, key)
        return int(value)

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise InfinisimError(f"must be a positive number, got {value!r}", self.path, key)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise InfinisimError(f"must be true or false, got {value!r}", self.path, key)
        return value

    def text(self, key: str, default: object = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise InfinisimError(f"must be a string, got {value!r}", self.path, key)
        return value

    def ids(self, key: str) -> list[int]:
        value = self.cfg[key]
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise InfinisimError(f"must be a token id or a list of them, got {value!r}", self.path, key)
        return values

    def refuse(self, key: str, unsupported: Callable[[object], bool], what: str) -> None:
        if key in self.cfg and self.cfg[key] is not None and unsupported(self.cfg[key]):
            raise InfinisimError(f"{what} is not implemented ({key} = {self.cfg[key]!r})", self.path, key)

    def spec(self, *args: object, **kwargs: object) -> ModelSpec:
        try:
            return ModelSpec(*args, **kwargs)
        except ValueError as exc:  # query heads not a multiple of KV heads, or fewer dims than heads
            message = str(exc).split(": ", 1)[-1]
            raise InfinisimError(message, self.path, "num_key_value_heads" if "KV heads" in message
                                 else "hidden_size") from None


def _hf_file_name(ours: str, family: str) -> str:
    """The name an HF checkpoint gives our tensor `ours` (for naming a tensor it lacks)."""
    prefix = "model.decoder." if family == "opt" else "model."
    table = {v: k for k, v in (_HF_OPT_NAMES if family == "opt" else _HF_LLAMA_NAMES).items()}
    fixed = {"tok_embeddings.weight": "embed_tokens.weight", "pos_embeddings.weight": "embed_positions.weight",
             "norm.weight": "final_layer_norm.weight" if family == "opt" else "norm.weight",
             "norm.bias": "final_layer_norm.bias"}
    if ours == "output.weight":
        return "lm_head.weight"
    if ours in fixed:
        return prefix + fixed[ours]
    _, layer, rest = ours.split(".", 2)
    module, _, kind = rest.rpartition(".")
    return f"{prefix}layers.{layer}.{table.get(module, module)}.{kind}"


def _hf_name(name: str, family: str) -> str | None:
    """Our name for an HF tensor name, or None for tensors we do not use (rotary caches)."""
    for prefix in ("model.decoder.", "decoder.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    table = _HF_OPT_NAMES if family == "opt" else _HF_LLAMA_NAMES
    fixed = {"embed_tokens.weight": "tok_embeddings.weight", "embed_positions.weight": "pos_embeddings.weight",
             "norm.weight": "norm.weight", "final_layer_norm.weight": "norm.weight",
             "final_layer_norm.bias": "norm.bias", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        module, _, kind = rest.rpartition(".")
        if module in table:
            return f"layers.{layer}.{table[module]}.{kind}"
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name  # left as is: materialize() reports it as unexpected


def load_hf_folder(folder: Path, dtype: str, device: torch.device) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.exists():
        raise InfinisimError("no config.json: not a Hugging Face model folder", folder)
    try:
        cfg = json.loads(read_text(config_path, "config.json"))
    except json.JSONDecodeError as exc:
        raise InfinisimError(f"malformed JSON ({exc})", config_path) from None
    spec = spec_from_hf_config(cfg, config_path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InfinisimError("no *.safetensors weights", folder)
    check_fits(f"{spec.name} weights in {dtype}", spec.weight_bytes(dtype), device)
    state: dict[str, Tensor] = {}
    file_names: dict[str, str] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise InfinisimError(f"not a safetensors file ({exc})", file) from None
        for name, tensor in tensors.items():
            ours = _hf_name(name, spec.family)
            if ours is not None:
                state[ours], file_names[ours] = tensor, name
    if "output.weight" not in state and not spec.tie_embeddings:
        spec = replace(spec, tie_embeddings=True)
    tok_file = folder / "tokenizer.json"
    tokenizer = tokenizer_from_file(tok_file) if tok_file.exists() else None
    return LoadedModel(materialize(spec, state, dtype, device, str(folder), file_names,
                                   lambda ours: _hf_file_name(ours, spec.family)), tokenizer, str(folder))
