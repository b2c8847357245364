"""The report's figures: pure functions from tables to PNG bytes, each carrying what was run to make it.

Every function takes plain data (DataFrames, dicts, a SimResult) and returns a `Figure`; nothing
here runs a model or a simulation, so a figure is as reproducible as the command in its `ran`.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# decode-step phases grouped the way a reader asks about them
GROUPS = {"compute": ("embed", "attn", "ffn", "head", "comm"), "host": ("host",), "speculation": ("spec",),
          "gather": ("gather",), "transfer": ("h2d", "d2h"), "wait": ("wait",)}
COLOURS = {"compute": "#4c72b0", "host": "#b5b5b5", "speculation": "#dd8452", "gather": "#937860",
           "transfer": "#55a868", "wait": "#c44e52"}
POLICY_COLOURS = {"resident": "#7f7f7f", "full": "#1f77b4", "int4": "#9467bd", "h2o": "#d62728",
                  "infinigen": "#2ca02c", "oracle": "#bcbd22"}
SPARE_COLOURS = ("#17becf", "#8c564b", "#e377c2", "#ff7f0e")  # policies without a colour of their own


def policy_colour(name: str) -> str:
    return POLICY_COLOURS.get(name) or SPARE_COLOURS[sum(map(ord, name)) % len(SPARE_COLOURS)]


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    ran: str  # the command (or steps) that produced the data, shown under the figure
    png: bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)  # nothing cut at the edges
    _pyplot().close(fig)
    return buffer.getvalue()


def grouped_phases(phase_ms: dict[str, float]) -> dict[str, float]:
    """Busy ms per decode step by group (compute, speculation, gather, transfer, wait)."""
    return {group: float(sum(phase_ms.get(p, 0.0) for p in members)) for group, members in GROUPS.items()}


def breakdown(labels: Sequence[str], phase_ms: Sequence[dict[str, float]], step_ms: Sequence[float], name: str,
              title: str, ran: str) -> Figure:
    """Per run, two bars: the compute stream (computing, waiting for copies, starved while the host
    issues work: together the step), and the work beside it (speculation, gather, transfer); the
    step's wall time is marked. On a GPU the second bar runs beside the first; on a CPU everything
    is serial and the two add up. Runs far slower than the rest are cut at 4x the median step (their
    value written at the cut), so one slow run does not squeeze the others."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.9 * len(labels) + 1.9))
    rows = (("compute", "wait", "host"), ("speculation", "gather", "transfer"))
    limit = 4 * float(np.median(step_ms)) if len(step_ms) > 1 else None
    limit = limit if limit is not None and max(step_ms) > limit else None
    for i, phases in enumerate(phase_ms):
        grouped = grouped_phases(phases)
        for r, groups in enumerate(rows):
            left = 0.0
            for group in groups:
                ax.barh(i + 0.38 * r, grouped[group], left=left, height=0.34, color=COLOURS[group],
                        label=group if i == 0 else None)
                left += grouped[group]
        if limit is not None and step_ms[i] > limit:
            ax.text(limit, i + 0.19, f" {step_ms[i]:.0f} ms >", va="center", ha="right", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    y = np.arange(len(labels))
    ax.scatter(step_ms, y + 0.19, marker="|", s=500, color="black", zorder=3, label="step time")
    if limit is not None:
        ax.set_xlim(0, limit)
    ax.set_yticks(y + 0.19, labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (upper bar: the compute stream; lower: speculation, gather, copies)")
    ax.legend(fontsize=8, ncol=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, markerscale=0.35)
    ax.set_title(title, fontsize=10, pad=24)
    return Figure(name, title, ran, _png(fig))


def plan_breakdown(rows: pd.DataFrame, name: str, title: str, ran: str) -> Figure:
    """`breakdown` of rows of the planner's table (one per policy: decode_ms and a `<phase>_ms` column per phase)."""
    phases = [p for members in GROUPS.values() for p in members]
    return breakdown(list(rows["policy"]), [{p: row.get(f"{p}_ms", 0.0) for p in phases} for _, row in rows.iterrows()],
                     list(rows["decode_ms"]), name, title, ran)


def panels(rows: pd.DataFrame, x: str, ys: Sequence[tuple[str, str]], hue: str, name: str, title: str, ran: str,
           xlabel: str | None = None, categorical: bool = False, reference: float | None = None,
           log_x: bool = False) -> Figure:
    """One panel per (column, label) in `ys`, one line per value of `hue` (coloured by its first
    word, a policy), against `x`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(max(6.5, 4.6 * len(ys)), 3.6), squeeze=False)
    order = list(dict.fromkeys(rows[x])) if categorical else None
    for ax, (column, label) in zip(axes[0], ys, strict=True):
        for key, group in rows.groupby(hue, sort=False):
            group = group.dropna(subset=[column])
            if group.empty:
                continue
            xs = [order.index(v) for v in group[x]] if order else group[x]
            style = "o" if order else "o-"  # no lines between categories: they are not a scale
            ax.plot(xs, group[column], style, ms=5, label=str(key), color=policy_colour(str(key).split()[0]))
        if order:
            ax.set_xticks(range(len(order)), order)
        if log_x:
            ax.set_xscale("log")
        if reference is not None:
            ax.axhline(reference, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    return Figure(name, title, ran, _png(fig))


def validation_steps(comparisons: list[dict[str, Any]], name: str, ran: str) -> Figure:
    """Predicted vs measured decode latency per step, one panel per run."""
    plt = _pyplot()
    n = len(comparisons)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, c in zip(axes[0], comparisons, strict=True):
        steps = np.arange(1, len(c["per_step_ms"]["measured"]) + 1)
        ax.plot(steps, c["per_step_ms"]["measured"], "o-", ms=3, label="measured")
        ax.plot(steps, c["per_step_ms"]["predicted"], "s--", ms=3, label="predicted")
        ax.set_title(f"{c['policy']} b{c['batch']} p{c['prompt_len']}\nMAPE {c['step']['mape']:.1f}%", fontsize=9)
        ax.set_xlabel("decode step")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    title = f"predicted vs measured per step: {comparisons[0]['model']} on {comparisons[0]['profile']}"
    fig.suptitle(title, fontsize=10)
    return Figure(name, title, ran, _png(fig))


def timeline(spans: Sequence[tuple[str, str, int, int, float, float]], step: int, name: str, title: str, ran: str
             ) -> Figure:
    """One decode step of a simulated run: what each stream did when (a Perfetto view in miniature)."""
    plt = _pyplot()
    streams = ["host", "compute", "spec", "h2d", "d2h"]
    mine = [s for s in spans if s[2] == step]
    t0 = min(s[4] for s in mine) if mine else 0.0
    fig, ax = plt.subplots(figsize=(9, 2.8))
    phase_group = {p: g for g, members in GROUPS.items() for p in members}
    phase_group["bookkeeping"] = "host"  # the host thread's own work between ops
    seen: set[str] = set()
    for stream, phase, _, _, start, end in mine:
        group = phase_group.get(phase, "compute")
        ax.barh(streams.index(stream), (end - start) * 1e3, left=(start - t0) * 1e3, height=0.6,
                color=COLOURS[group], edgecolor="white", linewidth=0.3,
                label=group if group not in seen else None)
        seen.add(group)
    ax.set_yticks(range(len(streams)), streams)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms since the start of decode step {step}")
    ax.legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title, fontsize=10, pad=24)
    return Figure(name, title, ran, _png(fig))


POLICY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pareto_plot(rows: pd.DataFrame, front: pd.DataFrame, name: str, ran: str) -> Figure:
    """Every config that fits (latency vs throughput: colour = hardware, marker = policy), and the
    Pareto front per hardware profile drawn as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    fit = rows[rows["fits"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {p: POLICY_MARKERS[i % len(POLICY_MARKERS)] for i, p in enumerate(dict.fromkeys(fit["policy"]))}
    for i, (profile, group) in enumerate(fit.groupby("profile")):
        colour = colours[i % len(colours)]
        for policy, points in group.groupby("policy"):
            ax.scatter(points["decode_ms"], points["tokens_per_s"], s=14, alpha=0.4, color=colour,
                       marker=markers[policy])
        line = front[front["profile"] == profile].sort_values("decode_ms")
        ax.plot(line["decode_ms"], line["tokens_per_s"], "-", color=colour, label=profile)
        for policy, points in line.groupby("policy"):
            ax.scatter(points["decode_ms"], points["tokens_per_s"], s=30, color=colour, marker=markers[policy],
                       edgecolor="black", linewidth=0.5, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-token latency (ms per decode step)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.grid(alpha=0.3, which="both")
    lines, names = ax.get_legend_handles_labels()
    policies = [plt.Line2D([], [], linestyle="none", marker=m, color="grey") for m in markers.values()]
    blank = plt.Line2D([], [], linestyle="none")
    ax.legend([blank, *lines, blank, *policies], ["hardware (colour):", *names, "policy (marker):", *markers],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    title = "latency vs throughput: every config that fits, and the Pareto front per hardware (line)"
    ax.set_title(title, fontsize=9)
    return Figure(name, title, ran, _png(fig))


def latency_cdfs(latency: dict[str, pd.DataFrame], name: str, ran: str) -> Figure:
    """Per policy, the share of requests served within each TTFT and each TPOT (empirical CDFs)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, column, label, scale in ((axes[0], "ttft_s", "time to first token (s)", 1.0),
                                     (axes[1], "tpot_s", "time per output token (ms)", 1e3)):
        for policy, table in latency.items():
            values = np.sort(table[column].dropna().to_numpy()) * scale
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=policy,
                        color=policy_colour(policy))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency per request, by policy", fontsize=10)
    return Figure(name, "Latency per request, by policy (CDF)", ran, _png(fig))


def serving_validation_cdfs(comparisons: list[dict[str, Any]], name: str, ran: str, credit: str | None = None
                            ) -> Figure:
    """Per policy, measured (solid) and predicted (dashed) CDFs of TTFT and TPOT over the requests."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, column, label, scale in ((axes[0], "ttft_s", "time to first token (s)", 1.0),
                                     (axes[1], "tpot_s", "time per output token (ms)", 1e3)):
        for c in comparisons:
            for side, style in (("measured", "-"), ("predicted", "--")):
                values = np.sort([v for v in c["latency"][side][column] if v is not None]) * scale
                if len(values):
                    ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", linestyle=style,
                            label=f"{c['policy']} {side}", color=policy_colour(c["policy"]))
        ax.set_xlabel(label)
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = "Live server (solid) vs serving simulator (dashed), per request"
    fig.suptitle(title + (f"\n{textwrap.fill(credit, 130)}" if credit else ""), fontsize=8)
    return Figure(name, title, ran, _png(fig))
