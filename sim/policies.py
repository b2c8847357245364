"""Each KV policy as the simulator runs it: one class per entry of the registry
(`infinisim.core.policies`), over one small base, as the executor's policy of the same name.

A class says, for a workload: how many rows each decode step fetches and attends (synthetic
workloads), the memory it allocates, the extra compute of its prefill, what the host does before
a layer (InfiniGen's speculation and prefetch), and what a layer does between its projections
and its attention (the copies it starts, the events its attention waits for, extra compute).
The last two are SimPy generator functions run by the simulation's host process
(`sim.engine.Simulation`), whose primitives (launch, copy, wait, prefetch) they call.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import POLICIES as REGISTRY
from infinisim.core.policies import H2OKnobs, InfiniGenKnobs, Knobs, PolicySpec, budget_cap, partial_width
from infinisim.sim.costs import RESIDENT_HOST_OPS, Costs, Work
from infinisim.traces.spec import DTYPE_BYTES, ModelSpec

if TYPE_CHECKING:
    import simpy

    from infinisim.sim.engine import Simulation
    from infinisim.sim.workload import Workload

Parts = list[tuple[str, int, Work]]  # (phase, layer, work) run back to back on one stream
AttendKV = Generator["simpy.Event", Any, tuple[tuple["simpy.Event | None", ...], Parts]]


class SimPolicy:
    name = ""  # a key of the registry
    host_ops = 0  # host-issued ops of a decode layer outside its timed phases (benchmarks/count_ops.py)
    copy_tensors = 2  # tensors per copy between host and device: K and V

    def __init__(self, knobs: Knobs):
        self.knobs = knobs
        self.traits: PolicySpec = REGISTRY[self.name]

    # ---------------------------------------------------------------- what a decode step moves

    fetch_follows_prompt = False  # a decode step's rows are sized by the prompt, not the cache (H2O)

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per [step, layer]: rows fetched and attended per sequence; per layer: speculating.
        kv_len: [steps, layers] cache positions after each step (the newest row included);
        prompt_len: a number, or one per step ([steps, 1])."""
        raise NotImplementedError

    def selecting(self, w: Workload) -> np.ndarray:
        """[layers] bool: layers that fetch a chosen subset (what accuracy depends on)."""
        return np.zeros(w.spec.n_layers, dtype=bool)

    def row_bytes(self, spec: ModelSpec, dtype: str, batch: int) -> int:
        return self.knobs.row_bytes(batch, spec.n_kv_heads, spec.head_dim, DTYPE_BYTES[dtype])

    # ---------------------------------------------------------------- memory

    def memory_parts(self, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
        """(device, host) allocations beyond weights and activations, as the executor makes them."""
        row = self.row_bytes(w.spec, w.dtype, w.batch)
        host = {"kv cache": float(w.spec.n_layers * self.knobs.stored(w.capacity) * row)}
        return {"kv staging (one layer)": float(w.capacity * row)}, host

    # ---------------------------------------------------------------- timing

    def prefill_parts(self, c: Costs, w: Workload, layer: int, n_tokens: int) -> Parts:
        """Extra compute of a layer's prefill, after its attention."""
        return []

    def prefill_written(self, w: Workload) -> int:
        """Positions per sequence each layer's prefill writes to host memory (offloaded policies)."""
        return w.prompt_len

    def before_layer(self, sim: Simulation, s: int, layer: int) -> Generator[simpy.Event, Any, None]:
        """Host work ahead of layer `layer`'s projections in decode step s."""
        yield from ()

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        """Between a layer's projections and its attention: start copies; return the events the
        attention waits for and extra compute in its attention phase."""
        raise NotImplementedError

    # ---------------------------------------------------------------- parts several policies share

    def fetch_whole(self, sim: Simulation, s: int, layer: int, in_place: bool = False) -> AttendKV:
        """The layer's rows copied in at the layer in one block, the new row written back (FlexGen).
        in_place: a CPU without a link attends the host rows where they lie; only the write is left."""
        w, compute = sim.w, sim.streams["compute"]
        fetched = None if in_place and sim.sync else \
            (yield from sim.copy("h2d", layer, w.bytes_h2d[s, layer], (compute.tail, sim.streams["d2h"].tail)))
        yield from sim.copy("d2h", layer, w.bytes_d2h[s, layer], (compute.tail,))
        return (fetched,), []

    def attend_selected(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        """Rows already on their way (`sim.prefetch`): write the new row back; attention waits for
        the copy and joins the fetched rows with the newest."""
        w = sim.w
        yield from sim.copy("d2h", layer, w.bytes_d2h[s, layer], (sim.streams["compute"].tail,))
        extra = [("attn", layer, sim.costs.selected_attend_extra(w.bytes_h2d[s, layer]))]
        return (sim.pending.pop(layer, None),), extra

    def selective_memory(self, w: Workload, own: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """An offloaded policy's parts, the two device fetch slots and the host gather staging (sized
        for the most rows a layer fetches), and the policy's `own` device parts."""
        device, host = SimPolicy.memory_parts(self, w)
        layer_kv = 2.0 * w.batch * w.spec.n_kv_heads * w.capacity * w.spec.head_dim * DTYPE_BYTES[w.dtype]
        slot = layer_kv * min(w.capacity, self.knobs.max_fetch(w.capacity)) / w.capacity
        return {**device, "fetch slots (two layers)": 2 * slot, **own}, {**host, "gather staging": 2 * slot}


def _whole(kv_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cached row fetched, every row attended."""
    return kv_len - 1, kv_len.copy(), np.zeros(kv_len.shape[1], dtype=bool)


class Resident(SimPolicy):
    """The cache on the device: nothing moves."""

    name = "resident"
    host_ops = RESIDENT_HOST_OPS

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros_like(kv_len), kv_len.copy(), np.zeros(kv_len.shape[1], dtype=bool)

    def memory_parts(self, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
        layer_kv = 2.0 * w.batch * w.spec.n_kv_heads * w.capacity * w.spec.head_dim * DTYPE_BYTES[w.dtype]
        return {"kv cache": w.spec.n_layers * layer_kv}, {}

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        return (), []
        yield  # a generator that issues nothing


class Full(SimPolicy):
    """Each layer's whole cache copied in at the layer; the new row written back."""

    name = "full"
    host_ops = 7

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _whole(kv_len)

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        return (yield from self.fetch_whole(sim, s, layer))


class Int4(SimPolicy):
    """As full, with 4-bit rows (fewer bytes, six tensors per copy) dequantized before attention."""

    name = "int4"
    host_ops = 13
    copy_tensors = 6  # codes, scales and minimums of K and V

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _whole(kv_len)

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        waits, _ = yield from self.fetch_whole(sim, s, layer)
        return waits, [("attn", layer, sim.costs.int4_dequant(sim.w.kv_len[s, layer] - 1))]


class H2O(SimPolicy):
    """Every layer copies its kept set, one compact block in host memory, at the layer; the host
    first puts last step's newest rows into the slots their evictions freed, and reads the freed
    slots after attention (which also accumulates scores and re-chooses the set)."""

    name = "h2o"
    host_ops = 14
    knobs: H2OKnobs
    fetch_follows_prompt = True

    def kept(self, prompt_len: Any) -> Any:
        return budget_cap(self.knobs.budget, prompt_len)  # the set never grows

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fetched = np.full_like(kv_len, self.kept(prompt_len))
        return fetched, fetched + 1, np.zeros(kv_len.shape[1], dtype=bool)

    def selecting(self, w: Workload) -> np.ndarray:
        return np.ones(w.spec.n_layers, dtype=bool)

    def prefill_written(self, w: Workload) -> int:
        return self.kept(w.prompt_len)

    def memory_parts(self, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
        row = self.row_bytes(w.spec, w.dtype, w.batch)
        m, n = self.kept(w.prompt_len), w.spec.n_layers
        scores = float(n * w.batch * w.spec.n_kv_heads * w.capacity * 4)
        return ({"kept set (one layer)": float(m * row), "accumulated scores": scores},
                {"kept sets": float(n * m * row), "newest rows": float(n * row)})

    def prefill_parts(self, c: Costs, w: Workload, layer: int, n_tokens: int) -> Parts:
        return [("attn", layer, c.h2o_prefill(n_tokens))]

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        w = sim.w
        yield from sim.wait(sim.streams["compute"].tail)  # the slots freed last step, read on the host
        sim.host_work("gather", layer, sim.costs.gather(w.bytes_d2h[s, layer]))  # the newest rows into them
        waits, _ = yield from self.fetch_whole(sim, s, layer)  # the whole kept set: one block
        extra = [("attn", layer, sim.costs.selected_attend_extra(w.bytes_h2d[s, layer])),
                 ("attn", layer, sim.costs.h2o_update(w.attended[s, layer]))]
        return waits, extra


class InfiniGen(SimPolicy):
    """Speculating layers prefetch their chosen rows one layer ahead; the leading dense layers fetch
    their whole cache at the layer."""

    name = "infinigen"
    host_ops = 14
    knobs: InfiniGenKnobs

    def decode_counts(self, kv_len: np.ndarray, prompt_len: Any, speculated: Any
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`speculated`: the share of its cached tokens each speculating layer wants (a number, or
        one per layer; NaN layers take the mean), capped by the budget as the executor caps it."""
        if speculated is None:
            raise InfinisimError(f"{self.name} needs the speculated fraction: give it, or a trace to derive it from",
                                 field="--speculated-fraction")
        n_layers = kv_len.shape[1]
        speculating = np.zeros(n_layers, dtype=bool)
        speculating[self.knobs.dense_layers:] = True
        cached = kv_len - 1
        stored = cached if self.knobs.pool_capacity is None else np.minimum(cached, self.knobs.pool_capacity)
        fraction = np.broadcast_to(np.asarray(speculated, dtype=float), (n_layers,))
        fraction = np.where(np.isnan(fraction), np.nanmean(fraction), fraction)
        if not np.isfinite(fraction).all() or (fraction < 0).any() or (fraction > 1).any():
            raise InfinisimError("must be within [0, 1]", field="--speculated-fraction")
        want = np.ceil(stored * fraction[None, :]).astype(np.int64)
        cap = budget_cap(self.knobs.budget, stored)
        fetched = np.where(speculating[None, :], np.clip(np.minimum(want, cap), 1, None), stored)
        return fetched, fetched + 1, speculating

    def selecting(self, w: Workload) -> np.ndarray:
        return w.speculating

    def memory_parts(self, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
        s, r = w.spec, partial_width(self.knobs.partial_ratio, w.spec.head_dim)
        return self.selective_memory(w, {"partial key cache": float(s.n_layers * w.batch * s.n_kv_heads * w.capacity
                                                                    * r * DTYPE_BYTES[w.dtype])})

    def prefill_parts(self, c: Costs, w: Workload, layer: int, n_tokens: int) -> Parts:
        return [("spec", layer, c.skew_build(n_tokens))] if w.speculating[layer] else []

    def before_layer(self, sim: Simulation, s: int, layer: int) -> Generator[simpy.Event, Any, None]:
        """At the start of layer i-1: speculate layer i's rows on the side stream, wait for the
        indices, gather the rows on the host, start their copy into the slot layer i reads."""
        w, target = sim.w, layer + 1
        if target >= w.spec.n_layers or not w.speculating[target]:
            return
        spec = sim.costs.speculation(w.kv_len[s, target] - 1, self.knobs.partial_ratio)
        done = yield from sim.launch("spec", [("spec", target, spec)], (sim.streams["compute"].tail,))
        yield from sim.wait(done)  # the indices go to the host
        yield from sim.prefetch(s, target)

    def attend_kv(self, sim: Simulation, s: int, layer: int) -> AttendKV:
        if sim.w.speculating[layer]:
            return (yield from self.attend_selected(sim, s, layer))
        return (yield from self.fetch_whole(sim, s, layer, in_place=True))  # the dense leading layers


class Oracle(InfiniGen):
    """Timed as InfiniGen (it fetches as many rows; the choice it makes is a measurement)."""

    name = "oracle"


SIM_POLICIES: dict[str, type[SimPolicy]] = {p.name: p for p in (Resident, Full, InfiniGen, Oracle, H2O, Int4)}
if set(SIM_POLICIES) != set(REGISTRY):  # a policy in the registry without a simulator class, or the reverse
    raise ImportError(f"simulator policies {sorted(SIM_POLICIES)} differ from the registry {sorted(REGISTRY)}")
