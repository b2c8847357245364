"""Every check that needs a GPU, in one go, results as JSON under one folder (for the session that
gets a device: `bash benchmarks/gpu_check.sh`; `--device cpu --tiny` is the dry run `make test` does).

1. Correctness on the device: every lossless policy at a 100% budget (alpha 1000: every row) gives
   the dense (`resident`) logits, teacher-forced; the copy engines have their own streams (int4
   and h2o lose information by design: their speed is measured in 3).
2. `calibrate` on the device (bfloat16) -> profile.yaml.
   Weight offloading: half of every block's weights in pinned host memory, streamed on a copy
   stream, gives the resident logits (resident and infinigen).
3. Llama-3-8B with random weights, bfloat16, batch 8, prompt 2048, 32 tokens, under resident,
   full, infinigen, h2o and int4 through the executor, replayed on the calibrated profile
   (`validate`) -> traces, validation.json, validation.png.
4. The same with half of every block's weights streamed from the host (resident, infinigen),
   replayed -> weights-on-host/.
5. Live serving: a Poisson request stream served by the executor with continuous batching
   (resident, infinigen), against the serving simulator on the calibrated profile -> serving/.
Nothing is downloaded: random weights, prompts from Python's bundled docs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import torch

from infinisim.core.files import write_json
from infinisim.core.policies import POLICIES

FULL = {"model": "llama-3-8b", "dtype": "bfloat16", "batch": 8, "prompt_len": 2048, "gen_len": 32,
        "check_model": "smollm2-135m", "check_prompt": 256, "serve": (40, 2.0, 1024, 64)}
TINY = {"model": "smollm2-135m", "dtype": "float32", "batch": 2, "prompt_len": 64, "gen_len": 4,
        "check_model": "smollm2-135m", "check_prompt": 48, "serve": (3, 20.0, 32, 4)}
# serve: requests, arrivals per second, prompt and output tokens of each


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def relative_error(got: list, want: list) -> float:
    """The largest step's relative logit error, ||got - want|| / ||want||."""
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True))


def correctness(device: str, shape: dict) -> dict:
    """Every policy at a 100% budget against dense attention, float32, teacher-forced."""
    from infinisim.executor.generate import SamplingConfig, generate
    from infinisim.executor.kvcache import CopyEngine, Measurement
    from infinisim.executor.loaders import load_model
    from infinisim.executor.policies import make_policy

    loaded = load_model(shape["check_model"], "float32", device, random_weights=True)
    ids = list(range(100, 100 + shape["check_prompt"] + 8))
    prompts, forced = [ids[:-8], ids[3:-13]], [ids[-8:], ids[-8:]]  # a padded batch of two
    measure = Measurement(forced=forced, keep_logits=True)
    dense = generate(loaded.model, prompts, make_policy("resident"), SamplingConfig(8), measure=measure).logits
    out = {}
    for name, spec in POLICIES.items():
        if spec.quantized or spec.evicting:
            continue  # lossy by design (int4's 4 bits, h2o's evictions); their speed is measured below
        knobs = {"budget": 1.0, "alpha": 1000.0} if spec.selective else {}
        policy = make_policy(name, **knobs)
        logits = generate(loaded.model, prompts, policy, SamplingConfig(8), measure=measure).logits
        error = relative_error(logits, dense)
        out[name] = {"max_relative_error": error, "ok": error <= 1e-4}
        log(f"correctness {name}: relative logit error {error:.2e}")
    out["weights_on_host"] = streamed_weights(device, shape, prompts, measure, dense)
    engine = CopyEngine(torch.device(device))
    out["copy_streams"] = {"h2d": engine.h2d_stream is not None, "d2h": engine.d2h_stream is not None,
                           "ok": (engine.h2d_stream is not None) == (device == "cuda")}
    return out


