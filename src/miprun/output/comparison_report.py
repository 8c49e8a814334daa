"""A comparison shown and written: the markdown table (with its notes), the plots, and the output folder
of ``miprun compare``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from miprun import methods
from miprun.output.comparison import COMPARISON_KIND, COMPARISON_NAME, CUT_ONLY, Comparison, ComparisonRow


def markdown(result: Comparison) -> str:
    """The comparison table: one row per method, repair and N."""
    task_names = _task_names(result)
    with_repair = {row.repair for row in result.rows} != {CUT_ONLY}
    head = [
        "method",
        *(["repair"] if with_repair else []),
        "N",
        "removed",
        "held-out ppl",
        *[f"{t} acc_norm" for t in task_names],
        "prune s",
        "x fwd",
    ]
    ev, cal = result.evaluation, result.calibration
    lines = [
        f"## {result.model}: {result.num_blocks_total} blocks, dense held-out perplexity "
        f"{result.dense_ppl:.2f} ({ev.windows} x {ev.seq_len} tokens)",
        "",
        f"One plain forward pass over the {cal.windows} x {cal.seq_len} "
        f"calibration tokens: {result.forward_pass_seconds:.2f} s (median, same run). Pruning times "
        f"exclude loading the calibration text and tokenizing it once ({result.tokenize_seconds:.1f} s, "
        "shared by every method).",
        *_earlier_note(result),
        *_task_note(result, task_names),
        *_verified_note(result),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in sorted(result.rows, key=lambda r: (r.num_blocks, r.ppl)):
        accs = [_acc(row, t) for t in task_names]
        repair_cell = f"{row.repair} | " if with_repair else ""
        lines.append(
            f"| {row.method} | {repair_cell}{row.num_blocks} | {row.removed} | {row.ppl:.2f} | "
            + "".join(f"{a} | " for a in accs)
            + f"{row.prune_seconds:.1f} | {row.prune_x_forward:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _task_names(result: Comparison) -> list[str]:
    return sorted({t for row in result.rows for t in row.tasks or {}})


def _earlier_note(result: Comparison) -> list[str]:
    earlier = result.earlier_forward_pass_seconds or {}
    if not earlier:
        return []
    by_run: dict[float, list[str]] = {}
    for method, seconds in sorted(earlier.items()):
        by_run.setdefault(seconds, []).append(method)
    return [
        "",
        *(
            f"The rows of {', '.join(names)} come from an earlier run and are timed against its forward "
            f"pass ({seconds:.2f} s)."
            for seconds, names in by_run.items()
        ),
    ]


def _verified_note(result: Comparison) -> list[str]:
    """Each method that measures its candidates with the model (its class has live evidence) against the
    reference method (the class whose ``reference`` names it, SLEB), where the comparison ran both: the
    perplexity gap and the time ratio."""
    rows = {(r.method, r.num_blocks, r.repair): r for r in result.rows}
    lines = []
    for ref, label in _references(result):
        measuring = sorted({key[0] for key in rows if key[0] != ref and _measures_with_model(key[0])})
        for method in measuring:
            pairs = [
                (key[1:], row, rows[(ref, *key[1:])])
                for key, row in sorted(rows.items())
                if key[0] == method and (ref, *key[1:]) in rows
            ]
            if not pairs:
                continue
            lines += [
                "",
                f"{method} against {label} (same N, same repair; pruning time in forward passes of each row's "
                "run): "
                + "; ".join(
                    f"N={n}{'' if repair == CUT_ONLY else ' + ' + repair}: {v.ppl:.2f} vs {s.ppl:.2f} "
                    f"({100 * (v.ppl / s.ppl - 1):+.1f} %) in "
                    f"{v.prune_x_forward / s.prune_x_forward:.3f}x {label}'s pruning time"
                    for (n, repair), v, s in pairs
                )
                + ".",
            ]
    return lines


def _references(result: Comparison) -> list[tuple[str, str]]:
    """(method name, display name) of each registered reference method with rows in the comparison."""
    present = {r.method for r in result.rows}
    return [
        (name, cls.reference) for name, cls in methods.REGISTRY.items() if cls.reference and name in present
    ]


def _measures_with_model(name: str) -> bool:
    """Whether the method measures candidate sets with the model at choice time (it has live evidence)."""
    return name in methods.REGISTRY and bool(methods.REGISTRY.get(name).live_keys)


def _task_note(result: Comparison, task_names: list[str]) -> list[str]:
    if not task_names:
        return []
    dense = ", ".join(
        f"{t} {result.dense_tasks[t]['acc_norm']:.3f}" for t in task_names if t in result.dense_tasks
    )
    note = f"Zero-shot acc_norm of the dense model: {dense}."
    if result.task_max_ppl_ratio is not None:
        note += f" Tasks are skipped (blank) where held-out perplexity exceeds {result.task_max_ppl_ratio:g}x dense."
    return ["", note]


def _acc(row: ComparisonRow, task: str) -> str:
    value = (row.tasks or {}).get(task, {}).get("acc_norm")
    return f"{value:.3f}" if isinstance(value, float) else ""


def plot(result: Comparison, folder: Path) -> list[Path]:
    """Held-out perplexity vs blocks removed, accuracy, and pruning time (log axis), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from miprun.output.report import write_figure

    labels = list(dict.fromkeys(r.label for r in result.rows))
    rows = result.rows
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # Cap the axis near the competitive methods so that a catastrophic one does not flatten the rest;
    # its off-scale points sit on the top edge, marked with a triangle.
    largest = max(r.num_blocks for r in rows)
    best = min(r.ppl for r in rows if r.num_blocks == largest)
    top = min(max(r.ppl for r in rows), 6 * best)
    for m in labels:
        pts = sorted((r.num_blocks, r.ppl) for r in rows if r.label == m)
        xs, ys = zip(*pts, strict=True)
        off = any(y > top for y in ys)
        ax.plot(
            xs, [min(y, top) for y in ys], marker="^" if off else "o", label=f"{m} (off scale)" if off else m
        )
    ax.axhline(result.dense_ppl, color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_ylim(result.dense_ppl * 0.9, top * 1.05)
    ax.set_xticks(sorted({r.num_blocks for r in rows}))
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(result.model)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "comparison_ppl.png")
    write_figure(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    times = {
        m: next(
            r.prune_seconds + (r.repair_pass_seconds or 0.0) + (r.repair_fit_seconds or 0.0)
            for r in rows
            if r.label == m and r.num_blocks == largest
        )
        for m in labels
    }
    ax.barh(list(times), list(times.values()), color="tab:blue")
    ax.axvline(result.forward_pass_seconds, color="black", linestyle=":", label="one forward pass")
    ax.set_xscale("log")
    ax.set_xlabel(f"pruning wall time at N={largest} (s, log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "comparison_time.png")
    write_figure(fig, paths[-1])

    task_names = _task_names(result)
    if task_names:
        fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4), squeeze=False)
        for ax, task in zip(axes[0], task_names, strict=True):
            for m in labels:
                pts = sorted(
                    (r.num_blocks, (r.tasks or {})[task]["acc_norm"])
                    for r in rows
                    if r.label == m and task in (r.tasks or {})
                )
                if pts:  # rows skipped for perplexity (see task_max_ppl_ratio) have no accuracy
                    ax.plot(*zip(*pts, strict=True), marker="o", label=m)
            dense = result.dense_tasks.get(task, {}).get("acc_norm")
            if dense is not None:
                ax.axhline(dense, color="black", linestyle=":", label="dense")
            ax.set_title(f"{task} (acc_norm)")
            ax.set_xlabel("blocks removed")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(folder / "comparison_accuracy.png")
        write_figure(fig, paths[-1])
    return paths


def write(
    result: Comparison, folder: str | Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()
) -> list[Path]:
    """``comparison.json``, ``comparison.md`` and the plots into ``folder``, as one atomic output.

    The folder follows ``prune``'s policy (:func:`miprun.atomic.write_steps`): an existing one is replaced
    only with ``overwrite`` and only when it holds nothing but an earlier comparison's files.
    """
    from miprun.atomic import atomic_write_text, write_json, write_steps

    folder = Path(folder)
    plots: list[Path] = []

    def tables(d: Path) -> None:
        write_json(d / COMPARISON_NAME, {**result.to_json(), "kind": COMPARISON_KIND}, indent=1)
        atomic_write_text(d / "comparison.md", markdown(result))

    steps: list[tuple[str, Callable[[Path], None]]] = [
        ("comparison", tables),
        ("plots", lambda d: plots.extend(plot(result, d))),
    ]
    write_steps(folder, steps, overwrite=overwrite, progress=False, inputs=inputs, manifest=COMPARISON_NAME)
    return [folder / COMPARISON_NAME, folder / "comparison.md", *(folder / p.name for p in plots)]
