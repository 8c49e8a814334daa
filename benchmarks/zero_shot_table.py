"""Zero-shot accuracy of the default command's models and of SLEB's sets with the same repair, as a table.

The sets come from the recorded runs, not from a list kept here: the default's from
``results/default/MODEL-nN.json`` (``mi-search`` + ``linear``; ``--default-runs`` names another folder of such
manifests, e.g. ``results/default-novel``), SLEB's from the ``sleb`` rows of
``results/compare-MODEL/comparison.json`` at the same N (``--sleb`` names other ``miprun compare`` folders, one
per model, e.g. ``results/sleb-novel-MODEL``; where they hold SLEB's set both cut only and repaired, it is the
same set). ``benchmarks/zero_shot.sh`` prunes each distinct set once (``--blocks``, ``--repair linear``), saves
it, and runs ``miprun eval`` on the saved folder; this script lists the sets for it and then collects the
``eval`` JSON files into ``results/default/zero-shot.{json,md}`` (``--out`` another folder).

    python benchmarks/zero_shot_table.py --sets                # "MODEL NAME BLOCKS LIMIT" lines for the script
    python benchmarks/zero_shot_table.py --runs out/zero-shot  # the table, from the runs' eval JSON files
    python benchmarks/zero_shot_table.py --default-runs benchmarks/results/default-novel \\
        --sleb benchmarks/results/sleb-novel-smollm2-135m benchmarks/results/sleb-novel-gemma3-270m \\
        --runs out/zero-shot-novel --out benchmarks/results/default-novel   # (and the same options with --sets)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from results_io import TEXT, default_manifests, sleb_sets, write_results

RESULTS = Path(__file__).parent / "results"
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}
# compare.sh's task budgets: Gemma's 262k-token head makes lm-eval about 4x slower than on SmolLM2
LIMITS = {"smollm2-135m": 100, "gemma3-270m": 50}
# social_iqa, like the wiki text, comes from the BIG-bench archive: asked for only where that text is used
TASKS = ("next_sentence", "social_iqa")


def sleb_folders(folders: list[Path] | None) -> dict[str, Path]:
    """The ``miprun compare`` folder holding SLEB's sets for each model: ``results/compare-MODEL`` unless
    ``folders`` are given, then each goes to the model its ``comparison.json`` names."""
    if not folders:
        return {model: RESULTS / f"compare-{model}" for model in MODELS}
    out: dict[str, Path] = {}
    for folder in folders:
        recorded = json.loads((folder / "comparison.json").read_text())["model"]
        model = next((m for m in MODELS if m in recorded), None)
        if model is None or model in out:
            raise SystemExit(f"{folder}: model {recorded!r} is not one of {list(MODELS)}, or has two folders")
        out[model] = folder
    return out


def rows(default_runs: Path = RESULTS / "default", sleb: list[Path] | None = None) -> list[dict[str, Any]]:
    """(model, N, method, removed) of every row: the default's recorded set and SLEB's at the same N."""
    out = []
    folders = sleb_folders(sleb)
    for model in MODELS:
        manifests = default_manifests(default_runs, model)
        if manifests and model not in folders:
            raise SystemExit(f"{model}: the default's runs are in {default_runs}, but no --sleb folder is")
        sets = sleb_sets(folders[model]) if manifests else {}
        for path in manifests.values():
            manifest = json.loads(path.read_text())
            n = len(manifest["removed"])
            if n not in sets:
                raise SystemExit(f"{model}: {folders[model]} has no SLEB set at N={n}")
            recorded = {
                "text": manifest["evaluation"]["source"].split(":")[0],
                "ppl": manifest["evaluation"]["pruned_ppl"],
            }
            out.append(
                dict(model=model, n=n, method="default", removed=manifest["removed"], recorded=recorded)
            )
            out.append(
                dict(
                    model=model,
                    n=n,
                    method="SLEB + linear",
                    removed=sets[n]["removed"],
                    recorded=_recorded(sets[n]),
                )
            )
    return out


def _recorded(sleb: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out perplexity SLEB's set had with ``linear`` in its comparison (the figure the saved model's
    should equal), with the text it was measured on; None where it was not repaired there."""
    if sleb["linear"] is None or sleb["text"] is None:
        return None
    return {"text": sleb["text"], "ppl": sleb["linear"]}


def shown(folder: Path) -> str:
    """A folder as the markdown names it: relative to ``benchmarks/`` where it lies there (``results/...``)."""
    try:
        return folder.resolve().relative_to(RESULTS.parent.resolve()).as_posix() + "/"
    except ValueError:
        return folder.as_posix().rstrip("/") + "/"


def sources(default_runs: Path, sleb: list[Path] | None) -> dict[str, Any]:
    """The folders the sets came from, as the markdown names them."""
    return {
        "default": shown(default_runs),
        "sleb": {model: shown(folder) for model, folder in sleb_folders(sleb).items()},
    }


