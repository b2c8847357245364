"""`infinisim`: one front door to the executor, the simulator and the analysis.

Each verb group has its module (run, simulate, serve, validate, plan, profiles, report); a verb parses
its flags, calls one function of the layers below and prints. Errors below surface as one line
(`InfinisimError`: file and field), exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from infinisim import __version__
from infinisim.cli.flags import EPILOG
from infinisim.cli.plan import add_plan_parser
from infinisim.cli.profiles import add_calibrate_parser, add_profiles_parser
from infinisim.cli.report import add_report_parser, add_reproduce_parser
from infinisim.cli.run import add_models_parser, add_run_parser
from infinisim.cli.serve import add_serve_parser
from infinisim.cli.simulate import add_replay_parser, add_simulate_parser
from infinisim.cli.validate import add_validate_parser
from infinisim.core.errors import InfinisimError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinisim", epilog=EPILOG,
        description="Measure, simulate and plan KV-cache offloading (InfiniGen and baselines) for LLM inference.")
    parser.add_argument("--version", action="version", version=f"infinisim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_run_parser, add_validate_parser, add_replay_parser, add_simulate_parser, add_serve_parser,
                add_plan_parser,
                add_report_parser, add_reproduce_parser, add_calibrate_parser, add_profiles_parser,
                add_models_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["infinisim", *(sys.argv[1:] if argv is None else argv)])  # for provenance
    try:
        return args.func(args)
    except InfinisimError as exc:
        print(f"infinisim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninfinisim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `infinisim ... | head`: the reader left; say nothing more, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
