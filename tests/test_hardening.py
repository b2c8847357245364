"""Hostile inputs and faults: each is one line naming the file or flag at fault, exit status 1 (or 2
for usage errors), no traceback, nothing written and nothing touched outside the output named; and
the short-prompt, strict-JSON and interrupted-write cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.core.files import write_text_atomic
from infinisim.core.policies import POLICIES
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import make_policy

CLI = [sys.executable, "-m", "infinisim.cli"]
TINY = ["--model", "smollm2-135m", "--random-weights"]


def infinisim(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """A folder with a file, a folder, a trace and a truncated plan table to point flags at."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "a-file.txt").write_text("keep me\n")
    (root / "a-folder").mkdir()
    (root / "a-folder" / "inside.txt").write_text("keep me too\n")
    plan = root / "plan"
    plan.mkdir()
    pd.DataFrame({"fits": [True], "profile": ["l4"], "policy": ["full"]}).to_parquet(plan / "plan.parquet")
    (plan / "plan.parquet").write_bytes((plan / "plan.parquet").read_bytes()[:60])
    assert infinisim("run", *TINY, "--prompt-len", "16", "--gen-len", "3", "--policy", "infinigen",
                     "--trace", str(root / "ig.trace.parquet")).returncode == 0
    return {"root": root, "file": root / "a-file.txt", "folder": root / "a-folder", "trace": root / "ig.trace.parquet",
            "plan": plan}


