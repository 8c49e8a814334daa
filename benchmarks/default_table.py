"""The default command's runs beside SLEB's, as a table: what ``benchmarks/default_runs.sh`` pruned (one
``MODEL-nN.json`` manifest per run) against the ``sleb`` rows of a ``miprun compare`` on the same text and
calibration windows (cut only and with the linear repair).

Cost is in forward passes over the calibration tokens, the output layer counted as its parameters' worth of
decoder layers (as ``benchmarks/verified.py`` counts it): the default's verification work from its manifest,
SLEB's computed from its algorithm (it runs the model for every kept block at every step).

    OUT=out/default-novel MIPRUN_BENCH_TEXT=novel sh benchmarks/default_runs.sh
    miprun compare --model smollm2-135m -n 3 -n 6 -n 9 --methods sleb --repairs none,linear --calib novel \\
        --eval-text novel --samples 8 --seq-len 128 --eval-samples 8 --eval-seq-len 256 --out out/sleb-smollm2-135m
    (the same for gemma3-270m with -n 2 -n 4 -n 5, --out out/sleb-gemma3-270m)
    python benchmarks/default_table.py --runs out/default-novel \\
        --sleb out/sleb-smollm2-135m out/sleb-gemma3-270m --out benchmarks/results/default-novel \\
        --refit benchmarks/results/repair-activations/repair-activations.json

``--refit`` adds SLEB's sets with the linear repair fitted where it runs (``benchmarks/repair_activations.py``'s
"repaired" column), the repair the default command now uses; the bold then compares against that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from results_io import default_manifests, sleb_sets, write_results

from miprun.methods.forward import sleb_passes


def default_rows(runs: Path) -> list[dict[str, Any]]:
    """One row per manifest (``MODEL-nN.json``, or ``MODEL-nN/miprun.json`` as default_runs.sh leaves them):
    the set, the cut and repaired held-out perplexity, and the verification cost."""
    rows = []
    for (model, n), path in default_manifests(runs).items():
        manifest = json.loads(path.read_text())
        params = manifest["search"]["params"]
        total = manifest["num_blocks_before"]
        rows.append(
            {
                "model": model,
                "num_blocks": n,
                "total_blocks": total,
                "removed": manifest["removed"],
                "dense": manifest["evaluation"]["dense_ppl"],
                "cut": manifest["evaluation"]["cut_ppl"],
                "repaired": manifest["evaluation"]["pruned_ppl"],
                "cost": params["verification_layer_passes"]
                * params["verification_tokens"]
                / manifest["calibration"]["tokens"],
                "sleb_cost": sleb_passes(total, n, params["output_layer_cost"]),
                "text": manifest["evaluation"]["source"].split(":")[0],
                "params": {k: v for k, v in params.items() if not isinstance(v, (list, dict))},
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    texts = sorted({r["text"] for r in rows})
    refit = any(r.get("sleb", {}).get("refit") is not None for r in rows)
    lines = [
        f"### The default command (mi-search + linear) beside SLEB (text: {', '.join(texts)})",
        "",
        "Held-out perplexity on 8 x 256 tokens of the evaluation split; the repair's gain is the repaired "
        "perplexity against the cut's; bold: no worse than SLEB + linear"
        + (" fitted where it runs (the default's repair)" if refit else "")
        + ". Cost: forward passes over the 8 x 128 calibration tokens (the output layer counted), the default's "
        "from its manifest, SLEB's from its algorithm.",
        "",
        "| model, N | default: removed | cut | repaired (gain) | SLEB: removed | cut | + linear (dense fit) | "
        + ("+ linear fitted where it runs | " if refit else "")
        + "default's cost (passes) | SLEB's | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if refit else ""),
    ]
    for r in rows:
        s = r.get("sleb", {})
        against = s.get("refit") if refit else s.get("linear")
        # at the table's precision: the same set repaired twice differs in the last float bits
        better = "**" if against is not None and round(r["repaired"], 2) <= round(against, 2) else ""
        lines.append(
            f"| {r['model']}, {r['num_blocks']} of {r['total_blocks']} | {r['removed']} | {r['cut']:.2f} | "
            f"{better}{r['repaired']:.2f}{better} ({r['repaired'] / r['cut'] - 1:+.0%}) | {s.get('removed', '-')} | {_ppl(s.get('cut'))} | "
            f"{_ppl(s.get('linear'))} | "
            + (f"{_ppl(s.get('refit'))} | " if refit else "")
            + f"{r['cost']:.1f} | {r['sleb_cost']:.1f} | {r['cost'] / r['sleb_cost']:.3f}x |"
        )
    return "\n".join(lines)


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, required=True, help="default_runs.sh's output folder")
    parser.add_argument(
        "--sleb", type=Path, nargs="*", default=[], help="miprun compare folders holding sleb rows"
    )
    parser.add_argument(
        "--refit",
        type=Path,
        help="repair_activations.py's JSON: SLEB's sets with the repair fitted where it runs",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = default_rows(args.runs)
    sleb: dict[tuple[str, int], dict[str, Any]] = {}
    for folder in args.sleb:
        model = json.loads((folder / "comparison.json").read_text())["model"]
        for n, entry in sleb_sets(folder).items():
            sleb[(model, n)] = entry
    refit = {}
    if args.refit is not None:
        for entry in json.loads(args.refit.read_text())["rows"]:
            refit[(entry["model"], tuple(entry["removed"]))] = entry["repaired"]["ppl"]
    for row in rows:
        row["sleb"] = dict(
            next((v for (m, n), v in sleb.items() if n == row["num_blocks"] and row["model"] in m), {})
        )
        if refit and row["sleb"]:
            row["sleb"]["refit"] = refit.get((row["model"], tuple(row["sleb"]["removed"])))
    table = markdown(rows)
    write_results(args.out, "default", {"rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
