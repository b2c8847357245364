"""The planner's fast path (sim/direct.py) against the discrete-event simulation it replaces:
the same answer on a fixed random sample of configs, on every kind of profile, and a fallback
wherever its assumptions fail."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from infinisim.core.policies import POLICIES
from infinisim.hwprofiles.profile import builtin_profiles, load_profile
from infinisim.sim import direct
from infinisim.sim.engine import simulate
from infinisim.sim.memory import memory_plan
from infinisim.sim.result import PHASES
from infinisim.sim.run import simulate_if_fits
from infinisim.sim.workload import synthetic
from infinisim.traces.spec import MODELS, named_model


def calibrated_cpu():
    """A CPU-only profile with every measured sweep (the interpolated cost paths)."""
    p = load_profile("a6000-pcie3")
    device = replace(p.device, matmul_sweep=((256, 1e11, 2e11), (4096, 5e11, 9e11)),
                     stream_sweep=((1, 256, 2e10), (64, 256, 4e10), (1, 4096, 3e10), (64, 4096, 6e10)),
                     prefill_attention_sweep=((128, 1e11), (4096, 4e11)),
                     speculation_sweep=((1e3, 2e-5), (1e6, 4e-3)))
    link = replace(p.link, sweep=((4096, 1e9, 1e9), (1 << 20, 8e9, 7e9), (1 << 26, 1.2e10, 1.1e10)))
    return replace(p, name="cpu", kind="cpu", device=device, link=link)


def profiles():
    cpu = calibrated_cpu()
    return [*(load_profile(name) for name in builtin_profiles()), cpu,
            cpu.with_link(5e8, 1e-5, True, "0.5GB/s duplex")]


def mismatches(w, profile) -> list[str]:
    """Where the direct computation's answer differs from the event simulation's (none: the same)."""
    memory = memory_plan(w, profile)
    exact, fast = simulate(w, profile, memory=memory), direct.simulate_direct(w, profile, memory)
    if fast is None:
        return ["the direct computation refused a duplex or CPU-only profile"]
    out = []
    if not np.allclose(fast.step_s, exact.step_s, rtol=1e-9, atol=1e-15):
        out.append(f"step seconds: {fast.step_s} against {exact.step_s}")
    if not np.allclose(fast.decode_phase_s, exact.decode_phase_s, rtol=1e-9, atol=1e-12):
        out.append(f"decode phases: largest difference {np.abs(fast.decode_phase_s - exact.decode_phase_s).max():g} s")
    if fast.link_busy_s != pytest.approx(exact.link_busy_s, rel=1e-9):
        out.append(f"link busy: {fast.link_busy_s} against {exact.link_busy_s} s")
    return [f"{w.policy} b{w.batch} p{w.prompt_len} on {profile.name}: {m}" for m in out]


def test_same_answer_as_the_event_simulation_on_a_random_sample():
    rng, choices, compared, differ = random.Random(20261128), profiles(), 0, []
    while compared < 24:
        profile, model, policy = rng.choice(choices), rng.choice(list(MODELS)), rng.choice(list(POLICIES))
        spec = named_model(model)
        prompt = rng.randint(128, min(8192, spec.max_positions - 200) if spec.family == "opt" else 8192)
        w = synthetic(spec, rng.randint(1, 64), prompt, rng.randint(1, 120), policy, "float16",
                      speculated_fraction=rng.uniform(0.02, 0.5) if POLICIES[policy].speculating else None)
        if memory_plan(w, profile).problem is None:
            differ += mismatches(w, profile)
            compared += 1
    assert not differ, differ


def test_per_layer_shares_and_dense_layers_are_exact():
    """Layers that differ (a trace's per-layer shares, InfiniGen's dense leading layers) are not skipped."""
    spec = named_model("llama-2-7b")
    shares = np.linspace(0.05, 0.3, spec.n_layers)
    shares[10:] = 0.12  # identical from layer 10 on: skipped from there
    for profile in (load_profile("a6000-pcie3"), calibrated_cpu()):
        assert not mismatches(synthetic(spec, 4, 1024, 40, "infinigen", "float16", {"dense_layers": 2}, shares),
                              profile)


def test_a_cycle_that_changes_after_the_jump_is_replayed_layer_by_layer(monkeypatch):
    """Llama-3-8B batch 2, prompt 128 on the A100: a cycle the skip found does not hold at its
    check two layers after the jump; the simulation goes back and on layer by layer."""
    restored = []
    monkeypatch.setattr(direct.DirectSimulation, "restore",
                        lambda self, saved, original=direct.DirectSimulation.restore:
                        restored.append(saved[0]) or original(self, saved))
    assert not mismatches(synthetic(named_model("llama-3-8b"), 2, 128, 40, "infinigen", "float16",
                                    speculated_fraction=0.1),
            load_profile("a100-80gb-pcie4"))
    assert restored, "the flip was not exercised"


def test_a_wait_that_grows_while_the_clocks_move_alike_is_not_skipped():
    """Llama-3-8B full, batch 3, prompt 512 on an H100: each layer the compute stream starts at its
    copy's end, and the host, behind at first, issues a little earlier relative to the stream each
    layer, so the wait grows until the stream's own tail binds; the clocks move alike all along.
    Skipping on the clocks alone repeated the first layers' waits (the step's time stayed right)."""
    w = synthetic(named_model("llama-3-8b"), 3, 512, 70, "full", "float16")
    profile = load_profile("h100-sxm")
    exact = simulate(w, profile, memory=memory_plan(w, profile))
    wait = exact.phase_s[1, :, PHASES.index("wait")]
    assert wait[2] < wait[4] < wait[6] < wait[12], "the case no longer has a growing wait"
    assert not mismatches(w, profile)


def test_identical_layers_are_skipped():
    w = synthetic(named_model("opt-13b"), 8, 1920, 64, "infinigen", "float16", speculated_fraction=0.1)
    p = load_profile("a6000-pcie3")
    fast = direct.simulate_direct(w, p, memory_plan(w, p))
    # prefill, the first step and all the others at once: 3 passes of 40 layers, about 5 ops a layer
    assert fast is not None and fast.events < 3 * 40 * 5 / 2


def test_falls_back_where_it_would_not_be_exact():
    w = synthetic(named_model("opt-6.7b"), 4, 1024, 8, "full", "float16")
    half = calibrated_cpu().with_link(5e8, 1e-5, False, "half duplex")  # both directions queue for one link
    assert direct.simulate_direct(w, half, memory_plan(w, half)) is None
    fast, exact = simulate_if_fits(w, half, exact=False), simulate_if_fits(w, half)
    assert fast.result.step_s.tolist() == exact.result.step_s.tolist()
    uneven = replace(w, bytes_d2h=w.bytes_d2h.copy())
    uneven.bytes_d2h[3, 5] = 0  # one step of one layer copies nothing
    assert direct.simulate_direct(uneven, load_profile("h100-sxm"), memory_plan(uneven, load_profile("h100-sxm"))) \
        is None
