"""Which shortlist size, token budget and objective should ``mi-verified`` use?

Scores the model once (the MI capture), then for each configuration ``KEY=VALUE,...`` of mi-verified's
parameters chooses N blocks at every ``--num-blocks`` and measures the held-out perplexity of the choice
(the cut only: no repair). The cost of a choice is its verification work in forward-pass units (decoder
layers run over the verification tokens, divided by the model's layers, times verification tokens over
calibration tokens) plus the one capture pass.

    python benchmarks/verified.py --model smollm2-135m --num-blocks 3 6 9 \\
        --config candidates=12 --config candidates=4 --config candidates=24 \\
        --config tokens=512 --config tokens=8192 --config objective=nll \\
        --out benchmarks/results/verified-smollm2-135m
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from results_io import TEXT, write_results

from miprun import methods
from miprun.capture.replay import head_layers
from miprun.estimators import build as build_estimator
from miprun.evaluation.heldout import heldout_windows
from miprun.evaluation.oracle import DamageOracle
from miprun.methods.forward import sleb_passes
from miprun.model.loading import load_model
from miprun.options import DEFAULT_ESTIMATOR, CalibrationConfig, RuntimeOptions
from miprun.pipeline import RunSettings
from miprun.pipeline.repairing import attach_live
from miprun.pipeline.scoring import score_model

log = logging.getLogger("verified")


def parse(spec: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in spec.split(",") if part)


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model, device=args.device, dtype="float32")
    cal = CalibrationConfig(
        source=TEXT, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size
    )
    settings = RunSettings(
        cal, RuntimeOptions(device=args.device), progress=False, cache=False, max_blocks=max(args.num_blocks)
    )
    _, held = heldout_windows(loaded.tokenizer, TEXT, args.eval_seq_len, args.eval_samples)
    oracle = DamageOracle(loaded.model, held, batch_size=args.batch_size)
    base = methods.build(args.method)
    scores = score_model(loaded, base, build_estimator(DEFAULT_ESTIMATOR), settings)
    calibration_tokens = cal.samples * cal.seq_len
    rows = []
    for spec in args.config:
        params = parse(spec)
        method = methods.build(args.method, params)
        evidence = methods.Evidence(scores.num_blocks, scores.table, dict(scores.evidence))
        attach_live(loaded, method, evidence, None, settings)
        for n in args.num_blocks:
            removed, info = methods.run(method, evidence, n, cal.seed)
            record = info.params
            passes = record["verification_layer_passes"] * record["verification_tokens"] / calibration_tokens
            rows.append(
                {
                    "config": spec,
                    "params": method.params(),
                    "num_blocks": n,
                    "removed": removed,
                    "ppl": oracle(removed),
                    "chosen_mi_rank": record.get("chosen_mi_rank"),
                    "candidates": len(record["candidates"]),
                    "verification_x_forward": passes,
                    # SLEB at this N over the same calibration tokens, in the same decoder-layer units
                    "sleb_x_forward": sleb_passes(scores.num_blocks, n, head_layers(loaded.model)),
                    "verify_seconds": record["verify_seconds"],
                    **search_summary(record),
                }
            )
            log.info("%s N=%d: %s ppl %.2f (%.2f fwd)", spec, n, removed, rows[-1]["ppl"], passes)
    return {
        "model": loaded.name,
        "method": args.method,
        "dense_ppl": oracle.dense,
        "calibration": {"source": TEXT, "samples": cal.samples, "seq_len": cal.seq_len},
        "evaluation": {"source": TEXT, "samples": args.eval_samples, "seq_len": args.eval_seq_len},
        "rows": rows,
    }


def search_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What mi-search measured on its way (empty for mi-verified): the greedy's path, the sets each swap
    round tried, and the finalists with their screened and final values."""
    if "greedy" not in record:
        return {}
    return {
        "screen_tokens": record.get("screen_tokens"),
        "greedy_path": [step["block"] for step in record["greedy"]],
        "greedy_remeasured": [len(step["remeasured"]) for step in record["greedy"]],
        "greedy_x_forward": record["greedy_layer_passes"],
        "swaps_tried": [round_["tried"] for round_ in record["swaps"] if "tried" in round_],
        "finalists": [[f["removed"], f["cut"], f["measured"]] for f in record["finalists"]],
    }


def markdown(result: dict[str, Any]) -> str:
    ns = sorted({row["num_blocks"] for row in result["rows"]})
    configs = list(dict.fromkeys(row["config"] for row in result["rows"]))
    cal = result["calibration"]
    lines = [
        f"### {result['model']}: {result.get('method', 'mi-verified')}'s held-out perplexity by configuration (cut only; "
        f"{cal.get('source', 'wiki')} text; dense {result['dense_ppl']:.2f}; verification cost in forward passes "
        f"over the {cal['samples']} x {cal['seq_len']} calibration tokens, besides the one capture pass; the output layer counts as its parameters' worth of decoder layers on the positions it scores)",
        "",
        "| configuration | " + " | ".join(f"N={n}: ppl (MI rank, cost)" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for spec in configs:
        cells = []
        for n in ns:
            row = next(r for r in result["rows"] if r["config"] == spec and r["num_blocks"] == n)
            rank = f"#{row['chosen_mi_rank']}" if row.get("chosen_mi_rank") else "-"
            ratio = row["verification_x_forward"] / row["sleb_x_forward"] if row.get("sleb_x_forward") else 0
            cells.append(
                f"{row['ppl']:.2f} ({rank}, {row['verification_x_forward']:.1f} = {ratio:.3f}x SLEB)"
            )
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-blocks", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--method", default="mi-verified", choices=["mi-verified", "mi-search"])
    parser.add_argument(
        "--config", action="append", help="the method's parameters KEY=VALUE,... (repeatable)"
    )
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (prune's default)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.config = args.config or ["candidates=12"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    write_results(args.out, "verified", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
