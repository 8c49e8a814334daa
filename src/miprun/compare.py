"""``miprun compare``: every method on the same calibration data, held-out text and surgery, side by side.

Each method scores once and its scores serve every N. Pruned models are evaluated without copies
(blocks skipped in place). Pruning time is reported in seconds and as a multiple of one plain forward
pass over the same calibration tokens, measured in the same run on the same machine.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miprun import api, estimators
from miprun.architectures import base_model, num_blocks
from miprun.data import eval_windows, load_text, token_windows
from miprun.loading import LoadedModel, load_model
from miprun.methods import check_method
from miprun.oracle import DamageOracle
from miprun.surgery import skip_blocks

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("mi-prun", "mi-optimal", "shortgpt", "angular", "sleb", "ppl-oneshot", "last-n", "random")


@dataclass
class CompareConfig:
    """What to compare and on how much data."""

    num_blocks: Sequence[int] = (3, 6, 9)
    methods: Sequence[str] = DEFAULT_METHODS
    calibration: api.CalibrationConfig | None = None
    estimator: str = estimators.DEFAULT
    estimator_params: dict[str, Any] | None = None
    eval_source: str | None = None  # held-out text (its evaluation split); None: wiki
    eval_samples: int = 16
    eval_seq_len: int = 256
    tasks: Sequence[str] = ()
    task_limit: int | None = None
    # Skip the tasks where held-out perplexity exceeds this multiple of dense (such a model is at chance);
    # None: run them on every row.
    task_max_ppl_ratio: float | None = None
    forward_repeats: int = 3


def forward_pass_seconds(model: Any, windows: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median wall time of one plain forward pass of the model body over ``windows``."""
    body, device = base_model(model), next(model.parameters()).device
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


