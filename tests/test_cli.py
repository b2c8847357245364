"""The `infinisim` command as a user runs it: output, traces, clear one-line errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinisim.traces.trace import read_trace

CLI = [sys.executable, "-m", "infinisim.cli"]


def infinisim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("infinisim: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help():
    top = infinisim("--help")
    assert top.returncode == 0 and "run" in top.stdout and "models" in top.stdout
    run = infinisim("run", "--help")
    for flag in ("--model", "--random-weights", "--prompt-len", "--batch", "--gen-len", "--policy", "--device",
                 "--dtype", "--trace"):
        assert flag in run.stdout


def test_run_random_weights_two_policies(tmp_path):
    proc = infinisim("run", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "24", "--batch", "2",
                     "--gen-len", "4", "--policy", "resident,full", "--ignore-eos", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    by_policy = {s["policy"]: s for s in result["summaries"]}
    assert set(by_policy) == {"resident", "full"}
    assert by_policy["resident"]["bytes_h2d_total"] == 0 and by_policy["full"]["bytes_h2d_total"] > 0
    for s in by_policy.values():
        trace = read_trace(s["trace"])
        assert trace.run["batch"] == 2 and trace.run["prompt_lens"] == [24, 24]
        assert trace.run["weights"] == "random" and len(trace.steps) == 4
    assert result["first_sequence_text"]["resident"] == result["first_sequence_text"]["full"]


@pytest.mark.slow
def test_run_embedded_model_table(tmp_path):
    trace = tmp_path / "paris.trace.parquet"
    proc = infinisim("run", "--prompt", "The capital of France is", "--gen-len", "3", "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "first sequence: ' Paris" in proc.stdout
    for column in ("prefill s", "decode ms/tok", "p50", "p99", "tok/s", "H2D/step"):
        assert column in proc.stdout
    assert str(trace) in proc.stdout and read_trace(trace).run["policy"] == "resident"


def test_bad_inputs_give_one_line_errors(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(infinisim("run", "--model", str(tmp_path / "absent.gguf"), "--out", str(out)),
                          "absent.gguf", "no such file")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model" * 100)
    assert_one_line_error(infinisim("run", "--model", str(garbage), "--out", str(out)),
                          "garbage.gguf", "not a GGUF model file")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    assert_one_line_error(infinisim("run", "--model", str(folder), "--out", str(out)), "config.json", "malformed")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert_one_line_error(infinisim("run", "--model", str(folder), "--out", str(out)),
                          "config.json", "num_attention_heads", "missing field")
    assert_one_line_error(infinisim("run", "--policy", "resident,bogus", "--out", str(out)), "--policy", "bogus")
    assert_one_line_error(infinisim("run", "--model", "llama-3.1-70b", "--random-weights", "--out", str(out)),
                          "needs", "GB")
    assert_one_line_error(infinisim("run", "--model", "llama-2-7b", "--out", str(out)), "--random-weights")
    assert not out.exists()


def test_ctrl_c_leaves_no_partial_trace(tmp_path):
    proc = subprocess.Popen([*CLI, "run", "--model", "smollm2-135m", "--random-weights", "--prompt-len", "32",
                             "--gen-len", "2000", "--ignore-eos", "--out", str(tmp_path)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            # a suite started in the background (`make test &` without job control) passes
                            # SIGINT down ignored, and Python then installs no KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    for line in proc.stderr:
        if "decoding" in line or time.time() > deadline:
            break
    time.sleep(1.0)  # well into the decode loop
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 2000-token decode running behind a failed test
    assert proc.returncode == 130, err
    assert "no trace written" in err
    assert list(tmp_path.iterdir()) == []