# argv (with {file}, {folder}, {trace}, {plan}, {root} filled in), exit status, words the one line must hold
CASES = [
    (["run", *TINY, "--prompt-len", "99999999"], 1, ["--prompt-len", "beyond"]),
    (["run", *TINY, "--batch", "100000000000"], 1, ["KV cache", "needs"]),
    (["run", *TINY, "--budget", "nan", "--policy", "infinigen"], 2, ["--budget", "nan"]),
    (["run", *TINY, "--alpha", "nan", "--policy", "infinigen"], 2, ["--alpha"]),
    (["run", *TINY, "--temperature", "nan"], 1, ["--temperature"]),
    (["run", *TINY, "--top-p", "nan"], 1, ["--top-p"]),
    (["run", *TINY, "--prompt-len", "8", "--out", "{file}"], 1, ["a-file.txt", "not a folder"]),
    (["run", *TINY, "--prompt-len", "8", "--trace", "{folder}"], 1, ["a-folder", "not a regular file"]),
    (["run", *TINY, "--prompt-len", "8", "--trace", "/dev/full"], 1, ["/dev/full", "not a regular file"]),
    (["run", *TINY, "--prompt-len", "8", "--trace", "{file}/x.parquet"], 1, ["not a folder"]),
    (["run", *TINY, "--prompt-file", "{folder}"], 1, ["a-folder", "not a prompt file"]),
    (["run", *TINY, "--prompt-file", "{root}/absent.txt"], 1, ["absent.txt", "no such prompt file"]),
    (["run", *TINY, "--prompt", ""], 1, ["--prompt", "no tokens"]),
    (["simulate", "--model", "opt-6.7b,opt-13b", "--profile", "l4"], 1, ["unknown model 'opt-6.7b,opt-13b'"]),
    (["simulate", "--model", "nope", "--profile", "l4"], 1, ["unknown model 'nope'"]),
    (["simulate", "--model", "opt-125m", "--profile", "{folder}"], 1, ["a-folder", "not a profile file"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--policy", "infinigen", "--speculated-fraction", "nan"],
     2, ["--speculated-fraction"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--policy", "infinigen"], 1, ["--speculated-fraction"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--out", "{file}"], 1, ["not a folder"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--out", "/dev/null"], 1, ["/dev/null", "not a folder"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--timeline", "/dev/null"], 1, ["not a regular file"]),
    (["simulate", "--model", "llama-3-8b", "--profile", "l4", "--gen-len", "100000000"], 1, ["too long"]),
    (["simulate", "--model", "opt-125m", "--profile", "l4", "--policy", "infinigen", "--from-trace", "{trace}",
      "--alpha", "nan"], 2, ["--alpha"]),
    (["replay", "{trace}", "--profile", "l4", "--out", "/dev/null"], 1, ["not a folder"]),
    (["replay", "{file}", "--profile", "l4"], 1, ["a-file.txt", "not a readable trace"]),
    (["plan", "--model", "nope", "--serial", "--out", "{root}/p"], 1, ["unknown model 'nope'"]),
    (["plan", "--model", "opt-125m", "--profile", "nosuch", "--serial", "--out", "{root}/p"], 1,
     ["nosuch", "no such profile"]),
    (["plan", "--model", "opt-125m", "--profile", "l4", "--out", "{file}"], 1, ["not a folder"]),
    (["plan", "--model", "opt-125m", "--batch", ",".join(map(str, range(1, 2001))), "--prompt-len",
      ",".join(map(str, range(1, 2001))), "--out", "{root}/p"], 1, ["configs, more than"]),
    (["plan", "--model", "opt-125m", "--profile", "l4", "--policy", "full", "--scheduler", "tcp://127.0.0.1:1",
      "--out", "{root}/p"], 1, ["--scheduler", "cannot reach"]),
    (["plan", "--model", "opt-125m", "--profile", "l4", "--target-ms", "nan"], 2, ["--target-ms"]),
    (["report", "--plan", "{plan}", "--out", "{root}/r"], 1, ["plan.parquet", "not a readable plan table"]),
    (["report", "--trace", "{trace}", "--out", "{file}"], 1, ["not a folder"]),
    (["profiles", "show", "{folder}"], 1, ["a-folder", "not a profile file"]),
    (["calibrate", "--out", "{folder}"], 1, ["not a regular file"]),
    (["validate", "--out", "{file}"], 1, ["not a folder"]),
    (["reproduce", "paper", "--out", "{file}"], 1, ["not a folder"]),
    (["reproduce", "paper", "--prompt-file", "{root}/absent.txt", "--out", "{root}/rp"], 1, ["no such prompt file"]),
]


@pytest.mark.parametrize(("argv", "status", "needles"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_hostile_input_is_one_line_and_touches_nothing(argv, status, needles, place):
    before = snapshot(place["root"])
    proc = infinisim(*[a.format(**place) for a in argv])
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert snapshot(place["root"]) == before  # nothing written, nothing replaced
    assert Path("/dev/full").is_char_device() and Path("/dev/null").is_char_device()


def test_plan_where_nothing_fits_says_why(tmp_path):
    proc = infinisim("plan", "--model", "llama-3.1-70b", "--profile", "l4", "--policy", "resident,full",
                     "--batch", "1", "--gen-len", "4", "--serial", "--out", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 configs: 0 fit, 2 do not" in proc.stdout and "device memory (2)" in proc.stdout


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_runs_prompts_of_1_to_16_tokens(name, five_layer_smollm2):
    for length in range(1, 17):
        prompts = [list(range(5, 5 + length)), [7] * max(1, length // 2)]  # a padded batch too
        gen = generate(five_layer_smollm2, prompts, make_policy(name), SamplingConfig(3, stop_at_eos=False))
        assert len(gen.steps) == 3 and all(len(t) == 3 for t in gen.new_tokens)


def test_short_text_prompt_through_the_cli(tmp_path):
    proc = infinisim("run", *TINY, "--prompt", "The capital of France is", "--gen-len", "3",
                     "--policy", "infinigen,h2o,oracle", "--out", str(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_output_is_strict_json(place, tmp_path):
    trace = str(place["trace"])
    outputs = {
        "run": infinisim("run", *TINY, "--prompt-len", "12", "--gen-len", "3", "--policy", "resident,h2o",
                         "--out", str(tmp_path / "runs"), "--json"),
        "replay": infinisim("replay", trace, "--profile", "l4", "--json", "--out", str(tmp_path / "replay")),
        "simulate": infinisim("simulate", "--model", "llama-3.1-70b", "--profile", "l4", "--policy", "resident",
                              "--json"),
        "simulate (fits)": infinisim("simulate", "--model", "opt-125m", "--profile", "l4", "--policy",
                                     "full,infinigen", "--speculated-fraction", "0.1", "--prompt-len", "512", "--json"),
        "validate": infinisim("validate", "--trace", trace, "--profile", "l4", "--out", str(tmp_path / "v"),
                              "--json"),
        "plan": infinisim("plan", "--model", "opt-125m", "--profile", "l4", "--batch", "1", "--policy", "full,h2o",
                          "--prompt-len", "512", "--gen-len", "4", "--serial", "--out", str(tmp_path / "plan"),
                          "--json"),
    }
    for verb, proc in outputs.items():
        assert proc.returncode == (1 if verb == "simulate" else 0), f"{verb}: {proc.stderr}"  # 1: nothing fits
        assert _strict(proc.stdout), verb
    for written in (tmp_path / "replay" / "simulation.json", tmp_path / "v" / "validation.json",
                    tmp_path / "plan" / "plan.json"):
        _strict(written.read_text())


def test_killed_writer_leaves_no_temp_file_for_good(tmp_path):
    target = tmp_path / "x.json"
    stale = tmp_path / ".x.json.abc123.tmp"  # what a writer killed mid-write leaves behind
    stale.write_bytes(b"")
    write_text_atomic(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as a plain open makes it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_plan_workers_die_with_a_killed_planner(tmp_path):
    proc = subprocess.Popen([*CLI, "plan", "--model", "opt-6.7b,opt-13b,llama-3-8b", "--batch", "1,2,4,8,16,32",
                             "--prompt-len", "512,1024,2048", "--gen-len", "64", "--policy", "full,h2o,int4",
                             "--workers", "2", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.2)
    assert len(workers) >= 2, "the planner started no worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and "Z" not in
             Path(f"/proc/{w}/stat").read_text().split()[2]]
    assert alive == [], f"workers outlived the planner: {alive}"


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda c: {**c, "num_hidden_layers": "two"}, "num_hidden_layers", "must be a whole number"),
    (lambda c: {**c, "hidden_size": None}, "hidden_size", "missing value (null)"),
    (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads", "must be at least 1"),
    (lambda c: {**c, "num_hidden_layers": -3}, "num_hidden_layers", "must be at least 1"),
    (lambda c: {**c, "num_key_value_heads": 3}, "num_key_value_heads", "not a multiple"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling", "not implemented"),
    (lambda c: {**c, "hidden_act": "gelu"}, "hidden_act", "not implemented"),
    (lambda c: {**c, "rms_norm_eps": "tiny"}, "rms_norm_eps", "must be a positive number"),
    (lambda c: [c], "config.json", "must be a JSON object"),
    (lambda c: {**c, "model_type": "opt", "ffn_dim": 128, "max_position_embeddings": 64,
                "activation_function": "gelu_new"}, "activation_function", "not implemented"),
])
def test_malformed_hf_config_names_file_and_field(tmp_path, edit, field, message):
    good = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(edit(good)))
    with pytest.raises(InfinisimError) as err:
        load_model(str(tmp_path))
    assert f"config.json: {field}" in str(err.value) or field == "config.json", str(err.value)
    assert message in str(err.value)


def test_sliding_window_models_are_refused_beyond_their_window(tmp_path):
    from infinisim.executor.session import check_shape
    from infinisim.traces.spec import MODELS, ModelSpec

    windowed = ModelSpec.from_dict({**MODELS["mistral-7b"].to_dict(), "sliding_window": 4096})
    check_shape(windowed, 1, 4000, 96, "float16", torch.device("cpu"))
    with pytest.raises(InfinisimError, match="sliding window of 4096"):
        check_shape(windowed, 1, 4096, 32, "float16", torch.device("cpu"))


def test_plan_cache_follows_the_profile_contents_not_its_name(tmp_path, capsys):
    from infinisim.cli import main

    profile = tmp_path / "mine.yaml"
    text = Path(__file__).resolve().parent.parent.joinpath("hwprofiles", "data", "a6000-pcie3.yaml").read_text()
    profile.write_text(text)
    args = ["plan", "--model", "opt-6.7b", "--profile", str(profile), "--batch", "8", "--prompt-len", "512",
            "--gen-len", "4", "--policy", "full", "--serial", "--out", str(tmp_path / "plan")]
    assert main(args) == 0
    fast = pd.read_parquet(tmp_path / "plan" / "plan.parquet")
    profile.write_text(text.replace("h2d_bandwidth: 12.5 GB/s", "h2d_bandwidth: 1.25 GB/s"))
    assert main(args) == 0  # the same --out and cache: the edited profile must not hit the old rows
    slow = pd.read_parquet(tmp_path / "plan" / "plan.parquet")
    assert slow["decode_ms"].iloc[0] > 2 * fast["decode_ms"].iloc[0]
    assert fast["profile"].iloc[0] == "a6000-pcie3"  # the profile's name, not its path
    capsys.readouterr()


def test_breakdown_columns_add_up_to_the_step():
    from dataclasses import replace

    from infinisim.hwprofiles.profile import load_profile
    from infinisim.sim.engine import simulate
    from infinisim.sim.workload import synthetic
    from infinisim.traces.spec import named_model

    gpu = load_profile("h100-sxm")
    for profile in (gpu, replace(gpu, kind="cpu")):
        for policy in ("resident", "full", "infinigen", "h2o"):
            w = synthetic(named_model("llama-3-8b"), 4, 1024, 6, policy, "bfloat16", speculated_fraction=0.1)
            s = simulate(w, profile).summary()
            ph = s["decode_phase_ms"]
            parts = ["embed", "attn", "ffn", "head", "wait", "host"]
            if profile.synchronous:
                parts += ["spec", "gather", "h2d", "d2h"]
            assert sum(ph[p] for p in parts) == pytest.approx(s["decode_ms_mean"], rel=1e-6), (profile.kind, policy)


def test_calibration_flags_what_is_implausible():
    from infinisim.executor.calibrate import _implausible

    assert _implausible([0.05, 0.1], 2e-9, 4e-6, [(8.0, 2048.0, 20e9)]) == []
    warnings = " ".join(_implausible([0.05, 1.3], 0.0, 108e-6, [(8.0, 512.0, 0.1e9)]))
    for words in ("varied by more than", "not slower", "108.0 us per dispatched op", "implausibly slow"):
        assert words in warnings


def test_progress_shows_on_a_pipe(capsys):
    from infinisim.cli.output import Progress

    with Progress("[job]", 3, "steps", "prefill", period=0.05) as bar:
        time.sleep(0.2)  # a long prefill: heartbeats while nothing advances
        bar.update()
        time.sleep(0.12)
    lines = capsys.readouterr().err.splitlines()
    assert any("[job]: prefill" in line for line in lines) and any("[job]: 1/3 steps" in line for line in lines)


def test_unwritable_output_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InfinisimError, match=r"x\.json: cannot write \(Permission denied\)"):
        write_text_atomic(tmp_path / "x.json", "{}")


def test_truncated_gguf_is_one_line(tmp_path):
    from infinisim.executor.loaders import embedded_gguf_path

    data = embedded_gguf_path().read_bytes()
    for cut in (len(data) // 2, 2000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(InfinisimError, match=r"cut\d+\.gguf: (not a GGUF model file|.*truncated)"):
            load_model(str(bad))


def test_a_closed_pipe_is_not_a_traceback():
    """`infinisim ... | head -1`: the reader leaves early; the verb stops quietly (141, as SIGPIPE)."""
    proc = subprocess.Popen([*CLI, "simulate", "--model", "opt-125m", "--profile", "l4", "--prompt-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before it writes anything
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err
