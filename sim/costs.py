"""How long each piece of work takes on a profile's hardware: pure functions, no simulation state.

Compute is a roofline: max(FLOPs / matmul rate, bytes / streaming bandwidth) plus the host's
per-kernel launch overhead for the kernels the executor issues. Decode attention streams the
attended KV at the profile's attention efficiency. Copies follow the link model (latency +
bytes / bandwidth, or a calibrated sweep); host gathers run at the host's gather bandwidth.
The kernel counts mirror executor/model.py and the policies, so a phase here is the phase of
the same name in a trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from infinisim.core.policies import partial_width
from infinisim.hwprofiles.profile import WIDE_PROJECTION, Profile
from infinisim.sim.tables import any_positive, choose, copy_time, interpolate_log
from infinisim.traces.spec import CALIBRATION_BLOCK, DTYPE_BYTES, ModelSpec, Shard

# Host-issued ops (PyTorch dispatcher calls, views included) per phase of one decode layer, as the
# executor issues them; counted with `benchmarks/count_ops.py` (SmolLM2 for "llama", OPT-125m for
# "opt"). Each costs the profile's launch overhead of host time.
QKV_OPS = {"llama": 25, "opt": 11}  # norm, three projections, RoPE, cache write
ATTEND_OPS = {"llama": 15, "opt": 9}  # mask, scaled_dot_product_attention, output projection, residual
FFN_OPS = {"llama": 7, "opt": 5}
EMBED_OPS = {"llama": 7, "opt": 4}
HEAD_OPS = {"llama": 14, "opt": 14}  # final norm, output projection, sampling, per-step bookkeeping
SPEC_OPS = {"llama": 72, "opt": 57}  # per speculating layer (uncalibrated profiles)
# A live server's decode step (`apart`), counted with `benchmarks/count_ops.py --live`: of ATTEND_OPS, the
# ops each sequence issues itself (its mask and attention; the output projection and residual stay batched,
# SmolLM2 and OPT-125m alike), and per layer and sequence the server's own (its rows of the batch, sliced)
APART_ATTEND_OPS = 8
SEQUENCE_OPS = 4
RESIDENT_HOST_OPS = 3  # the resident policy's ops outside a decode layer's phases (its cache bookkeeping)
SELECTED_ATTEND_OPS = 8  # concatenating the fetched rows with the newest, the per-head mask
H2O_UPDATE_OPS = 46
INT4_OPS = 68  # quantizing the new row, dequantizing the fetched cache
COPY_OPS = {"h2d": 1, "d2h": 2}  # per tensor copied (d2h also slices the host store)
GATHER_OPS = 6
SELECTION_BYTES_PER_SCORE = 128  # uncalibrated: ~32 float32 passes over the speculated scores (gaps, histogram, ...)
PREFILL_ATTENTION_EFFICIENCY = 0.5  # uncalibrated: masked prompt attention vs the matmul rate
MIN_FACTOR = 0.1  # a calibration block measured under a tenth of its roofline counts as a tenth (noise)
H2O_PASSES = 10  # passes over [B, H, kept] scores to accumulate attention and re-choose the kept set
INT4_DEQUANT_PASSES = 6  # unpack, convert, scale, add min, interleave, concatenate (per value)


class Work(NamedTuple):
    """Device time of a phase (without launches) and the kernels the host issues for it."""

    seconds: float
    kernels: int = 0


@dataclass(frozen=True)
class Costs:
    """Timing of one model on one profile at one batch and dtype."""

    profile: Profile
    spec: ModelSpec
    dtype: str
    batch: int
    # a live server's decode step (executor/serving.py): projections and FFN batched, but each sequence
    # attends, speculates, gathers and copies through its own policy, so those phases cost `batch` times
    # one sequence's (their launches and fixed costs too); False: batched kernels, as vLLM runs them
    apart: bool = False

    def per_sequence(self, work: Callable[[Costs, float], Work]) -> Work:
        """A per-sequence phase of the whole batch: `work(costs, share)` with the batch's costs and
        share 1 (batched), or when apart `batch` times one sequence's (its costs, 1/batch of the bytes)."""
        if not self.apart or self.batch == 1:
            return work(self, 1.0)
        one = work(self.one_sequence, 1.0 / self.batch)
        return Work(one.seconds * self.batch, one.kernels * self.batch)

    @functools.cached_property
    def warm_query_saving(self) -> float:
        """What a live server's later sequences save on speculation's W_q projection, read from cache
        after the first sequence read it (the profile's cached_stream_sweep); 0 for OPT, whose folded
        weight is each sequence's own, or without the sweep."""
        s, cached = self.spec, self.profile.device.cached_stream_sweep
        if s.family == "opt" or not cached:
            return 0.0
        weight = s.hidden * s.n_heads * s.head_dim * self.e
        warm = weight / interpolate_log([p[0] for p in cached], [p[1] for p in cached], weight)
        return max(self.one_sequence.linear(s.hidden, s.n_heads * s.head_dim) - warm, 0.0)

    @functools.cached_property
    def one_sequence(self) -> Costs:
        """The costs of one of the batch's sequences on its own (what `apart` charges each)."""
        return replace(self, batch=1, apart=False)

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def stream_bw(self) -> float:
        d = self.profile.device
        return d.memory_bandwidth * d.bandwidth_efficiency

    def matmul_rate(self, k: int, n: int) -> float:
        """FLOP/s of a k x n projection: from the calibrated sweep by min(k, n) (log-interpolated,
        clamped at its ends) when the profile has one, else peak x efficiency."""
        sweep = self.profile.device.matmul_sweep
        if not sweep:
            return self.profile.matmul_rate(self.dtype)
        column = 1 if self.dtype == "float32" else 2
        return interpolate_log([p[0] for p in sweep], [p[column] for p in sweep], min(k, n))

    def weight_stream_bw(self, m: int, k: int, n: int | None = None) -> float:
        """B/s at which an m-row projection reads a k x n weight: from the calibrated grid (log-
        interpolated in rows, then inner size; its weights are k x 2k) when there is one, else the
        streaming bandwidth. A wider weight (the LM head) goes toward the wide sweep's rate at those rows
        (log-interpolated in the aspect n / k, from the grid's 2 to the wide weight's; whatever its inner
        size: the wide rate varies less with it than the rows' kernel choice does)."""
        grid = self.profile.device.stream_sweep
        if not grid:
            return self.stream_bw
        base = self._grid_bw(m, k)
        wide = self.profile.device.wide_stream_sweep
        if not wide or n is None or n <= 2 * k:
            return base
        inner, outer = WIDE_PROJECTION
        at_rows = interpolate_log([p[0] for p in wide], [p[1] for p in wide], m)
        return interpolate_log([2.0, outer / inner], [base, at_rows], n / k)

    def _grid_bw(self, m: int, k: int) -> float:
        grid = self.profile.device.stream_sweep
        inners = sorted({p[1] for p in grid})
        by_inner = [interpolate_log([p[0] for p in grid if p[1] == inner], [p[2] for p in grid if p[1] == inner], m)
                    for inner in inners]
        return interpolate_log(inners, by_inner, k)

    def linear(self, k: int, n: int, m: int | None = None) -> float:
        """One projection of m rows (default: the batch's one new token each, at the calibrated
        decode efficiency) by a k x n weight."""
        if m is None:
            return self.linear(k, n, self.batch) * self.decode_efficiency
        flops = 2.0 * m * k * n
        nbytes = self.e * (k * n + m * k + m * n)
        compute, stream = flops / self.matmul_rate(k, n), nbytes / self.weight_stream_bw(m, k, n)
        return np.maximum(compute, stream) if isinstance(m, np.ndarray) else max(compute, stream)  # rows (per lane)

    def elementwise(self, nbytes: float) -> float:
        return nbytes / self.stream_bw

    def attention_over(self, n_keys: float, head_dim: int | None = None) -> float:
        """Decode attention of every query head over n_keys cached rows per sequence (K and V)."""
        s = self.spec
        d = s.head_dim if head_dim is None else head_dim
        kv_bytes = 2.0 * self.batch * s.n_kv_heads * n_keys * d * self.e
        flops = 4.0 * self.batch * s.n_heads * n_keys * d
        bw = self.profile.device.memory_bandwidth * self.profile.device.attention_efficiency
        return np.maximum(kv_bytes / bw, flops / self.profile.matmul_rate(self.dtype))

    # ---------------------------------------------------------------- phases of one layer

    def qkv(self) -> Work:
        s = self.spec
        t = self.linear(s.hidden, s.n_heads * s.head_dim) + 2 * self.linear(s.hidden, s.n_kv_heads * s.head_dim)
        t += self.elementwise(3 * self.batch * s.hidden * self.e)  # norm, RoPE, cache write
        return Work(t, QKV_OPS[s.family])

    def attend(self, n_keys: float) -> Work:
        s = self.spec
        own = APART_ATTEND_OPS if self.apart else ATTEND_OPS[s.family]  # the ops each sequence issues itself
        mix = self.per_sequence(lambda c, _: Work(c.attention_over(n_keys), own))
        return Work(mix.seconds + self.linear(s.n_heads * s.head_dim, s.hidden),
                    mix.kernels + ATTEND_OPS[s.family] - own)

    def ffn(self, m: int | None = None) -> Work:
        s = self.spec
        n_mats = 3 if s.family == "llama" else 2
        rows = self.batch if m is None else m
        activation = self.elementwise(3.0 * rows * s.ffn_hidden * self.e)
        return Work(n_mats * self.linear(s.hidden, s.ffn_hidden, m) + activation, FFN_OPS[s.family])

    def embed(self) -> Work:
        return Work(0.0, EMBED_OPS[self.spec.family])

    def head(self) -> Work:
        s = self.spec
        return Work(self.linear(s.hidden, s.vocab_size), HEAD_OPS[s.family])

    def device_copy(self, nbytes: float) -> float:
        """A copy within device memory. On a GPU: read and write at the streaming bandwidth; on a
        CPU-only machine the device is RAM, so it is the measured memcpy rate at that size."""
        if not any_positive(nbytes):
            return 0.0
        if self.profile.kind == "cpu":  # the machine's own memcpy, also when its copies cross an emulated link
            return copy_time(self.profile.memcpy or self.profile, nbytes, "h2d")
        return 2 * nbytes / self.stream_bw

    def selected_attend_extra(self, fetched_bytes: float) -> Work:
        """Joining the fetched rows with the newest (a copy of the fetched K and V) and the per-KV-head mask."""
        return self.per_sequence(lambda c, share: Work(c.device_copy(fetched_bytes * share), SELECTED_ATTEND_OPS))

    def speculation(self, n_keys: float, partial_ratio: float) -> Work:
        """InfiniGen's speculation for one layer: the partial query (Llama: the full W_q then RoPE
        and the rotation; OPT: the folded partial weight), scores against the partial key cache,
        counting within alpha and choosing the top rows per KV head (apart: each sequence its own; the
        Llama family's W_q is the model's, so after the first sequence's read it comes from cache,
        where the profile measured that; OPT's folded weight is each sequence's own)."""
        s = self.spec
        if self.apart and self.batch > 1:
            each = self.per_sequence(lambda c, _: c.speculation(n_keys, partial_ratio))
            return Work(each.seconds - (self.batch - 1) * self.warm_query_saving, each.kernels)
        r = partial_width(partial_ratio, s.head_dim)
        if s.family == "opt":
            query = self.linear(s.hidden, s.n_heads * r)
        else:
            query = self.linear(s.hidden, s.n_heads * s.head_dim) + self.elementwise(self.batch * s.hidden * self.e)
        keys = self.batch * s.n_kv_heads * n_keys * r * self.e / self.stream_bw
        d = self.profile.device
        n_scores = self.batch * s.n_heads * n_keys
        per_score = d.selection_per_score if d.selection_per_score is not None else \
            SELECTION_BYTES_PER_SCORE / self.stream_bw
        sweep = d.speculation_sweep
        if sweep:  # calibrated on the executor's own speculation; beyond the sweep, per score
            last_n, last_s = sweep[-1]
            measured = choose(n_scores <= last_n, interpolate_log([p[0] for p in sweep], [p[1] for p in sweep],
                                                                  n_scores), last_s + (n_scores - last_n) * per_score)
            return Work(query + keys + measured)
        return Work(query + keys + n_scores * per_score, SPEC_OPS[s.family])

    def h2o_update(self, n_kept: float) -> Work:
        """H2O after attention: exact scores of the kept rows, accumulate, re-choose the kept set."""
        s = self.spec
        if self.apart and self.batch > 1:
            return self.per_sequence(lambda c, _: c.h2o_update(n_kept))
        keys = self.batch * s.n_kv_heads * n_kept * s.head_dim * self.e
        scores = 4.0 * self.batch * s.n_heads * n_kept
        return Work((keys + H2O_PASSES * scores) / self.stream_bw, H2O_UPDATE_OPS)

    def int4_dequant(self, n_keys: float) -> Work:
        if self.apart and self.batch > 1:
            return self.per_sequence(lambda c, _: c.int4_dequant(n_keys))
        s = self.spec
        values = 2.0 * self.batch * s.n_kv_heads * n_keys * s.head_dim
        return Work(INT4_DEQUANT_PASSES * values * self.e / self.stream_bw, INT4_OPS)

    # ---------------------------------------------------------------- the prefill of one layer

    def prefill_qkv(self, n_tokens: Any) -> Work:
        s, m = self.spec, self.batch * n_tokens
        t = self.linear(s.hidden, (s.n_heads + 2 * s.n_kv_heads) * s.head_dim, m)
        t = t + self.elementwise(3 * m * s.hidden * self.e)  # norm, RoPE, cache write
        return Work(t * self.prefill_efficiency(n_tokens)[0], QKV_OPS[s.family])

    def prefill_attend(self, n_tokens: Any) -> Work:
        """Attention over the prompt with an explicit causal mask (the executor's padded batches need
        one), so every one of the T x T scores is computed, and the output projection."""
        s, m = self.spec, self.batch * n_tokens
        flops = 4.0 * self.batch * s.n_heads * n_tokens * n_tokens * s.head_dim
        sweep = self.profile.device.prefill_attention_sweep
        rate = interpolate_log([p[0] for p in sweep], [p[1] for p in sweep], n_tokens) if sweep else \
            PREFILL_ATTENTION_EFFICIENCY * self.profile.matmul_rate(self.dtype)
        t = flops / rate + self.linear(s.n_heads * s.head_dim, s.hidden, m)
        return Work(t * self.prefill_efficiency(n_tokens)[0], ATTEND_OPS[s.family])

    def prefill_ffn(self, n_tokens: Any) -> Work:
        ffn = self.ffn(self.batch * n_tokens)
        return Work(ffn.seconds * self.prefill_efficiency(n_tokens)[1], ffn.kernels)

    def prefill_efficiency(self, n_tokens: Any) -> tuple[Any, Any]:
        """How much longer than their roofline a prompt's attention phase and FFN take, as the
        calibrated executor's own prefill of CALIBRATION_BLOCK took at that prompt length (log-
        interpolated, clamped at the sweep's ends); (1, 1) without a sweep."""
        if self.block_factors is None:
            return 1.0, 1.0
        sizes, attn, ffn = self.block_factors
        return interpolate_log(sizes, attn, n_tokens), interpolate_log(sizes, ffn, n_tokens)

    @functools.cached_property
    def decode_efficiency(self) -> float:
        """How much longer than their roofline a decode step's projections take at this batch, as the
        calibrated executor's decode FFN of CALIBRATION_BLOCK took over its own (less its launches and
        activation where the host runs them; log-interpolated in rows, clamped); 1 without a sweep."""
        sweep = self.profile.device.decode_block_sweep
        if not sweep:
            return 1.0
        s = self.calibration_block
        factors = []
        for rows, ffn_s in sweep:
            block = Costs(self.profile, s, self.dtype, int(rows))
            matmuls = 3 * block.linear(s.hidden, s.ffn_hidden, int(rows))
            rest = self.host_launch * FFN_OPS[s.family] + block.elementwise(3.0 * rows * s.ffn_hidden * self.e)
            factors.append(max(ffn_s - rest, MIN_FACTOR * matmuls) / matmuls)
        return float(interpolate_log([p[0] for p in sweep], factors, self.batch))

    @property
    def calibration_block(self) -> ModelSpec:
        """The shape the block sweeps were measured on: CALIBRATION_BLOCK, or rank 0's shard of it."""
        shards = self.profile.device.block_shards
        return CALIBRATION_BLOCK if shards == 1 else Shard.of(CALIBRATION_BLOCK, shards, 0).spec(CALIBRATION_BLOCK)

    @functools.cached_property
    def block_factors(self) -> tuple[list[float], list[float], list[float]] | None:
        """(prompt lengths, attention factors, FFN factors) of the profile's prefill_block_sweep: each
        measured time, less its launches where the host runs the kernels, over the block's time here
        without the sweep (its roofline)."""
        sweep = self.profile.device.prefill_block_sweep
        if not sweep:
            return None
        plain = replace(self.profile, device=replace(self.profile.device, prefill_block_sweep=()))
        block = Costs(plain, self.calibration_block, self.dtype, 1)
        attn, ffn = [], []
        for tokens, attn_s, ffn_s in sweep:
            n = int(tokens)
            qkv, attend, mlp = block.prefill_qkv(n), block.prefill_attend(n), block.prefill_ffn(n)
            roof = qkv.seconds + attend.seconds
            attn.append(max(attn_s - self.host_launch * (qkv.kernels + attend.kernels), MIN_FACTOR * roof) / roof)
            ffn.append(max(ffn_s - self.host_launch * mlp.kernels, MIN_FACTOR * mlp.seconds) / mlp.seconds)
        return [p[0] for p in sweep], attn, ffn

    @property
    def host_launch(self) -> float:
        """Host seconds per op inside a measured phase: the launch overhead where the host runs the
        kernels itself (a CPU), else 0 (a GPU's phases are timed on the device)."""
        return self.profile.device.launch_overhead if self.profile.host_computes else 0.0

    def skew_build(self, n_tokens: int) -> Work:
        """InfiniGen's prefill work per speculating layer: per KV head an SVD of its group's queries
        (float64) and the partial key cache."""
        s = self.spec
        rows = self.batch * n_tokens * (s.n_heads // s.n_kv_heads)
        d = self.profile.device
        if d.skew_per_row is not None:
            return Work(s.n_kv_heads * (rows * d.skew_per_row + (d.skew_per_head or 0.0)), 12 * s.n_kv_heads)
        flops = s.n_kv_heads * (6.0 * rows * s.head_dim ** 2 + 10.0 * s.head_dim ** 3)
        return Work(2 * flops / self.profile.matmul_rate("float32"), 12 * s.n_kv_heads)

    def h2o_prefill(self, n_tokens: int) -> Work:
        """H2O's prefill: the prompt's whole attention matrix, to accumulate each key's attention."""
        s = self.spec
        scores = self.batch * s.n_heads * n_tokens * n_tokens / 2.0
        flops = 2.0 * scores * s.head_dim
        return Work(flops / self.profile.matmul_rate("float32") + H2O_PASSES * 4 * scores / self.stream_bw, 40)

    # ---------------------------------------------------------------- movement

    def copy(self, nbytes: float, direction: str, n_tensors: int, pinned: bool = True) -> Work:
        """Copies of n_tensors equal tensors (K and V, or int4's codes, scales and minimums),
        nbytes in all, host->device ('h2d') or device->host ('d2h')."""
        if not any_positive(nbytes):
            return Work(0.0)
        if self.apart and self.batch > 1:  # each sequence copies its own tensors
            return self.per_sequence(lambda c, share: c.copy(nbytes * share, direction, n_tensors, pinned))
        one = copy_time(self.profile, nbytes / n_tensors, direction, pinned)
        return Work(n_tensors * one, n_tensors * COPY_OPS[direction])

    def gather(self, nbytes: float) -> Work:
        """Host gather of scattered KV rows into the staging buffer (apart: each sequence its own)."""
        return self.per_sequence(lambda c, share: Work(np.maximum(nbytes, 0) * share / c.profile.host.gather_bandwidth,
                                                       GATHER_OPS))

    def bookkeeping(self, host_ops: int) -> Work:
        """The policy's own host work per layer (apart: each sequence's policy does it, and the live
        server hands each its rows), and once a layer what the calibrated decode of the block spent
        outside its phases beyond its ops' launches (`layer_host`)."""
        ops = host_ops + (SEQUENCE_OPS if self.apart else 0)
        own = self.per_sequence(lambda c, _: Work(0.0, ops))
        return Work(own.seconds + self.layer_host, own.kernels)

    @functools.cached_property
    def layer_host(self) -> float:
        """Host seconds a decode layer spends outside its phases beyond the launches of the ops counted
        there (the layer's Python, the policy's hooks, the timing): the calibrated block's one-row
        resident decode less its RESIDENT_HOST_OPS launches; 0 uncalibrated. On this project's CPU
        that took 53-61 us a layer where the launches alone say 16 (SmolLM2's batch-1 step: ~1.2 ms)."""
        measured = self.profile.device.decode_layer_host
        if measured is None:
            return 0.0
        return max(measured - RESIDENT_HOST_OPS * self.profile.device.launch_overhead, 0.0)
