"""`infinisim profiles` (the shipped hardware) and `infinisim calibrate` (this machine)."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.core.files import check_output_file


def add_profiles_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "profiles", cmd_profiles, "list or show hardware profiles")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="one line per shipped profile")
    show = verbs.add_parser("show", help="one profile, validated, in base units")
    show.add_argument("profile", help="a shipped profile's name or a YAML file")


def cmd_profiles(args: argparse.Namespace) -> int:
    """The shipped hardware profiles (hwprofiles/data/*.yaml), or one profile in full."""
    import yaml

    from infinisim.hwprofiles.profile import builtin_profiles, load_profile

    if args.verb == "show":
        profile = load_profile(args.profile)
        print(f"# {profile.path}")
        print(yaml.safe_dump(profile.to_dict(), sort_keys=False, width=110), end="")
        return 0
    print(f"{'name':<17} {'device':<24} {'memory':>7} {'FLOP/s 16b':>10} {'HBM/DRAM':>9} {'link':<13} "
          f"{'H2D':>9} {'host':>8}")
    for name in builtin_profiles():
        p = load_profile(name)
        d, link = p.device, p.link
        print(f"{name:<17} {d.name[:24]:<24} {d.memory / 1e9:>5.0f}GB {d.matmul_flops / 1e12:>7.0f} T "
              f"{d.memory_bandwidth / 1e9:>6.0f}GB/s {link.name[:13]:<13} {link.h2d_bandwidth / 1e9:>5.1f}GB/s "
              f"{p.host.memory / 1e9:>6.0f}GB")
    print("(`infinisim profiles show NAME` for sources and every field; `infinisim calibrate` measures this machine)")
    return 0


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "calibrate", cmd_calibrate, "measure this machine and write a hardware profile")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=flags.DTYPES, default="float32",
                   help="dtype of the streaming and attention measurements (default float32)")
    p.add_argument("--quick", action="store_true", help="a few seconds, smaller shapes (for tests and smoke runs)")
    p.add_argument("--name", help="profile name (default calibrated-HOSTNAME)")
    p.add_argument("--out", default="profiles/calibrated.yaml", help="YAML to write (default profiles/calibrated.yaml)")
    p.add_argument("--tp", type=flags.positive, default=1,
                   help="a profile of one of N tensor-parallel ranks: measured with the threads a rank gets (the "
                        "cores over N, on a CPU), with the all-reduce between N ranks as its node (default 1)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure copies over a sweep of sizes, gathers of scattered KV rows, matmul and attention
    kernels over decoding's shapes, and the per-op launch overhead; write them as a profile YAML
    usable with replay, simulate and validate. Needs torch."""
    import time

    from infinisim.executor.calibrate import calibrate
    from infinisim.executor.session import pick_device
    from infinisim.hwprofiles.profile import write_profile

    check_output_file(args.out)
    device = pick_device(args.device)
    t0 = time.perf_counter()
    if args.tp > 1:
        from infinisim.executor.parallel import calibrate_ranks

        profile = calibrate_ranks(args.tp, device.type, args.dtype, args.quick, args.name,
                                  log=lambda line: print(line, file=sys.stderr))
    else:
        profile = calibrate(device.type, args.dtype, args.quick, args.name,
                            log=lambda line: print(line, file=sys.stderr))
    path = write_profile(profile, args.out)
    print(f"wrote {path} ({profile.name}, {time.perf_counter() - t0:.0f} s)")
    return 0
