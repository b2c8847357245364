"""Prompt sources that need no download: text given by the user, or English that ships with Python."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from infinisim.core.errors import InfinisimError
from infinisim.core.files import read_text


def bundled_text() -> str:
    """~465 KB of English: Python's own documentation topics (pydoc_data, part of the stdlib)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_prompt_file(path: str | Path) -> str:
    return read_text(path, "prompt file")


def text_windows(tokenizer: Tokenizer, text: str, batch: int, length: int, vocab_size: int, wrap: bool = True
                 ) -> list[list[int]] | None:
    """`batch` consecutive windows of `length` tokens from the start of `text`; when the text is too
    short, wrapping around (or None, with wrap=False).

    Ids are folded into `vocab_size` so random-weight models with smaller vocabularies can use them.
    """
    if length < 1:
        raise InfinisimError(f"prompt length must be at least 1 token, got {length}")
    need = batch * length
    chars = min(len(text), need * 6 + 1000)
    ids = tokenizer.encode(text[:chars]).ids
    if len(ids) < need and chars < len(text):
        ids = tokenizer.encode(text).ids
    if len(ids) < need and not wrap:
        return None
    while ids and len(ids) < need:
        ids = ids + ids
    return [[t % vocab_size for t in ids[b * length:(b + 1) * length]] for b in range(batch)] if ids else None


def bundled_prompts(tokenizer: Tokenizer, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    """`batch` different windows of `length` tokens from the bundled text (wrapping around if needed)."""
    windows = text_windows(tokenizer, bundled_text(), batch, length, vocab_size)
    assert windows is not None  # the bundled text is never empty
    return windows


NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


def needle_prompt(tokenizer: Tokenizer, context_tokens: int, depth: float, key: str, offset: int = 0) -> list[int]:
    """A passkey-retrieval prompt of `context_tokens` tokens: Python's documentation as filler
    (starting `offset` tokens in), the key sentence at `depth` (0 = start, 1 = end), a question last."""
    if not 0 <= depth <= 1:
        raise InfinisimError(f"needle depth must be in [0, 1], got {depth}")
    needle = tokenizer.encode(NEEDLE.format(key=key)).ids
    question = tokenizer.encode(QUESTION).ids
    n_fill = context_tokens - len(needle) - len(question)
    if n_fill < 1:
        raise InfinisimError(f"context of {context_tokens} tokens is too short for the needle and question")
    text = bundled_text()
    filler = tokenizer.encode(text[:(offset + n_fill) * 6 + 1000]).ids[offset:offset + n_fill]
    cut = round(len(filler) * depth)
    return filler[:cut] + needle + filler[cut:] + question