def streamed_weights(device: str, shape: dict, prompts: list, measure: object, dense: list) -> dict:
    """Half of every block's weights streamed from (pinned) host memory: the resident logits."""
    import copy

    from infinisim.executor.generate import SamplingConfig, generate
    from infinisim.executor.loaders import load_model
    from infinisim.executor.policies import make_policy
    from infinisim.executor.weight_stream import WeightStream

    on_cpu = load_model(shape["check_model"], "float32", "cpu", random_weights=True).model
    reference = copy.deepcopy(on_cpu).to(device)
    WeightStream(on_cpu, 0.5, torch.device(device), None)
    out = {}
    for name, knobs in (("resident", {}), ("infinigen", {"budget": 1.0, "alpha": 1000.0})):
        want = generate(reference, prompts, make_policy(name, **knobs), SamplingConfig(8), measure=measure).logits
        got = generate(on_cpu, prompts, make_policy(name, **knobs), SamplingConfig(8), measure=measure).logits
        error = relative_error(got, want)
        out[name] = error
        log(f"weights on host, {name}: relative logit error {error:.2e}")
    return {"max_relative_error": out, "ok": max(out.values()) <= 1e-5}


def serving(out: Path, profile: str, device: str, shape: dict, command: str) -> list[dict]:
    """The executor serving a Poisson stream live, compared with the serving simulator."""
    from infinisim.analysis.serving_validation import validate_serving
    from infinisim.sim.latency import SLO
    from infinisim.sim.server import Scheduler
    from infinisim.traces.requests import synthetic_stream

    n, rate, prompt, gen = shape["serve"]
    data = validate_serving(out, synthetic_stream(rate, n, prompt_len=prompt, gen_len=gen), Scheduler(max_seqs=16),
                            SLO(), profile=profile, policies=["resident", "infinigen"], model=shape["model"],
                            random_weights=True, device=device, dtype=shape["dtype"], command=command, log=log)
    return [{"policy": c["policy"], "aggregate": c["aggregate"], "forwards": c["forwards"]}
            for c in data["comparisons"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes and a quick calibration (the CPU dry run)")
    p.add_argument("--out", default="benchmarks/results/gpu-check")
    args = p.parse_args()
    shape = TINY if args.tiny else FULL
    out = Path(args.out)
    started = time.perf_counter()
    result: dict = {"device": args.device, "tiny": args.tiny, "shape": shape, "torch": torch.__version__,
                    "host": platform.node(),
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}

    log("1/5 correctness of every policy against dense attention")
    result["correctness"] = correctness(args.device, shape)

    log("2/5 calibrate")
    from infinisim.executor.calibrate import calibrate
    from infinisim.hwprofiles.profile import write_profile

    profile = calibrate(args.device, "float32" if args.tiny else "bfloat16", quick=args.tiny, log=log)
    result["profile"] = str(write_profile(profile, out / "profile.yaml"))

    log("3/5 the executor's runs, replayed on the calibrated profile")
    from infinisim.analysis.validation import validate

    data = validate(out, profile=result["profile"], policies=["resident", "full", "infinigen", "h2o", "int4"],
                    batch=shape["batch"], prompt_len=shape["prompt_len"], gen_len=shape["gen_len"],
                    model=shape["model"], random_weights=True, device=args.device, dtype=shape["dtype"],
                    command=f"benchmarks/gpu_check.py --device {args.device}" + (" --tiny" if args.tiny else ""),
                    log=log)
    result["validation"] = [{k: c[k] for k in ("policy", "decode_ms_measured", "decode_ms_predicted", "step")}
                            for c in data["comparisons"]]

    log("4/5 half of the weights streamed from the host, replayed")
    data = validate(out / "weights-on-host", profile=result["profile"],
                    policies=["resident"] if args.tiny else ["resident", "infinigen"],
                    batch=shape["batch"], prompt_len=shape["prompt_len"], gen_len=shape["gen_len"],
                    model=shape["model"], random_weights=True, device=args.device, dtype=shape["dtype"],
                    weights_on_host=0.5, command=f"benchmarks/gpu_check.py --device {args.device}"
                    + (" --tiny" if args.tiny else ""), log=log)
    result["validation_weights_on_host"] = [{k: c[k] for k in ("policy", "decode_ms_measured", "decode_ms_predicted",
                                                                 "step")} for c in data["comparisons"]]
    log("5/5 live serving against the serving simulator")
    result["serving"] = serving(out / "serving", result["profile"], args.device, shape,
                                f"benchmarks/gpu_check.py --device {args.device}" + (" --tiny" if args.tiny else ""))
    result["seconds"] = time.perf_counter() - started
    result["ok"] = all(v["ok"] for v in result["correctness"].values())
    write_json(result, out / "gpu-check.json")
    print(json.dumps({"ok": result["ok"], "seconds": round(result["seconds"]), "out": str(out)}))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
