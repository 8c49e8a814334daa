"""The human report beside a pruned checkpoint: ``report.png`` (block and span MI) and ``report.md``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from miprun.plan import PrunePlan

PLOT_NAME = "report.png"
SUMMARY_NAME = "report.md"


def span_matrix(plan: PrunePlan) -> np.ndarray:
    """``(T, T)`` normalised span MI, ``NaN`` where a span was not evaluated; row = first, column = last."""
    t = plan.num_blocks_before
    grid = np.full((t, t), np.nan)
    for row in plan.scores["spans"]:
        grid[row["first"], row["last"]] = row["nmi"]
    return grid


def plot(plan: PrunePlan, path: Path) -> None:
    """Per-block normalised MI with the removed blocks marked, beside the span MI heat map."""
    blocks = plan.scores["blocks"]
    idx = [b["block"] for b in blocks]
    nmi = [b["nmi"] for b in blocks]
    removed = set(plan.removed)
    fig, (ax_blocks, ax_spans) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    colors = ["tab:red" if i in removed else "tab:blue" for i in idx]
    ax_blocks.bar(idx, nmi, color=colors)
    ax_blocks.set_xlabel("block (0-based)")
    ax_blocks.set_ylabel("normalised MI(input ; output)")
    ax_blocks.set_title(f"{plan.model['name']}: red = removed {sorted(removed)}")
    low = min(nmi) if nmi else 0.0
    ax_blocks.set_ylim(max(0.0, low - 0.05), 1.0)
    grid = span_matrix(plan)
    im = ax_spans.imshow(
        np.ma.masked_invalid(grid), origin="lower", cmap="viridis", vmin=np.nanmin(grid), vmax=1.0
    )
    ax_spans.set_xlabel("last block of span")
    ax_spans.set_ylabel("first block of span")
    ax_spans.set_title(f"span NMI ({int(np.isfinite(grid).sum())} spans evaluated)")
    fig.colorbar(im, ax=ax_spans, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(plan: PrunePlan) -> str:
    """A short Markdown summary of what was removed, why, and at what cost."""
    s = plan.search
    lines = [
        f"# miprun report: {plan.model['name']}",
        "",
        f"Removed **{len(plan.removed)} of {plan.num_blocks_before}** blocks (0-based, original numbering): "
        f"`{plan.removed}` with `{s.method}`, estimator `{plan.estimator['name']}`.",
        "",
        "| | value |",
        "|---|---|",
        f"| blocks before / after | {plan.num_blocks_before} / {plan.num_blocks_after} |",
        f"| set loss (sum over runs of 1 - NMI) | {s.loss:.4f} |",
        f"| exact optimum of the set loss | {s.optimal_loss:.4f} `{s.optimal_removed}` |"
        if s.optimal_loss is not None
        else "| exact optimum | not computed |",
        f"| gap to the optimum | {s.gap:.4f} |" if s.gap is not None else "| gap | n/a |",
        f"| iterations / evaluations (MI values, scores or forward passes) | {s.iterations} / {s.num_evaluations} |",
        f"| stop reason | {s.stop_reason} |",
        f"| calibration | {plan.calibration.source}: {plan.calibration.num_windows} x {plan.calibration.seq_len}"
        f" tokens, seed {plan.calibration.seed} |",
    ]
    ev = plan.evaluation
    if "dense_ppl" in ev and "pruned_ppl" in ev:
        lines.append(
            f"| held-out perplexity ({ev['source']}, {ev['windows']} x {ev['seq_len']}) | "
            f"dense {ev['dense_ppl']:.2f} -> pruned {ev['pruned_ppl']:.2f} |"
        )
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {phase} | {sec:.2f} |" for phase, sec in plan.timings.items()]
    lines += ["", f"![block and span MI]({PLOT_NAME})", ""]
    return "\n".join(lines)


def write_report(plan: PrunePlan, folder: Path) -> None:
    """Write ``report.png`` and ``report.md`` into ``folder``."""
    plot(plan, folder / PLOT_NAME)
    (folder / SUMMARY_NAME).write_text(summary(plan), encoding="utf-8")
