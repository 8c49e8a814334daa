"""How much does the linear repair restore, against how many calibration tokens it is fitted on?

For each N, the default selection (MI-PRUN) is cut and repaired with ``--repair linear`` fitted on a
growing number of calibration tokens; held-out perplexity of the repaired cut is reported with the cost
of the fit in forward-pass units (the fit's pass over its tokens against one plain forward pass of the
model body over the same tokens, timed interleaved in the same run).

    python benchmarks/repair_curve.py --model smollm2-135m --num-blocks 6 9 --out benchmarks/results/repair-curve-smollm2-135m
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from results_io import TEXT, write_results

from miprun import methods
from miprun.evaluation.bench import forward_pass_seconds
from miprun.evaluation.heldout import heldout_windows
from miprun.evaluation.oracle import DamageOracle
from miprun.model.edits import edited
from miprun.model.loading import load_model
from miprun.model.surgery import skip_blocks
from miprun.options import CalibrationConfig, EstimatorOptions, RuntimeOptions
from miprun.output.report import write_figure
from miprun.pipeline import RunSettings, calibration_windows, estimator_of, fit_repair, score_model
from miprun.repair.linear import LinearRepair

log = logging.getLogger("repair_curve")


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model, device=args.device, dtype="float32")
    cal = CalibrationConfig(
        source=TEXT, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size
    )
    settings = RunSettings(cal, RuntimeOptions(device=args.device), progress=False, cache=True)
    scores = score_model(loaded, methods.build("mi-prun"), estimator_of(EstimatorOptions()), settings)
    evidence = methods.Evidence(scores.num_blocks, scores.table)
    _, held = heldout_windows(loaded.tokenizer, TEXT, args.eval_seq_len, args.eval_samples)
    oracle = DamageOracle(loaded.model, held, batch_size=args.batch_size)
    rows = []
    for n in args.num_blocks:
        removed, _ = methods.run(methods.build("mi-prun"), evidence, n)
        row: dict[str, Any] = {"num_blocks": n, "removed": removed, "cut_ppl": oracle(removed), "fits": []}
        for tokens in args.tokens:
            repair = LinearRepair(tokens=tokens, ridge=args.ridge)
            fit_cal = repair.calibration(cal)
            _, windows = calibration_windows(loaded, fit_cal)
            fit_s, fwd_s = [], []
            for _ in range(args.rounds):  # the fit's pass and a plain forward pass, interleaved
                start = time.perf_counter()
                edits, record = fit_repair(
                    loaded, repair, removed, RunSettings(cal, settings.runtime, progress=False)
                )
                fit_s.append(time.perf_counter() - start)
                fwd_s.append(forward_pass_seconds(loaded.model, windows, cal.batch_size, 1))
            with edited(loaded.model, edits), skip_blocks(loaded.model, removed):
                ppl = oracle.measure()
            ratio = statistics.median(f / w for f, w in zip(fit_s, fwd_s, strict=True))
            row["fits"].append(
                {
                    "tokens": record.tokens,
                    "ppl": ppl,
                    "fit_x_forward": ratio,
                    "fit_seconds": statistics.median(fit_s),
                }
            )
            log.info(
                "N=%d %s: %d tokens -> ppl %.2f (cut %.2f), fit %.2fx fwd",
                n,
                removed,
                record.tokens,
                ppl,
                row["cut_ppl"],
                ratio,
            )
        rows.append(row)
    return {"model": loaded.name, "dense_ppl": oracle.dense, "ridge": args.ridge, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['model']}: linear repair against its calibration tokens (dense held-out ppl "
        f"{result['dense_ppl']:.2f}, ridge {result['ridge']:g})",
        "",
        "| N | removed | cut | "
        + " | ".join(f"{f['tokens']} tok" for f in result["rows"][0]["fits"])
        + " | fit cost (x fwd) |",
        "|---|---|---|" + "---|" * (len(result["rows"][0]["fits"]) + 1),
    ]
    for row in result["rows"]:
        ppls = " | ".join(f"{f['ppl']:.2f}" for f in row["fits"])
        costs = ", ".join(f"{f['fit_x_forward']:.2f}" for f in row["fits"])
        lines.append(f"| {row['num_blocks']} | {row['removed']} | {row['cut_ppl']:.2f} | {ppls} | {costs} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        xs = [f["tokens"] for f in row["fits"]]
        line = ax.plot(
            xs, [f["ppl"] for f in row["fits"]], marker="o", label=f"N={row['num_blocks']} repaired"
        )
        ax.axhline(
            row["cut_ppl"], color=line[0].get_color(), linestyle="--", label=f"N={row['num_blocks']} cut only"
        )
    ax.axhline(result["dense_ppl"], color="black", linestyle=":", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration tokens of the fit")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(result["model"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-blocks", type=int, nargs="+", default=[6, 9])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768, 65536, 131072])
    parser.add_argument("--ridge", type=float, default=LinearRepair.ridge)
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of the scoring pass")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="timed fit passes per point (medians)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(torch.get_num_threads())
    result = run(args)
    write_results(args.out, "repair_curve", result, markdown(result))
    plot(result, Path(args.out) / "repair_curve.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
