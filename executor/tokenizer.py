"""Tokenizers from a GGUF vocabulary or a tokenizer.json, both as `tokenizers.Tokenizer`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from infinisim.core.errors import InfinisimError

GGUF_CONTROL = 3  # llama.cpp token type of special/control tokens


def tokenizer_from_gguf(fields: dict, path: Path) -> Tokenizer:
    """Byte-level BPE (GGUF tokenizer model "gpt2", as SmolLM2, Qwen2, Llama-3 use)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InfinisimError(f"tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
                             "pass an HF folder with tokenizer.json instead", path, "tokenizer.ggml.model")
    tokens = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if fields.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        # these split digits one by one before the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([t for t, kind in zip(tokens, types, strict=False) if kind == GGUF_CONTROL])
    return tok


def tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise InfinisimError(f"not a valid tokenizer.json ({str(exc).splitlines()[0]})", path) from None