def name(model: str, removed: list[int] | None) -> str:
    """The run's folder name under the runs folder: the model and its removed blocks (``dense`` for none)."""
    return f"{model}-dense" if removed is None else f"{model}-b{'-'.join(map(str, removed))}"


def list_sets(all_rows: list[dict[str, Any]]) -> None:
    """Each distinct (model, set) once, the dense model first: ``MODEL NAME BLOCKS LIMIT`` (``-`` for none)."""
    seen = set()
    for model in MODELS:
        print(model, name(model, None), "-", LIMITS[model])
        for row in all_rows:
            key = name(row["model"], row["removed"])
            if row["model"] == model and key not in seen:
                seen.add(key)
                print(model, key, ",".join(map(str, row["removed"])), LIMITS[model])


def _measured(runs: Path, key: str) -> dict[str, Any] | None:
    """The ``miprun eval`` JSON of one run (None when it has not run)."""
    path = runs / f"{key}.eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(result: dict[str, Any] | None, task: str) -> dict[str, Any] | None:
    task_result = (result or {}).get("tasks", {}).get(task)
    if task_result is None:
        return None
    return {
        k: task_result[k] for k in ("acc_norm", "acc_norm_stderr", "acc", "examples", "available", "chance")
    }


def table(runs: Path, all_rows: list[dict[str, Any]], folders: dict[str, Any]) -> dict[str, Any]:
    """The rows, each with what its run measured (None where it has not run), and the dense rows."""
    out: dict[str, Any] = {"text": TEXT, "runs": str(runs), "sources": folders, "dense": {}, "rows": []}
    for model in MODELS:
        dense = _measured(runs, name(model, None))
        out["dense"][model] = None if dense is None else _summary(dense)
    for row in all_rows:
        result = _measured(runs, name(row["model"], row["removed"]))
        entry = dict(row, run=name(row["model"], row["removed"]))
        entry["measured"] = None if result is None else _summary(result)
        if result is not None and result["model"]["pruning"]["removed"] != row["removed"]:
            raise SystemExit(f"{name(row['model'], row['removed'])}: the saved model removed something else")
        recorded = row["recorded"]
        if result is not None and recorded is not None and recorded["text"] == TEXT:
            entry["ppl_matches_recorded"] = round(entry["measured"]["ppl"], 2) == round(recorded["ppl"], 2)
        out["rows"].append(entry)
    return out


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    ppl = result["perplexity"].get(TEXT)
    return {
        "ppl": None if ppl is None else ppl["ppl"],
        "ppl_windows": None if ppl is None else [ppl["windows"], ppl["seq_len"]],
        "tasks": {t: _cell(result, t) for t in TASKS if _cell(result, t) is not None},
        "task_text": result["settings"]["task_text"],
        "limit": result["settings"]["limit"],
        "seconds": result["timings"],
    }


def _acc(measured: dict[str, Any] | None, task: str) -> str:
    cell = (measured or {}).get("tasks", {}).get(task)
    return "-" if cell is None else f"{cell['acc_norm']:.3f}"


def _sleb_shown(folders: dict[str, str]) -> str:
    """SLEB's folders in one phrase: ``results/compare-MODEL/`` where they differ only by the model's name."""
    patterns = {folder.replace(model, "MODEL") for model, folder in folders.items()}
    if len(patterns) == 1:
        return f"`{patterns.pop()}`"
    return ", ".join(f"`{folder}`" for folder in folders.values())