def compare(loaded: LoadedModel, config: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Prune with every method at every N, evaluate each, and return one JSON-able result."""
    cal = config.calibration or api.CalibrationConfig()
    total = num_blocks(loaded.model)
    ns = sorted(set(config.num_blocks))
    for n in ns:
        api.blocks_to_remove(total, n, None)  # validate before any work
    start = time.perf_counter()
    text = load_text(cal.source, "calibration")
    windows = token_windows(loaded.tokenizer, text, cal.samples, cal.seq_len, cal.seed)
    # Tokenized once here and reused by every method (``token_windows`` memoises the stream), so the
    # pruning times below are the methods' own work on the same tokens as the forward-pass reference.
    data_s = time.perf_counter() - start
    held_text = load_text(config.eval_source, "evaluation")
    held = eval_windows(loaded.tokenizer, held_text, config.eval_seq_len, config.eval_samples)
    oracle = DamageOracle(loaded.model, held, batch_size=cal.batch_size)
    forward_s = forward_pass_seconds(loaded.model, windows, cal.batch_size, config.forward_repeats)
    dense_tasks = _tasks(loaded, [], config) if config.tasks else {}
    task_memo: dict[tuple[int, ...], dict[str, Any]] = {(): dense_tasks}
    rows: list[dict[str, Any]] = []
    for method in config.methods:
        start = time.perf_counter()
        scores = api.score(
            loaded,
            calibration=cal,
            estimator=config.estimator,
            estimator_params=config.estimator_params,
            all_spans=method == "mi-optimal",
            method=method,
            max_blocks=max(ns),
            progress=progress,
            cache=False,
        )
        score_s = time.perf_counter() - start
        for n in ns:
            removed, info = api.select(scores, n, method=method, seed=cal.seed)
            prune_s = score_s + info.seconds
            ppl = oracle(removed)
            row: dict[str, Any] = {
                "method": method,
                "num_blocks": n,
                "removed": removed,
                "ppl": ppl,
                "prune_seconds": prune_s,
                "prune_x_forward": prune_s / forward_s,  # against this run's forward pass
                "estimator": scores.estimator.params() if check_method(method).needs == "mi" else None,
                "mi_set_loss": info.loss,
                "mi_evaluations": info.num_evaluations,
            }
            ratio = config.task_max_ppl_ratio
            if config.tasks and (ratio is None or ppl <= ratio * oracle.dense):
                key = tuple(sorted(removed))  # methods often agree: evaluate each block set once
                if key not in task_memo:
                    task_memo[key] = _tasks(loaded, removed, config)
                row["tasks"] = task_memo[key]
            log.info("%s N=%d removed %s: held-out ppl %.2f", method, n, removed, ppl)
            rows.append(row)
    return {
        "model": loaded.name,
        "num_blocks_total": total,
        "dense_ppl": oracle.dense,
        "dense_tasks": dense_tasks,
        "tasks": list(config.tasks),
        "task_limit": config.task_limit,
        "task_max_ppl_ratio": config.task_max_ppl_ratio,
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
        "estimator": config.estimator,
        "rows": rows,
    }


def _tasks(loaded: LoadedModel, removed: list[int], config: CompareConfig) -> dict[str, Any]:
    from miprun.evaluate import run_tasks

    with skip_blocks(loaded.model, removed):
        return run_tasks(loaded, list(config.tasks), limit=config.task_limit)


def markdown(result: dict[str, Any]) -> str:
    """The comparison table: one row per method and N."""
    task_names = sorted({t for row in result["rows"] for t in row.get("tasks", {})})
    head = [
        "method",
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
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in sorted(result["rows"], key=lambda r: (r["num_blocks"], r["ppl"])):
        accs = [_acc(row, t) for t in task_names]
        lines.append(
            f"| {row['method']} | {row['num_blocks']} | {row['removed']} | {row['ppl']:.2f} | "
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

    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # Cap the axis near the competitive methods so that a catastrophic one does not flatten the rest;
    # its off-scale points sit on the top edge, marked with a triangle.
    largest = max(r["num_blocks"] for r in result["rows"])
    best = min(r["ppl"] for r in result["rows"] if r["num_blocks"] == largest)
    top = min(max(r["ppl"] for r in result["rows"]), 6 * best)
    for m in methods:
        pts = sorted((r["num_blocks"], r["ppl"]) for r in result["rows"] if r["method"] == m)
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
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    times = {
        m: next(r["prune_seconds"] for r in result["rows"] if r["method"] == m and r["num_blocks"] == largest)
        for m in methods
    }
    ax.barh(list(times), list(times.values()), color="tab:blue")
    ax.axvline(result["forward_pass_seconds"], color="black", linestyle=":", label="one forward pass")
    ax.set_xscale("log")
    ax.set_xlabel(f"pruning wall time at N={largest} (s, log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "comparison_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    task_names = sorted({t for r in result["rows"] for t in r.get("tasks", {})})
    if task_names:
        fig, axes = plt.subplots(1, len(task_names), figsize=(5.5 * len(task_names), 4), squeeze=False)
        for ax, task in zip(axes[0], task_names, strict=True):
            for m in methods:
                pts = sorted(
                    (r["num_blocks"], r["tasks"][task]["acc_norm"])
                    for r in result["rows"]
                    if r["method"] == m and task in r.get("tasks", {})
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
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(result: dict[str, Any], folder: str | Path) -> list[Path]:
    """``comparison.json``, ``comparison.md`` and the plots into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "comparison.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (folder / "comparison.md").write_text(markdown(result), encoding="utf-8")
    return [folder / "comparison.json", folder / "comparison.md", *plot(result, folder)]


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
            raise ValueError(
                f"cannot update the comparison: its {key} is {previous.get(key)!r}, this run's is "
                f"{value!r}; rerun every method (without --update) or use the same settings"
            )


def update(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the rows of ``result``'s methods replaced by ``result``'s (same model and data).

    Each row keeps the pruning-time ratio of its own run; the header's forward pass is the latest run's.
    """
    _check_setup(previous, {key: result.get(key) for key in SAME_SETUP})
    fresh = {row["method"] for row in result["rows"]}
    rows = [row for row in previous["rows"] if row["method"] not in fresh] + result["rows"]
    earlier = {row["method"]: previous["forward_pass_seconds"] for row in previous["rows"]}
    earlier.update(previous.get("earlier_forward_pass_seconds", {}))
    kept = {m: s for m, s in earlier.items() if m not in fresh}
    return {**result, "rows": rows, "earlier_forward_pass_seconds": kept}


def run(
    model: str | None,
    config: CompareConfig,
    out: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    update_existing: bool = False,
) -> list[Path]:
    """Load ``model``, compare, write the outputs; returns their paths.

    With ``update_existing``, the methods run here replace their rows in ``out/comparison.json`` and the
    other methods' rows are kept (same model, data and tasks required).
    """
    previous = None
    if update_existing:
        path = Path(out) / "comparison.json"
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--update needs an earlier comparison in {path}: {err}") from err
    loaded = load_model(model, device=device, dtype=dtype)
    if previous is not None:  # what is known before the run is checked before it, not an hour later
        _check_setup(
            previous,
            {
                "model": loaded.name,
                "num_blocks_total": num_blocks(loaded.model),
                "tasks": list(config.tasks),
                "task_limit": config.task_limit,
                "task_max_ppl_ratio": config.task_max_ppl_ratio,
            },
        )
    result = compare(loaded, config, progress=progress)
    return write(update(previous, result) if previous is not None else result, out)
