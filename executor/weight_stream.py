"""Weight offloading as FlexGen does it: a share of every block's projection weights lives in host
memory and is copied, one block ahead of use, into one of two device buffers (block i reads buffer
i % 2 while block i+1's rows arrive in the other), overlapped with compute.

Each projection (q, k, v, o and the FFN's matrices, their biases) keeps its last rows on the device
and its first `rows` in (pinned) host memory; the block's forward computes the two parts of the
output and joins them, so the result is the resident model's up to float rounding. Copies go
through the run's copy engine: CUDA streams, a timed memcpy on a CPU, or an emulated link (where
they share the link with the KV cache's copies). The compute thread's wait for a block's weights is
timed as that layer's "wait"; the copy itself as its "h2d". Norms, embeddings and the head stay on
the device.

The last block streams the next step's first one when the layer count is even (the buffers
alternate across the step's end); with an odd count the first block's copy starts with the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisim.core.errors import InfinisimError
from infinisim.executor.kvcache import CopyEngine, available_bytes
from infinisim.executor.link import EmulatedLink
from infinisim.executor.model import Block, Step, Transformer
from infinisim.traces.spec import ModelSpec, weights_to_fit


class StreamedLinear(nn.Module):
    """A Linear whose first `rows` output rows are copied in before each use (into `staged`)."""

    def __init__(self, linear: nn.Linear, rows: int, device: torch.device):
        super().__init__()
        pinned = device.type == "cuda"
        parts = [linear.weight.detach()] + ([] if linear.bias is None else [linear.bias.detach()])
        # host tensors are plain attributes: moving the module never takes them to the device
        self.host = [t[:rows].to("cpu", copy=True) for t in parts]
        self.host = [t.pin_memory() for t in self.host] if pinned else self.host
        self.weight = nn.Parameter(parts[0][rows:].to(device), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(parts[1][rows:].to(device), requires_grad=False)
        self.staged: list[Tensor] = []  # this block's buffer views, filled by the stream

    def forward(self, x: Tensor) -> Tensor:
        staged_bias = self.staged[1] if self.bias is not None else None
        return torch.cat((F.linear(x, self.staged[0], staged_bias), F.linear(x, self.weight, self.bias)), dim=-1)

    def dense(self) -> tuple[Tensor, Tensor | None]:
        """The whole weight (and bias) on the device, while this block's rows are staged."""
        bias = None if self.bias is None else torch.cat((self.staged[1], self.bias))
        return torch.cat((self.staged[0], self.weight)), bias


def linear_weights(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of a projection, resident or streamed (for policies that read a later layer's
    weights outside its block: they take them while the block runs, at the prefill)."""
    if isinstance(module, StreamedLinear):
        return module.dense()
    return module.weight, module.bias


def streamed_rows(out_features: int, share: float) -> int:
    return math.ceil(share * out_features - 1e-9)


def share_to_fit(spec: ModelSpec, dtype: str, device: torch.device) -> float:
    """`--weights-on-host auto` for a run: the smallest share (in hundredths) at which the device's part
    of the weights (traces.spec.weight_parts) fits the memory it has free; 0 when the whole model does."""
    free, total = available_bytes(device), spec.weight_bytes(dtype)
    if total <= free:
        return 0.0
    share = weights_to_fit(spec, dtype, 0.0, total, free)
    if share is None:
        raise InfinisimError(f"{spec.name} in {dtype} does not fit the {device.type}'s {free / 1e9:.1f} GB free even "
                             "with every block's weights on the host", field="--weights-on-host")
    return share


@dataclass
class StreamInfo:
    """What the trace records of a weight stream."""

    share: float  # streamed bytes over a block's weight bytes
    bytes_per_block: int
    copies_per_block: int

    def to_dict(self) -> dict[str, object]:
        return {"weights_on_host": self.share, "weights_streamed_bytes_per_block": self.bytes_per_block,
                "weights_copies_per_block": self.copies_per_block}


class WeightStream:
    """Installed on a model: its blocks' projections split, a pre-hook per block that waits for the
    block's rows and starts the next block's copy."""

    def __init__(self, model: Transformer, share: float, device: torch.device, link: EmulatedLink | None):
        """Split `model`'s blocks (loaded on the CPU or on `device`) and move the rest to `device`."""
        if not 0 < share <= 1:
            raise InfinisimError(f"must be within (0, 1], got {share}", field="--weights-on-host")
        self.n_layers = model.spec.n_layers
        self.copies = CopyEngine(device, link)
        self.linears: list[list[StreamedLinear]] = []  # per block, its projections in order of use
        for block in model.layers:
            split = []
            for part in (block.attention, block.feed_forward):
                for name, linear in list(part.named_children()):
                    if isinstance(linear, nn.Linear):
                        streamed = StreamedLinear(linear, streamed_rows(linear.out_features, share), device)
                        setattr(part, name, streamed)
                        split.append(streamed)
            self.linears.append(split)
        model.to(device)
        # two block buffers, shaped as any block's host rows (every block has the same shapes)
        self.buffers = [[[torch.empty_like(t, device=device) for t in linear.host] for linear in self.linears[0]]
                        for _ in range(2)]
        self.sources = [[t for linear in linears for t in linear.host] for linears in self.linears]  # per block
        self.targets = [[buf for bufs in slot for buf in bufs] for slot in self.buffers]  # per buffer
        self.pending: dict[int, object] = {}  # block -> its copy in flight
        for block in model.layers:
            block.register_forward_pre_hook(self.before_block)
        nbytes = sum(t.numel() * t.element_size() for t in self.sources[0])
        layer_bytes = model.spec.layer_weight_bytes(str(model.tok_embeddings.weight.dtype).removeprefix("torch."))
        self.info = StreamInfo(nbytes / layer_bytes, nbytes, len(self.sources[0]))

    def issue(self, layer: int, step: Step) -> None:
        """Start block `layer`'s copy into its buffer (the other block that used it has computed)."""
        self.pending[layer] = self.copies.to_device(self.targets[layer % 2], self.sources[layer], layer,
                                                    step.recorder)

    def before_block(self, block: Block, args: tuple[object, ...]) -> None:
        step = args[2]
        assert isinstance(step, Step)
        i = block.index
        if step.prefill and i == 0:
            self.pending.clear()  # a new run: copies of the last one have landed (the step end drains them)
        if i not in self.pending:
            self.issue(i, step)
        self.copies.wait(self.pending.pop(i), i, step.recorder)
        for linear, bufs in zip(self.linears[i], self.buffers[i % 2], strict=True):
            linear.staged = bufs
        nxt = i + 1 if i + 1 < self.n_layers else (0 if self.n_layers % 2 == 0 else None)
        if nxt is not None:
            self.issue(nxt, step)