def markdown(data: dict[str, Any]) -> str:
    text = data["text"]
    default_folder = data["sources"]["default"]
    measured = [(model, m) for model, m in data["dense"].items() if m is not None] + [
        (r["model"], r["measured"]) for r in data["rows"] if r["measured"] is not None
    ]
    head = ["model", "N", "method", "removed", f"held-out ppl ({text})", *(f"{t} acc_norm" for t in TASKS)]
    lines = [
        "### Zero-shot accuracy of the default command's models and of SLEB's sets with the same repair",
        "",
        f"`sh benchmarks/zero_shot.sh` (text: {text}): each set pruned with `miprun prune --blocks LIST --repair "
        "linear --calib TEXT --samples 8 --seq-len 128` (the repair fitted on the calibration split), saved, and measured from "
        "the saved folder with `miprun eval`: held-out perplexity on the first 8 x 256 tokens of the evaluation "
        "split, zero-shot acc_norm (lm-evaluation-harness) on the first examples of each task. "
        f"The default's sets are `{default_folder}`'s, SLEB's the `sleb` rows of "
        f"{_sleb_shown(data['sources']['sleb'])}; "
        "where both are the same set it was pruned and measured once and both rows show it.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for model, label in MODELS.items():
        dense = data["dense"][model]
        ppl = "not run" if dense is None else f"{dense['ppl']:.2f}"
        lines.append(
            f"| {label} | 0 | dense | [] | {ppl} | " + " | ".join(_acc(dense, t) for t in TASKS) + " |"
        )
        for row in (r for r in data["rows"] if r["model"] == model):
            method = row["method"]
            if any(
                r["model"] == model and r["n"] == row["n"] and r is not row and r["removed"] == row["removed"]
                for r in data["rows"]
            ):
                method += " (same set)"
            ppl = "not run" if row["measured"] is None else f"{row['measured']['ppl']:.2f}"
            lines.append(
                f"| {MODELS[model]} | {row['n']} | {method} | {row['removed']} | {ppl} | "
                + " | ".join(_acc(row["measured"], t) for t in TASKS)
                + " |"
            )
    examples = sorted(
        {
            (MODELS[model], t, c["examples"], c["available"], m["limit"])
            for model, m in measured
            for t, c in m["tasks"].items()
        }
    )
    counts = "; ".join(
        f"{m} {t}: {k}"
        + (f" (all the text offers; limit {lim})" if k == avail and k < (lim or k + 1) else "")
        for m, t, k, avail, lim in examples
    )
    sizes = sorted({e[2] for e in examples})
    lines.append("")
    if sizes:
        each = "; ".join(
            f"at {k} examples one example is {100 / k:.1f} points and the standard error up to "
            f"{100 * math.sqrt(0.25 / k):.1f}"
            for k in sizes
        )
        lines.append(
            f"Examples per task (the first of each): {counts}. Accuracy is in steps of one example: {each} "
            "(binomial, at 50 %): a difference of a few points between two rows is noise, not a ranking."
        )
    missing_tasks = [t for t in TASKS if not any(t in m["tasks"] for _, m in measured)]
    if missing_tasks and measured:
        lines.append(
            f"Not measured: {', '.join(missing_tasks)} (social_iqa comes from the BIG-bench archive, as the wiki "
            "text does: `MIPRUN_BIGBENCH_ARCHIVE`)."
        )
    checked = [r for r in data["rows"] if "ppl_matches_recorded" in r and r["method"] == "default"]
    sleb_checked = [r for r in data["rows"] if "ppl_matches_recorded" in r and r["method"] != "default"]
    if checked:
        lines.append(
            f"Held-out perplexity of the saved models against `{default_folder}`'s: {_agreement(checked)} "
            "default rows equal to two decimals."
        )
    if sleb_checked:
        lines.append(
            f"SLEB + linear rows against the `linear` rows of {_sleb_shown(data['sources']['sleb'])}: "
            f"{_agreement(sleb_checked)} equal to two decimals."
        )
    recorded_text = next((r["recorded"]["text"] for r in data["rows"] if r["method"] == "default"), None)
    if not checked and recorded_text is not None:
        lines.append(
            f"The default table's perplexities are on the `{recorded_text}` "
            f"text; these are on `{text}` (the repair fitted on its calibration split), so they are not the same figures."
        )
    missing = [name(model, None) for model, m in data["dense"].items() if m is None]
    missing += [name(r["model"], r["removed"]) for r in data["rows"] if r["measured"] is None]
    if missing:
        lines.append(f"Not run yet: {', '.join(dict.fromkeys(missing))}.")
    return "\n".join(lines)


def _agreement(checked: list[dict[str, Any]]) -> str:
    wrong = [r for r in checked if not r["ppl_matches_recorded"]]
    differ = ", ".join(dict.fromkeys(name(r["model"], r["removed"]) for r in wrong))
    return f"{len(checked) - len(wrong)} of {len(checked)}" + (f" (differ: {differ})" if wrong else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", action="store_true", help="list the sets to prune, for zero_shot.sh")
    parser.add_argument("--runs", type=Path, default=Path("out/zero-shot"), help="zero_shot.sh's OUT folder")
    parser.add_argument(
        "--default-runs",
        type=Path,
        default=RESULTS / "default",
        help="the default's runs: MODEL-nN.json manifests (default: results/default)",
    )
    parser.add_argument(
        "--sleb",
        type=Path,
        nargs="*",
        default=[],
        help="miprun compare folders holding sleb rows, one per model (default: results/compare-MODEL)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "default", help="where zero-shot.{json,md} go")
    args = parser.parse_args(argv)
    all_rows = rows(args.default_runs, args.sleb)
    if args.sets:
        list_sets(all_rows)
        return
    data = table(args.runs, all_rows, sources(args.default_runs, args.sleb))
    md = markdown(data)
    write_results(args.out, "zero-shot", data, md)
    sys.stdout.write(md + "\n")


if __name__ == "__main__":
    main()
