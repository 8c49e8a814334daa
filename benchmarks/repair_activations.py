"""Should each removed run's map be fitted on the model already cut and repaired upstream? (issue 16, item 3)

For each removal set: the model pruned with ``--blocks`` and the ``linear`` repair fitted as the default command
fits it (the benchmarks' 8 x 128 calibration windows for the choice, the repair's own 32,768 tokens for the
fit, guarded), once with every run's map fitted on the dense model's activations (``activations=dense``, the
default) and once with each later run's map fitted on the model already cut and repaired upstream
(``activations=repaired``); held-out perplexity on 8 x 256 tokens of the evaluation text, and the fit's seconds.
A set of one run is the same fit either way (not worth a row).

    MIPRUN_BENCH_TEXT=novel python benchmarks/repair_activations.py \
        --set gemma3-270m:9,15 --set smollm2-135m:5,6,7,13,14,15,16,17,18 --out benchmarks/results/repair-activations
"""

from __future__ import annotations

import argparse

from results_io import TEXT, pruned_with_linear, write_results

from miprun.methods.search import runs
from miprun.options import CalibrationConfig

CALIBRATION = CalibrationConfig(source=TEXT, samples=8, seq_len=128)  # the benchmarks' calibration
MODES = ("dense", "repaired")


def measure(model: str, removed: list[int], activations: str) -> dict:
    """Held-out perplexity of ``removed`` pruned with the linear repair fitted on ``activations``."""
    plan = pruned_with_linear(model, removed, CALIBRATION, activations=activations).plan
    return {
        "ppl": plan.evaluation.pruned_ppl,
        "cut_ppl": plan.evaluation.cut_ppl,
        "repair_seconds": plan.repair.seconds,
        "runs": plan.repair.runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", required=True, help="MODEL:removed blocks, comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.set:
        model, blocks = spec.split(":")
        removed = sorted(int(b) for b in blocks.split(","))
        row = {"model": model, "removed": removed, "runs": len(runs(removed))}
        for mode in MODES:
            row[mode] = measure(model, removed, mode)
        rows.append(row)
        print({k: row[k] for k in ("model", "removed")}, [row[m]["ppl"] for m in MODES], flush=True)
    lines = [
        f"### The linear repair's activations: dense, or the model cut and repaired upstream ({TEXT})",
        "",
        "Held-out perplexity on 8 x 256 tokens; the repair fitted on its own 32,768 calibration tokens, guarded; "
        "seconds: the repair's fit (its capture passes included).",
        "",
        "| model | removed | runs | cut | dense activations (s) | cut and repaired upstream (s) | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense, upstream = r["dense"], r["repaired"]
        lines.append(
            f"| {r['model']} | {r['removed']} | {r['runs']} | {dense['cut_ppl']:.2f} | {dense['ppl']:.2f} "
            f"({dense['repair_seconds']:.0f}) | {upstream['ppl']:.2f} ({upstream['repair_seconds']:.0f}) | "
            f"{upstream['ppl'] / dense['ppl'] - 1:+.1%} |"
        )
    write_results(args.out, "repair-activations", {"text": TEXT, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
