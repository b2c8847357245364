"""A Transformer from a state dict (our tensor names) or random weights, materialised once on the
target device (built on the meta device first, so weights are never held twice)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.executor.kvcache import check_fits
from infinisim.executor.model import Transformer, rope_inv_freq
from infinisim.traces.spec import ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    source: str  # what the weights came from: a path, or "random"


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
