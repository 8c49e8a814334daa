"""``miprun compare``: every method (and repair) on the same calibration data, held-out text and surgery.

Each method scores once, capturing only what it reads, and its scores serve every N. Each chosen set is
evaluated cut only and under every requested repair, without copies (blocks skipped in place, repairs
folded in and undone). Pruning time is reported in seconds and as a multiple of one plain forward pass
over the same calibration tokens, measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from miprun import methods
from miprun.data.sources import check_sources
from miprun.errors import InvalidOptionError
from miprun.evaluation.heldout import heldout_windows
from miprun.evaluation.oracle import DamageOracle
from miprun.model.edits import edited
from miprun.model.layouts import base_model, num_blocks
from miprun.model.loading import LoadedModel, as_loaded, check_revision
from miprun.model.placement import input_device
from miprun.model.surgery import skip_blocks
from miprun.options import CompareOptions, with_overrides
from miprun.pipeline import (
    RepairHook,
    RunSettings,
    attach_live,
    blocks_to_remove,
    calibration_windows,
    check,
    check_seq_len,
    estimator_of,
    repair_with,
    score_model,
)
from miprun.pipeline.explicit import check_budget_before_load

log = logging.getLogger(__name__)


def forward_pass_seconds(model: Any, windows: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median wall time of one plain forward pass of the model body over ``windows``."""
    body, device = base_model(model), input_device(model)
    times = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            for i in range(0, len(windows), batch_size):
                body(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(
    loaded: LoadedModel, options: CompareOptions, known_tasks: dict[tuple[Any, ...], Any] | None = None
) -> dict[str, Any]:
    """Prune with every method at every N (under every repair), evaluate each, and return one JSON-able result.

    ``known_tasks`` holds task results already measured with the same tasks and limit (see
    :func:`known_task_results`), keyed like the run's own memo; they are reused instead of re-run.
    """
    opts, cal = options, options.calibration
    total = num_blocks(loaded.model)
    ns = sorted(set(opts.num_blocks))
    for n in ns:
        blocks_to_remove(total, n, None)  # validate before any work
    check_seq_len(loaded, opts.heldout.eval_seq_len, "--eval-seq-len")
    start = time.perf_counter()
    # Tokenized once here and reused by every method (``token_windows`` memoises the stream), so the
    # pruning times below are the methods' own work on the same tokens as the forward-pass reference.
    text, windows = calibration_windows(loaded, cal)
    data_s = time.perf_counter() - start
    held_text, held = heldout_windows(
        loaded.tokenizer, opts.heldout.eval_source, opts.heldout.eval_seq_len, opts.heldout.eval_samples
    )
    oracle = DamageOracle(loaded.model, held, batch_size=cal.batch_size)
    forward_s = forward_pass_seconds(loaded.model, windows, cal.batch_size, opts.forward_repeats)
    task_memo: dict[tuple[Any, ...], dict[str, Any]] = dict(known_tasks or {}) if opts.tasks else {}
    if ((), "none") not in task_memo:
        task_memo[((), "none")] = _tasks(loaded, [], opts) if opts.tasks else {}
    dense_tasks = task_memo[((), "none")]
    estimator = estimator_of(opts.estimation)
    fixes = {name: repair_with(name, opts.repair_params) for name in opts.repairs}
    run = RunSettings(cal, opts.runtime, opts.progress, cache=False, max_blocks=max(ns))
    choices = _choices(loaded, opts, (estimator, fixes), run, ns)
    rows: list[dict[str, Any]] = []
    for repair_name, fix in fixes.items():
        mine = [c for c in choices if c["repair"] == repair_name]
        hook, pass_s = _repair_pass(loaded, fix, [c["removed"] for c in mine], run)
        for choice in mine:
            row = _measure(loaded, oracle, choice, hook, pass_s)
            row["prune_x_forward"] = row["prune_seconds"] / forward_s
            _add_tasks(row, loaded, oracle, opts, task_memo, hook)
            log.info(
                "%s N=%d %s removed %s: ppl %.2f",
                row["method"],
                row["num_blocks"],
                repair_name,
                row["removed"],
                row["ppl"],
            )
            rows.append(row)
    return {
        "model": loaded.name,
        "num_blocks_total": total,
        "dense_ppl": oracle.dense,
        "dense_tasks": dense_tasks,
        "tasks": list(opts.tasks),
        "task_limit": opts.limit,
        "task_max_ppl_ratio": opts.task_max_ppl,
        "forward_pass_seconds": forward_s,
        "tokenize_seconds": data_s,
        "calibration": {
            "source": text.name,
            "windows": cal.samples,
            "seq_len": cal.seq_len,
            "seed": cal.seed,
        },
        "evaluation": {
            "source": held_text.name,
            "windows": int(held.shape[0]),
            "seq_len": int(held.shape[1]),
        },
        "estimator": opts.estimation.estimator,
        "rows": rows,
    }


def _choices(
    loaded: LoadedModel,
    opts: CompareOptions,
    parts: tuple[Any, dict[str, Any]],
    run: RunSettings,
    ns: list[int],
) -> list[dict[str, Any]]:
    """Every method's choice at every N, for every repair (a method that measures sets does so after it).

    Each method scores once, capturing only what it reads; its time is its own.
    """
    estimator, fixes = parts
    found = []
    for name in opts.methods:
        method = methods.build(name)
        start = time.perf_counter()
        scores = score_model(loaded, method, estimator if method.uses_mi else None, run)
        score_s = time.perf_counter() - start
        for repair_name, fix in fixes.items():
            evidence = methods.Evidence(scores.num_blocks, scores.table, dict(scores.evidence))
            start = time.perf_counter()
            attach_live(loaded, method, evidence, fix, run)
            live_s = time.perf_counter() - start
            for n in ns:
                removed, info = methods.run(method, evidence, n, run.calibration.seed)
                found.append(
                    {
                        "method": name,
                        "num_blocks": n,
                        "removed": removed,
                        "repair": repair_name,
                        "mi_set_loss": info.loss,
                        "mi_evaluations": info.num_evaluations,
                        "prune_seconds": score_s + live_s + info.seconds,
                        "estimator": scores.estimator.params()
                        if method.uses_mi and scores.estimator
                        else None,
                        "search": info.params,
                    }
                )
    return found


def _repair_pass(loaded: LoadedModel, fix: Any, sets: list[list[int]], run: RunSettings) -> tuple[Any, float]:
    """One calibration pass that captures what ``fix`` reads for every set at once (none for ``none``)."""
    if fix.name == "none":
        return None, 0.0
    start = time.perf_counter()
    hook = RepairHook(loaded, fix, run)
    hook.prepare(sets)
    return hook, time.perf_counter() - start


def _measure(
    loaded: LoadedModel, oracle: DamageOracle, choice: dict[str, Any], hook: Any, pass_s: float
) -> dict[str, Any]:
    """The row of one choice: held-out perplexity cut only, or with the repair fitted and folded in (then undone)."""
    row = dict(choice)
    if hook is None:
        row["ppl"] = oracle(row["removed"])
        return row
    start = time.perf_counter()
    edits, record = hook.fit(row["removed"])
    row["repair_fit_seconds"] = time.perf_counter() - start
    row["repair_pass_seconds"] = pass_s  # one pass shared by every row of this repair
    with edited(loaded.model, edits), skip_blocks(loaded.model, row["removed"]):
        row["ppl"] = oracle.measure()
    row["repair_record"] = record.to_json()
    return row


def _add_tasks(
    row: dict[str, Any],
    loaded: LoadedModel,
    oracle: DamageOracle,
    opts: CompareOptions,
    memo: dict[tuple[Any, ...], Any],
    hook: Any,
) -> None:
    """Zero-shot tasks for the row's model, once per (block set, repair), unless it is far worse than dense."""
    ratio = opts.task_max_ppl
    if not opts.tasks or (ratio is not None and row["ppl"] > ratio * oracle.dense):
        return
    key = (tuple(sorted(row["removed"])), row["repair"])
    if key not in memo:
        edits = hook.edits(row["removed"]) if hook is not None else {}
        with edited(loaded.model, edits):
            memo[key] = _tasks(loaded, row["removed"], opts)
    row["tasks"] = memo[key]


def known_task_results(previous: dict[str, Any]) -> dict[tuple[Any, ...], Any]:
    """The task results of an earlier comparison that do not depend on its calibration: the dense model's and
    every cut-only block set's (a repaired model's depend on the repair's fit, so they are measured again)."""
    known: dict[tuple[Any, ...], Any] = (
        {((), "none"): previous["dense_tasks"]} if previous.get("dense_tasks") else {}
    )
    for row in previous["rows"]:
        if row.get("repair", "none") == "none" and row.get("tasks"):
            known[(tuple(sorted(row["removed"])), "none")] = row["tasks"]
    return known


def _tasks(loaded: LoadedModel, removed: list[int], opts: CompareOptions) -> dict[str, Any]:
    from miprun.evaluation.evaluate import run_tasks

    with skip_blocks(loaded.model, removed):
        return run_tasks(loaded, list(opts.tasks), limit=opts.limit)


def markdown(result: dict[str, Any]) -> str:
    """The comparison table: one row per method and N."""
    task_names = sorted({t for row in result["rows"] for t in row.get("tasks", {})})
    repairs = sorted({row.get("repair", "none") for row in result["rows"]})
    with_repair = repairs != ["none"]
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
    lines = [
        f"## {result['model']}: {result['num_blocks_total']} blocks, dense held-out perplexity "
        f"{result['dense_ppl']:.2f} ({result['evaluation']['windows']} x {result['evaluation']['seq_len']} tokens)",
        "",
        f"One plain forward pass over the {result['calibration']['windows']} x {result['calibration']['seq_len']} "
        f"calibration tokens: {result['forward_pass_seconds']:.2f} s (median, same run). Pruning times "
        f"exclude loading the calibration text and tokenizing it once ({result.get('tokenize_seconds', 0.0):.1f} s, "
        "shared by every method).",
        *_earlier_note(result),
        *_task_note(result, task_names),
        *_verified_note(result),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in sorted(result["rows"], key=lambda r: (r["num_blocks"], r["ppl"])):
        accs = [_acc(row, t) for t in task_names]
        repair_cell = f"{row.get('repair', 'none')} | " if with_repair else ""
        lines.append(
            f"| {row['method']} | {repair_cell}{row['num_blocks']} | {row['removed']} | {row['ppl']:.2f} | "
            + "".join(f"{a} | " for a in accs)
            + f"{row['prune_seconds']:.1f} | {row['prune_x_forward']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _earlier_note(result: dict[str, Any]) -> list[str]:
    earlier = result.get("earlier_forward_pass_seconds") or {}
    if not earlier:
        return []
    by_run: dict[float, list[str]] = {}
    for method, seconds in sorted(earlier.items()):
        by_run.setdefault(seconds, []).append(method)
    return [
        "",
        *(
            f"The rows of {', '.join(methods)} come from an earlier run and are timed against its forward "
            f"pass ({seconds:.2f} s)."
            for seconds, methods in by_run.items()
        ),
    ]


def _verified_note(result: dict[str, Any]) -> list[str]:
    """Each method that measures its candidates with the model (mi-verified, mi-search) against SLEB, where
    the comparison ran both: the perplexity gap and the time ratio."""
    rows = {(r["method"], r["num_blocks"], r.get("repair", "none")): r for r in result["rows"]}
    lines = []
    for method in sorted({key[0] for key in rows if key[0] != "sleb" and _measures_with_model(key[0])}):
        pairs = [
            (key[1:], row, rows[("sleb", *key[1:])])
            for key, row in sorted(rows.items())
            if key[0] == method and ("sleb", *key[1:]) in rows
        ]
        if not pairs:
            continue
        lines += [
            "",
            f"{method} against SLEB (same N, same repair; pruning time in forward passes of each row's run): "
            + "; ".join(
                f"N={n}{'' if repair == 'none' else ' + ' + repair}: {v['ppl']:.2f} vs {s['ppl']:.2f} "
                f"({100 * (v['ppl'] / s['ppl'] - 1):+.1f} %) in "
                f"{v['prune_x_forward'] / s['prune_x_forward']:.3f}x SLEB's pruning time"
                for (n, repair), v, s in pairs
            )
            + ".",
        ]
    return lines


def _measures_with_model(name: str) -> bool:
    """Whether the method measures candidate sets with the model at choice time (it has live evidence)."""
    return name in methods.REGISTRY and bool(methods.REGISTRY.get(name).live_keys)


def _task_note(result: dict[str, Any], task_names: list[str]) -> list[str]:
    if not task_names:
        return []
    dense = ", ".join(
        f"{t} {result['dense_tasks'][t]['acc_norm']:.3f}" for t in task_names if t in result["dense_tasks"]
    )
    note = f"Zero-shot acc_norm of the dense model: {dense}."
    if result.get("task_max_ppl_ratio") is not None:
        note += (
            f" Tasks are skipped (blank) where held-out perplexity exceeds "
            f"{result['task_max_ppl_ratio']:g}x dense."
        )
    return ["", note]


def _acc(row: dict[str, Any], task: str) -> str:
    value = row.get("tasks", {}).get(task, {}).get("acc_norm")
    return f"{value:.3f}" if isinstance(value, float) else ""


def plot(result: dict[str, Any], folder: Path) -> list[Path]:
    """Held-out perplexity vs blocks removed, accuracy, and pruning time (log axis), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from miprun.output.report import write_figure

    methods = list(dict.fromkeys(_label(r) for r in result["rows"]))
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # Cap the axis near the competitive methods so that a catastrophic one does not flatten the rest;
    # its off-scale points sit on the top edge, marked with a triangle.
    largest = max(r["num_blocks"] for r in result["rows"])
    best = min(r["ppl"] for r in result["rows"] if r["num_blocks"] == largest)
    top = min(max(r["ppl"] for r in result["rows"]), 6 * best)
    for m in methods:
        pts = sorted((r["num_blocks"], r["ppl"]) for r in result["rows"] if _label(r) == m)
        xs, ys = zip(*pts, strict=True)
        off = any(y > top for y in ys)
        ax.plot(
            xs, [min(y, top) for y in ys], marker="^" if off else "o", label=f"{m} (off scale)" if off else m
        )
    ax.axhline(result["dense_ppl"], color="black", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_ylim(result["dense_ppl"] * 0.9, top * 1.05)
    ax.set_xticks(sorted({r["num_blocks"] for r in result["rows"]}))
    ax.set_xlabel("blocks removed")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(result["model"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "comparison_ppl.png")
    write_figure(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    times = {
        m: next(
            r["prune_seconds"] + r.get("repair_pass_seconds", 0.0) + r.get("repair_fit_seconds", 0.0)
            for r in result["rows"]
            if _label(r) == m and r["num_blocks"] == largest
        )
        for m in methods
    }
    ax.barh(list(times), list(times.values()), color="tab:blue")
    ax.axvline(result["forward_pass_seconds"], color="black", linestyle=":", label="one forward pass")
    ax.set_xscale("log")
    ax.set_xlabel(f"pruning wall time at N={largest} (s, log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "comparison_time.png")
    write_figure(fig, paths[-1])

    task_names = sorted({t for r in result["rows"] for t in r.get("tasks", {})})
    if task_names:
        fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4), squeeze=False)
        for ax, task in zip(axes[0], task_names, strict=True):
            for m in methods:
                pts = sorted(
                    (r["num_blocks"], r["tasks"][task]["acc_norm"])
                    for r in result["rows"]
                    if _label(r) == m and task in r.get("tasks", {})
                )
                if pts:  # rows skipped for perplexity (see task_max_ppl_ratio) have no accuracy
                    ax.plot(*zip(*pts, strict=True), marker="o", label=m)
            dense = result["dense_tasks"].get(task, {}).get("acc_norm")
            if dense is not None:
                ax.axhline(dense, color="black", linestyle=":", label="dense")
            ax.set_title(f"{task} (acc_norm)")
            ax.set_xlabel("blocks removed")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(folder / "comparison_accuracy.png")
        write_figure(fig, paths[-1])
    return paths


COMPARISON_NAME = "comparison.json"
COMPARISON_KIND = "miprun-comparison"


def write(
    result: dict[str, Any], folder: str | Path, *, overwrite: bool = False, inputs: tuple[Path, ...] = ()
) -> list[Path]:
    """``comparison.json``, ``comparison.md`` and the plots into ``folder``, as one atomic output.

    The folder follows ``prune``'s policy (:func:`miprun.atomic.write_steps`): an existing one is replaced
    only with ``overwrite`` and only when it holds nothing but an earlier comparison's files.
    """
    from miprun.atomic import atomic_write_text, write_json, write_steps

    folder = Path(folder)
    plots: list[Path] = []

    def tables(d: Path) -> None:
        write_json(d / COMPARISON_NAME, {**result, "kind": COMPARISON_KIND}, indent=1)
        atomic_write_text(d / "comparison.md", markdown(result))

    steps: list[tuple[str, Callable[[Path], None]]] = [
        ("comparison", tables),
        ("plots", lambda d: plots.extend(plot(result, d))),
    ]
    write_steps(folder, steps, overwrite=overwrite, progress=False, inputs=inputs, manifest=COMPARISON_NAME)
    return [folder / COMPARISON_NAME, folder / "comparison.md", *(folder / p.name for p in plots)]


# What must match for rows of two runs to share one table.
SAME_SETUP = (
    "model",
    "num_blocks_total",
    "calibration",
    "evaluation",
    "tasks",
    "task_limit",
    "task_max_ppl_ratio",
)


def _check_setup(previous: dict[str, Any], setup: dict[str, Any]) -> None:
    """Refuse to merge into ``previous`` a run whose ``setup`` (some of :data:`SAME_SETUP`) differs."""
    for key, value in setup.items():
        if previous.get(key) != value:
            raise InvalidOptionError(
                f"cannot update the comparison: its {key} is {previous.get(key)!r}, this run's is "
                f"{value!r}; rerun every method (without --update) or use the same settings"
            )


def _label(row: dict[str, Any]) -> str:
    """A row's curve in the plots: the method, with its repair when it has one."""
    repair_name = row.get("repair", "none")
    return row["method"] if repair_name == "none" else f"{row['method']} + {repair_name}"


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["method"], row.get("repair", "none")


def update(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the rows of ``result``'s methods replaced by ``result``'s (same model and data).

    Each row keeps the pruning-time ratio of its own run; the header's forward pass is the latest run's.
    """
    _check_setup(previous, {key: result.get(key) for key in SAME_SETUP})
    fresh = {row["method"] for row in result["rows"]}
    fresh_keys = {_row_key(row) for row in result["rows"]}
    rows = [row for row in previous["rows"] if _row_key(row) not in fresh_keys] + result["rows"]
    earlier = {row["method"]: previous["forward_pass_seconds"] for row in previous["rows"]}
    earlier.update(previous.get("earlier_forward_pass_seconds", {}))
    kept = {m: s for m, s in earlier.items() if m not in fresh}
    return {**result, "rows": rows, "earlier_forward_pass_seconds": kept}


def run(
    model: str | LoadedModel | None,
    out: str | Path,
    options: CompareOptions | None = None,
    *,
    update_existing: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> list[Path]:
    """Load ``model``, compare, write the outputs; returns their paths.

    With ``update_existing``, the methods run here replace their rows in ``out/comparison.json`` and the
    other methods' rows are kept (same model, data and tasks required); the earlier comparison is then
    replaced without ``overwrite``. Otherwise an existing ``out`` is replaced only with ``overwrite``, and
    only when it is an earlier comparison (see :func:`write`).
    """
    from miprun.atomic import check_output, locked_output

    opts = with_overrides(options or CompareOptions(), **overrides)
    check(opts)
    from miprun.evaluation.evaluate import check_tasks

    check_tasks(opts.tasks)
    check_revision(model, opts.revision)
    check_sources(opts.calibration.source, opts.heldout.eval_source)
    previous = None
    if update_existing:
        path = Path(out) / COMPARISON_NAME
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidOptionError(f"--update needs an earlier comparison in {path}: {err}") from err
    _check_out(Path(out))
    replace = overwrite or update_existing
    inputs = _inputs(model, opts)
    check_output(out, replace, inputs=inputs, manifest=COMPARISON_NAME)  # before any work
    for n in opts.num_blocks:  # against a local folder's config.json; any other source once it is loaded
        check_budget_before_load(model, [], n, None)
    with locked_output(out):
        loaded = as_loaded(model, opts.runtime, revision=opts.revision)
        if loaded.path is not None:
            inputs = (*inputs, Path(loaded.path))
            check_output(out, replace, inputs=inputs, manifest=COMPARISON_NAME)
        if previous is not None:  # what is known before the run is checked before it, not an hour later
            _check_setup(
                previous,
                {
                    "model": loaded.name,
                    "num_blocks_total": num_blocks(loaded.model),
                    "tasks": list(opts.tasks),
                    "task_limit": opts.limit,
                    "task_max_ppl_ratio": opts.task_max_ppl,
                },
            )
        result = compare(loaded, opts, known_task_results(previous) if previous is not None else None)
        merged = update(previous, result) if previous is not None else result
        return write(merged, out, overwrite=replace, inputs=inputs)


def _inputs(model: Any, opts: CompareOptions) -> tuple[Path, ...]:
    """Files and folders the comparison reads, which its output folder must neither be nor contain."""
    found = []
    for value in (model, opts.calibration.source, opts.heldout.eval_source):
        if isinstance(value, (str, Path)) and Path(value).expanduser().exists():
            found.append(Path(value).expanduser())
    return tuple(found)


def _check_out(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet) whose parent is writable: checked before any work."""
    import os

    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"--out {out} is a file; compare writes a folder of results")
    parent = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise InvalidOptionError(f"--out {out}: {parent} is not writable; choose another folder")
