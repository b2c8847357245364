"""The SimPy model: a host thread issuing work to streams, as the executor does.

Entities mirror the executor: the host (Python) thread issues kernels, paying a launch overhead
each, and blocks where the executor synchronises (speculated indices to the CPU, H2O's kept set,
the sampled token); a compute stream and a speculation stream (independent engines here; on a
real GPU they share the SMs); host->device and device->host copy engines (one engine for both
directions when the link is not duplex); host gathers run on the host thread. Each stream runs
its ops in issue order, each op once the events it waits for have happened, like a CUDA stream.

On a CPU-only profile everything is one engine and the host waits for each op, as the
executor's CPU path does: copies are memcpys, speculation runs on the compute thread.

This loop is the same for every KV policy: what a policy does around a layer comes from its
class in `sim.policies` (`Workload.kv_policy`).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.costs import Costs, Work
from infinisim.sim.memory import MemoryPlan, memory_plan
from infinisim.sim.result import PHASES, SimResult
from infinisim.sim.tables import any_positive
from infinisim.sim.workload import Workload

if TYPE_CHECKING:
    from infinisim.sim.lockstep import Collective

P = {name: i for i, name in enumerate(PHASES)}


class CountingEnvironment(simpy.Environment):
    """Counts scheduled events (the simulator's speed is reported in events per second)."""

    scheduled = 0

    def schedule(self, event: simpy.Event, priority: int = simpy.core.NORMAL, delay: float = 0) -> None:
        self.scheduled += 1
        super().schedule(event, priority, delay)


Account = Callable[[str, list[tuple[str, int, float]], float, float, Any], None]


class Stream:
    """Runs ops in issue order; an op starts when issued, when the previous op is done, and when
    the events it waits for have happened; it then holds the stream's engine (when the engine is
    shared with another stream) for its duration. `account(stream, parts, start, waited, step)`
    hears of each op when it is done (`step`: the decode step that issued it). With a `collective`
    (tensor-parallel ranks simulated together), each all-reduce ("comm" part) first waits for every
    rank to reach it (the head's all-gather too), and that wait counts as its comm time, as the
    executor's timers see it."""

    def __init__(self, env: simpy.Environment, name: str, engine: simpy.Resource | None, account: Account,
                 collective: Collective | None = None):
        self.env, self.name, self.engine, self.account = env, name, engine, account
        self.collective = collective
        self.queue: deque[tuple[list[tuple[str, int, float]], float, list[simpy.Event], simpy.Event, Any]] = deque()
        self.idle: simpy.Event | None = None  # set while the stream waits for work
        self.tail: simpy.Event | None = None
        env.process(self.run())

    def run(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        while True:
            if not self.queue:
                self.idle = env.event()
                yield self.idle
            parts, issued, after, done, step = self.queue.popleft()
            if issued > env.now:  # the host has not issued it yet
                yield env.timeout(issued - env.now)
            ready = env.now
            pending = [e for e in after if not e.processed]
            if len(pending) == 1:
                yield pending[0]
            elif pending:
                yield env.all_of(pending)
            waited = env.now - ready
            if self.engine is None:
                start = env.now
                parts = yield from self.hold(parts)
            else:
                with self.engine.request() as slot:
                    yield slot
                    start = env.now
                    parts = yield from self.hold(parts)
            self.account(self.name, parts, start, waited, step)
            done.succeed()

    def hold(self, parts: list[tuple[str, int, Any]]) -> Generator[simpy.Event, Any, list[tuple[str, int, Any]]]:
        """Spend the op's time; returns its parts with each all-reduce's wait for the other ranks added."""
        if self.collective is None or all(phase != "comm" for phase, _, _ in parts):
            yield self.env.timeout(sum(seconds for _, _, seconds in parts))
            return parts
        out, pending = [], 0.0
        for phase, layer, seconds in parts:
            if phase == "comm":
                yield self.env.timeout(pending)
                arrived, pending = self.env.now, 0.0
                yield self.collective.arrive()
                yield self.env.timeout(seconds)
                seconds = self.env.now - arrived  # the wait for the last rank, then the transfer
            else:
                pending += seconds
            out.append((phase, layer, seconds))
        yield self.env.timeout(pending)
        return out

    def submit(self, parts: list[tuple[str, int, float]], after: list[simpy.Event], issued: float = 0.0,
               step: Any = 0) -> simpy.Event:
        """Queue an op issued at time `issued`: parts are (phase, layer, seconds), run back to back."""
        done = self.env.event()
        self.queue.append((parts, issued, after, done, step))
        if self.idle is not None:
            idle, self.idle = self.idle, None
            idle.succeed()
        self.tail = done
        return done


class Simulation:
    """One run of a workload on a profile."""

    phases_per_step = True  # the result holds each step's phases (the fast path only their sums)

    def __init__(self, workload: Workload, profile: Profile, memory: MemoryPlan, timeline: bool = False,
                 collective: Collective | None = None):
        """`collective`: this is one of the tensor-parallel ranks simulated together (`sim.lockstep`),
        sharing the collective's environment and waiting for each other in every all-reduce."""
        profile = profile.for_tensor_parallel(workload.tp)  # one GPU's view: its share of shared links
        self.w, self.profile, self.memory = workload, profile, memory
        self.collective = collective
        self.kv = workload.kv_policy
        self.costs = Costs(profile, workload.spec, workload.dtype, workload.batch, workload.sequences_apart)
        self.sync = profile.synchronous  # the host does everything in turn, copies included
        self.host_computes = profile.host_computes  # the host runs compute and speculation itself
        self.streams = self.make_streams()
        self.launch_s = profile.device.launch_overhead
        n = workload.spec.n_layers
        self.phase_s = self.phase_array((workload.n_steps + 1, n + 1, len(PHASES)))
        self.step_s = np.zeros(workload.n_steps + 1)
        self.step: Any = 0  # the decode step (0: the prefill) the phases go to
        self.host_t: Any = 0.0
        self.qkv, self.ffn = self.costs.qkv(), self.costs.ffn()  # the same in every decode layer
        self.reduce = self.all_reduce(workload.batch)  # after attention and after the FFN, tensor-parallel
        self.pending: dict[int, Any] = {}  # layer -> its prefetch in flight
        self.streamed = workload.weights_on_host * workload.spec.layer_weight_bytes(workload.dtype)
        self.weights_in: dict[int, Any] = {}  # layer -> the copy of its host-side weights in flight
        self.slot_free: list[Any] = [None, None]  # the last copy out of each prefetch slot
        self.timeline = timeline
        self.spans: list[tuple[str, str, int, int, float, float]] = []

    def phase_array(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Busy seconds per [step, layer, phase]."""
        return np.zeros(shape)

    def make_streams(self) -> dict[str, Any]:
        """Engines shared by two streams are resources; a stream alone on its engine needs none. On a
        CPU-only profile all four share the cores, but the host waits for each op, so none overlap."""
        self.env = self.collective.env if self.collective else CountingEnvironment()
        link = None if self.profile.link.duplex or self.sync else simpy.Resource(self.env, 1)
        engines = {"compute": None, "spec": None, "h2d": link, "d2h": link}
        return {name: Stream(self.env, name, engine, self.account, self.collective if name == "compute" else None)
                for name, engine in engines.items()}

    # ---------------------------------------------------------------- bookkeeping

    @staticmethod
    def row(step: Any) -> tuple[Any, ...]:
        """The phase array's leading index of a step: a step, a slice of steps, or (lanes, step)."""
        return step if isinstance(step, tuple) else (step,)

    def book(self, step: Any, layer: int, phase: str, seconds: Any) -> None:
        """Busy seconds of a layer's phase in a step (or in each of a slice of steps)."""
        self.phase_s[(*self.row(step), layer, P[phase])] += seconds

    def account(self, stream: str, parts: list[tuple[str, int, Any]], start: Any, waited: Any, step: Any) -> None:
        for phase, layer, seconds in parts:
            self.book(step, layer, phase, seconds)
        if self.timeline:
            t = start
            for phase, layer, seconds in parts:
                self.spans.append((stream, phase, step, layer, t, t + seconds))
                t = t + seconds  # not in place: `start` may be an array
        if stream == "compute" and parts[0][1] != self.w.spec.n_layers:
            self.book(step, parts[0][1], "wait", waited)
            if self.timeline and waited > 0:
                self.spans.append((stream, "wait", step, parts[0][1], start - waited, start))

    # The host thread keeps its own clock, `host_t`: issuing ops and host work advance it without
    # simulation events (ops carry their issue time), and it only yields where the executor's
    # host waits for the device. After a wait it resumes at the later of its clock and the event.

    def wait(self, event: simpy.Event | None) -> Generator[simpy.Event, Any, None]:
        if event is not None:
            yield event
        self.host_t = max(self.host_t, self.env.now)

    def launch(self, stream: str, parts: list[tuple[str, int, Work]], after: tuple[simpy.Event | None, ...] = ()
               ) -> Generator[simpy.Event, Any, simpy.Event]:
        """The host issues one op (its kernels cost host time); on a CPU-only profile it also runs it
        (copies too, unless they cross an emulated link's copy threads)."""
        kernels = sum(work.kernels for _, _, work in parts) * self.launch_s
        timed = [(phase, layer, work.seconds) for phase, layer, work in parts]
        runs_it = self.sync or (self.host_computes and stream not in ("h2d", "d2h"))
        if runs_it:  # the host thread does the work, launches included
            timed[0] = (timed[0][0], timed[0][1], timed[0][2] + kernels)
        else:
            self.host_t = self.host_t + kernels
        done = self.streams[stream].submit(timed, [e for e in after if e is not None], self.host_t, self.step)
        if runs_it:
            yield from self.wait(done)
        return done

    def host_work(self, phase: str, layer: int, work: Work) -> None:
        """Work on the host thread itself: the gather of selected rows, bookkeeping between phases."""
        seconds = work.seconds + work.kernels * self.launch_s
        if not any_positive(seconds):
            return
        start, self.host_t = self.host_t, self.host_t + seconds
        self.book(self.step, layer, phase, seconds)
        if self.timeline:
            self.spans.append(("host", phase, self.step, layer, start, start + seconds))

    def copy(self, direction: str, layer: int, nbytes: float, after: tuple[simpy.Event | None, ...]
             ) -> Generator[simpy.Event, Any, simpy.Event | None]:
        if not any_positive(nbytes):
            return None
        work = self.costs.copy(nbytes, direction, self.kv.copy_tensors, self.w.host_pinned)
        return (yield from self.launch(direction, [(direction, layer, work)], after))

    def all_reduce(self, rows: int) -> Work | None:
        """Tensor parallelism: the ring all-reduce of `rows` hidden vectors (the compute stream waits for
        it: the next op needs the sum), a part of a layer's compute op; None on one GPU."""
        if self.w.tp == 1:
            return None
        nbytes = rows * self.w.spec.hidden * self.costs.e
        return Work(self.profile.all_reduce_seconds(nbytes, self.w.tp), 1)

    def head(self) -> list[tuple[str, int, Work]]:
        """The LM head of the batch's last positions; under tensor parallelism each GPU computes its share
        of the vocabulary and the shares are all-gathered (padded to the widest): a collective, so comm
        (in the head's row: the executor times it inside the head)."""
        n = self.w.spec.n_layers
        parts = [("head", n, self.costs.head())]
        if self.w.tp > 1:
            nbytes = self.w.batch * self.w.spec.vocab_size * self.w.tp * self.costs.e
            parts.append(("comm", n, Work(self.profile.all_gather_seconds(nbytes, self.w.tp), 1)))
        return parts

    def stream_weights(self, layer: int) -> Generator[simpy.Event, Any, None]:
        """Weight offloading (FlexGen): the host-side share of block `layer + 1` goes in while `layer`
        computes, into the buffer block `layer - 1` used (so after the compute issued so far); the
        last layer streams the next step's first block (with an even layer count, where the two
        buffers alternate across the step's end; else the step's start does)."""
        n = self.w.spec.n_layers
        nxt = layer + 1 if layer + 1 < n else (0 if n % 2 == 0 else None)
        if not self.streamed or nxt is None or nxt in self.weights_in:
            return
        work = self.costs.copy(self.streamed, "h2d", self.w.spec.streamed_weight_tensors, True)
        self.weights_in[nxt] = yield from self.launch("h2d", [("h2d", nxt, work)], (self.streams["compute"].tail,))

    # ---------------------------------------------------------------- the run

    def run(self) -> SimResult:
        self.env.process(self.host())
        self.env.run()
        return self.result(self.env.scheduled)

    def result(self, events: int) -> SimResult:
        link = self.phase_s[..., P["h2d"]].sum() + self.phase_s[..., P["d2h"]].sum()
        per_step = self.phase_s if self.phases_per_step else None
        return SimResult(self.w, self.profile, self.step_s, per_step, self.phase_s[1:].sum(axis=0), self.memory,
                         float(link), events, self.spans)

    def host(self) -> Generator[simpy.Event, Any, None]:
        yield from self.prefill()
        for s in range(self.w.n_steps):
            self.step = s + 1
            start = self.host_t
            yield from self.decode_step(s)
            self.step_s[s + 1] = self.host_t - start

    def prefill(self) -> Generator[simpy.Event, Any, None]:
        w, c, head = self.w, self.costs, self.w.spec.n_layers
        start, t = self.host_t, w.prompt_len
        yield from self.stream_weights(-1)  # the first block
        yield from self.launch("compute", [("embed", head, c.embed())])
        written = (w.bytes_d2h[0, 0] if w.n_steps else 0) * self.kv.prefill_written(w)
        works = (c.prefill_qkv(t), c.prefill_attend(t), c.prefill_ffn(t), written, self.all_reduce(w.batch * t))
        yield from self.layers("prefill", functools.partial(self.prefill_layer, works))
        done = yield from self.launch("compute", self.head())
        yield from self.wait(done)
        self.step_s[0] = self.host_t - start

    def prefill_layer(self, works: tuple[Work, Work, Work, float, Work | None], layer: int
                      ) -> Generator[simpy.Event, Any, None]:
        qkv, attend, ffn, written, reduced = works
        yield from self.stream_weights(layer)
        reduce = [("comm", layer, reduced)] if reduced else []
        parts = [("attn", layer, qkv), ("attn", layer, attend), *reduce,
                 *self.kv.prefill_parts(self.costs, self.w, layer, self.w.prompt_len), ("ffn", layer, ffn), *reduce]
        done = yield from self.launch("compute", parts, (self.weights_in.pop(layer, None),))
        if self.kv.traits.offloaded:  # the prompt's rows go to host memory
            yield from self.copy("d2h", layer, written, (done,))

    def decode_step(self, s: Any) -> Generator[simpy.Event, Any, None]:
        n = self.w.spec.n_layers
        self.pending, self.slot_free = {}, [None, None]
        yield from self.stream_weights(-1)  # the first block, unless the last step's last layer sent it
        yield from self.launch("compute", [("embed", n, self.costs.embed())])
        yield from self.layers("decode", functools.partial(self.decode_layer, s))
        done = yield from self.launch("compute", self.head())
        yield from self.wait(done)  # the sampled token goes back to the host

    def layers(self, phase: str, body: Callable[[int], Generator[simpy.Event, Any, None]]
               ) -> Generator[simpy.Event, Any, None]:
        """Run `body` for every layer of the `phase` (prefill or decode)."""
        for layer in range(self.w.spec.n_layers):
            yield from body(layer)

    def decode_layer(self, s: Any, layer: int) -> Generator[simpy.Event, Any, None]:
        self.host_work("bookkeeping", layer, self.costs.bookkeeping(self.kv.host_ops))
        yield from self.stream_weights(layer)
        yield from self.kv.before_layer(self, s, layer)
        yield from self.launch("compute", [("attn", layer, self.qkv)], (self.weights_in.pop(layer, None),))
        waits, extra = yield from self.kv.attend_kv(self, s, layer)
        attend = self.costs.attend(self.w.attended[s, layer])
        reduce = [("comm", layer, self.reduce)] if self.reduce else []
        parts = [("attn", layer, attend), *extra, *reduce, ("ffn", layer, self.ffn), *reduce]
        yield from self.launch("compute", parts, (self.streams["compute"].tail, *waits))

    def prefetch(self, s: int, layer: int) -> Generator[simpy.Event, Any, None]:
        """Chosen rows of `layer`: gathered on the host into the staging buffer of its slot (once
        that slot's previous copy has left it), then copied in; its attention waits on `pending`.
        A CPU-only machine without a link gathers them straight into the slot (one memory)."""
        slot = layer % 2
        yield from self.wait(self.slot_free[slot])
        nbytes = self.w.bytes_h2d[s, layer]
        self.host_work("gather", layer, self.costs.gather(nbytes))
        if self.sync:
            return
        copied = yield from self.copy("h2d", layer, nbytes, (self.streams["compute"].tail,
                                                             self.streams["d2h"].tail))
        self.slot_free[slot] = copied
        self.pending[layer] = copied


def simulate(workload: Workload, profile: Profile, timeline: bool = False, memory: MemoryPlan | None = None
             ) -> SimResult:
    """Simulate the workload's run on the profile (`memory`: its plan, when already computed)."""
    return Simulation(workload, profile, memory or memory_plan(workload, profile), timeline).run()
