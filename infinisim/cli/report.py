"""The reporting verbs: `report` (a page from results you have) and `reproduce paper`."""

from __future__ import annotations

import argparse
import sys

from infinisim.cli import flags
from infinisim.core.errors import InfinisimError
from infinisim.core.files import check_output_dir, read_text

EPILOG = "Docs: docs/REPORTS.md. Errors exit with status 1, usage errors with 2."


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = flags.verb(sub, "report", cmd_report, "plots and a self-contained HTML + Markdown page from results", EPILOG)
    p.add_argument("--plan", help="folder written by `infinisim plan --out`")
    p.add_argument("--validation", help="folder (or validation.json) written by `infinisim validate --out`")
    p.add_argument("--trace", nargs="+", help="traces written by `infinisim run` (quality traces add accuracy plots)")
    p.add_argument("--serving", help="folder written by `infinisim serve --out` (latency CDFs) or `infinisim plan "
                                     "--requests --out` (capacity table, p99 latency vs request rate)")
    p.add_argument("--profile", default="a6000-pcie3",
                   help="profile the timeline excerpt replays a trace on (default a6000-pcie3; 'none' to skip)")
    p.add_argument("--title", default="infinisim report", help="the page's title (default: infinisim report)")
    p.add_argument("--out", default="reports/latest", help="folder for report.html, report.md, figures/ (default "
                                                           "reports/latest)")


def cmd_report(args: argparse.Namespace) -> int:
    """Build one self-contained HTML page (images embedded, nothing fetched) and a Markdown twin from
    a plan folder (Pareto plot, speedup vs batch / prompt / model, simulated breakdown), a validation
    folder (predicted vs measured per step) and traces (measured breakdown, accuracy vs fetched
    fraction for quality traces, a simulated timeline excerpt) and serving results (latency CDFs per
    policy; the capacity table and p99 latency vs request rate). Give at least one."""
    from infinisim.analysis.report import write_report
    from infinisim.analysis.sections import report_sections

    if not (args.plan or args.validation or args.trace or args.serving):
        raise InfinisimError("give --plan, --validation, --trace or --serving (or several)", field="report")
    check_output_dir(args.out, "--out")
    profile = None if args.profile == "none" else args.profile
    sections = report_sections(args.plan, args.validation, args.trace, profile)
    if args.serving:
        from infinisim.analysis.serving_sections import serving_sections

        sections += serving_sections(args.serving)
    intro = f"Made by `{args.command_line}`. Every figure names the command that produced its data."
    page, md = write_report(sections, args.out, args.title, intro)
    print(f"wrote {page} ({len(sections)} sections) and {md}")
    return 0


def add_reproduce_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce a published experiment as a report", epilog=EPILOG,
                       description="Reproduce a published experiment and write it as a report with the "
                                   "published claims beside ours.")
    which = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    paper = flags.verb(which, "paper", cmd_reproduce, "InfiniGen (OSDI 2024): speed sweeps on the A6000/PCIe 3 "
                                                      "profile, accuracy trends on SmolLM2", EPILOG)
    paper.add_argument("--profile", default="a6000-pcie3", help="hardware profile (default: the paper's testbed)")
    paper.add_argument("--prompt-file", help="text the executor reads (default: Python's bundled docs; the paper "
                                             "used PG-19, e.g. ../shared/data/pg19_firstbook.txt)")
    paper.add_argument("--prompt-len", type=flags.positive, default=1920,
                       help="tokens of prompt for the SmolLM2 runs (default 1920, the paper's)")
    paper.add_argument("--gen-len", type=flags.positive, default=24,
                       help="teacher-forced decode steps per SmolLM2 run (default 24)")
    paper.add_argument("--quick", action="store_true", help="fewer, shorter executor runs (a smoke test)")
    paper.add_argument("--out", default="reports/paper", help="folder for the report, traces and tables "
                                                              "(default reports/paper)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """The paper's speed experiments (OPT-13B, prompt 1920, generation 128: batch 4..20; prompt
    384..1920 at batch 8; OPT-6.7B/13B/30B at batch 4; alpha 1..9; partial ratio 0.1..1.0) through
    the simulator on a hardware profile, with InfiniGen's speculated share measured by the executor
    on SmolLM2, and the accuracy trends (recall, perplexity vs fetched fraction; alpha; partial
    ratio) measured by the executor on SmolLM2. Writes traces, tables and one report. 7-8 minutes on
    2 CPU cores (--quick: 2.5)."""
    from infinisim.analysis.paper import PaperSettings, reproduce_paper
    from infinisim.analysis.report import write_report

    check_output_dir(args.out, "--out")
    if args.prompt_file:
        read_text(args.prompt_file, "prompt file")  # before minutes of measuring
    settings = PaperSettings(args.profile, args.prompt_file, args.prompt_len, args.gen_len, args.quick)
    sections, intro = reproduce_paper(settings, args.out, lambda line: print(line, file=sys.stderr, flush=True))
    intro = f"Made by `{args.command_line}`. " + intro
    page, md = write_report(sections, args.out, "InfiniGen (OSDI 2024), reproduced with infinisim", intro)
    print(f"wrote {page} ({len(sections)} sections) and {md}")
    return 0
