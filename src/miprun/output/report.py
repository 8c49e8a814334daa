"""The human report beside a pruned checkpoint: ``report.png`` (block and span scores) and ``report.md``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from miprun.atomic import atomic_write_bytes, atomic_write_text
from miprun.output.manifest import PrunePlan

PLOT_NAME = "report.png"
SUMMARY_NAME = "report.md"


def span_matrix(plan: PrunePlan) -> np.ndarray:
    """``(T, T)`` normalised span MI, ``NaN`` where a span was not evaluated; row = first, column = last."""
    t = plan.num_blocks_before
    grid = np.full((t, t), np.nan)
    for row in (plan.scores or {}).get("spans", []):
        grid[row["first"], row["last"]] = row["nmi"]
    return grid


def block_scores(plan: PrunePlan) -> tuple[list[float], str] | None:
    """Per-block scores to plot and their name: the NMI of each block, else the method's own per-block scores."""
    if plan.scores is not None:
        return [b["nmi"] for b in plan.scores["blocks"]], "normalised MI(input ; output)"
    own = plan.search.params.get("scores")
    if isinstance(own, list) and len(own) == plan.num_blocks_before:
        return [float(x) for x in own], f"{plan.search.method} score per block"
    return None


def plot(plan: PrunePlan, path: Path) -> None:
    """Per-block scores with the removed blocks marked, beside the span MI heat map when there is one."""
    found = block_scores(plan)
    removed = set(plan.removed)
    spans = plan.scores is not None
    fig, axes = plt.subplots(1, 2 if spans else 1, figsize=(13 if spans else 8, 4.8), squeeze=False)
    ax_blocks = axes[0][0]
    idx = list(range(plan.num_blocks_before))
    values, label = found if found is not None else ([1.0] * len(idx), "block (no per-block scores)")
    ax_blocks.bar(idx, values, color=["tab:red" if i in removed else "tab:blue" for i in idx])
    ax_blocks.set_xlabel("block (0-based)")
    ax_blocks.set_ylabel(label)
    ax_blocks.set_title(f"{plan.model.name}: red = removed {sorted(removed)}")
    if plan.scores is not None:
        low = min(values) if values else 0.0
        ax_blocks.set_ylim(max(0.0, low - 0.05), 1.0)
        grid = span_matrix(plan)
        ax_spans = axes[0][1]
        im = ax_spans.imshow(
            np.ma.masked_invalid(grid), origin="lower", cmap="viridis", vmin=np.nanmin(grid), vmax=1.0
        )
        ax_spans.set_xlabel("last block of span")
        ax_spans.set_ylabel("first block of span")
        ax_spans.set_title(f"span NMI ({int(np.isfinite(grid).sum())} spans evaluated)")
        fig.colorbar(im, ax=ax_spans, fraction=0.046)
    fig.tight_layout()
    write_figure(fig, path)


def summary(plan: PrunePlan) -> str:
    """A short Markdown summary of what was removed, why, and at what cost."""
    s = plan.search
    estimator = f", estimator `{plan.estimator['name']}`" if plan.estimator else ""
    lines = [
        f"# miprun report: {plan.model.name}",
        "",
        f"Removed **{len(plan.removed)} of {plan.num_blocks_before}** blocks (0-based, original numbering): "
        f"`{plan.removed}` with `{s.method}`{estimator}; repair `{plan.repair.name}`.",
        "",
        "| | value |",
        "|---|---|",
        f"| blocks before / after | {plan.num_blocks_before} / {plan.num_blocks_after} |",
    ]
    if s.loss is not None and s.optimal_loss is not None and s.gap is not None:
        lines += [
            f"| MI set loss (sum over runs of 1 - NMI) | {s.loss:.4f} |",
            f"| exact optimum of the set loss | {s.optimal_loss:.4f} `{s.optimal_removed}` |",
            f"| gap to the optimum | {s.gap:.4f} |",
        ]
    lines += [
        f"| iterations / evaluations (MI values, scores or forward passes) | {s.iterations} / {s.num_evaluations} |",
        f"| stop reason | {s.stop_reason} |",
        f"| calibration | {_calibration(plan)} |",
    ]
    ev = plan.evaluation
    if ev is not None and ev.pruned_ppl is not None:
        lines.append(
            f"| held-out perplexity ({ev.source}, {ev.windows} x {ev.seq_len}) | "
            f"dense {ev.dense_ppl:.2f} -> pruned {ev.pruned_ppl:.2f} |"
        )
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {sec:.2f} |" for phase, sec in plan.timings.items()]
    lines += ["", f"![block and span MI]({PLOT_NAME})", ""]
    return "\n".join(lines)


def write_report(plan: PrunePlan, folder: Path) -> None:
    """Write ``report.png`` and ``report.md`` into ``folder``."""
    plot(plan, folder / PLOT_NAME)
    atomic_write_text(folder / SUMMARY_NAME, summary(plan))


def write_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically, and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _calibration(plan: PrunePlan) -> str:
    cal = plan.calibration
    if cal.num_windows == 0:  # the blocks were given, not chosen (--blocks)
        return cal.source
    return f"{cal.source}: {cal.num_windows} x {cal.seq_len} tokens, seed {cal.seed}"
