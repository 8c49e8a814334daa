"""What does mi-search's budget (a tenth of SLEB's forward passes by default) cost in quality? (issue 16)

For each model, N and calibration seed: the default command (mi-search + linear) on the benchmarks' 8 x 128
calibration windows, and, where a stage gave way to the budget (a swap round, or the repaired probe's
breadth), the same with ``budget=0`` (no limit); where none did the two runs are the same computation, so the
unlimited one is not run; with ``--sleb``, SLEB with the same repair (``linear``, fitted where it runs) on the
same windows beside them. Held-out perplexity on 8 x 256 tokens of the evaluation text, and each run's cost in
forward passes over the calibration tokens against SLEB's.

    MIPRUN_BENCH_TEXT=novel python benchmarks/budget.py --point smollm2-135m:3 --point gemma3-270m:2 \
        --seed 1 --seed 2 --out benchmarks/results/budget
    MIPRUN_BENCH_TEXT=novel python benchmarks/budget.py --point smollm2-135m:9 --seed 1 --seed 2 \
        --sleb --no-unlimited --out benchmarks/results/budget-smollm2-9
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from results_io import TEXT, write_results

import miprun
from miprun.methods.forward import sleb_passes
from miprun.model.loading import load_model
from miprun.options import CalibrationConfig


def prune(model: str, n: int, seed: int, **options: Any) -> Any:
    """The plan of one prune at ``n`` blocks on calibration seed ``seed`` (the default repair), evaluated."""
    return miprun.prune(
        load_model(model),
        num_blocks=n,
        calibration=CalibrationConfig(source=TEXT, samples=8, seq_len=128, seed=seed),
        evaluate=True,
        eval_samples=8,
        eval_source=TEXT,
        cache=False,
        progress=False,
        **options,
    ).plan


def run(model: str, n: int, seed: int, budget: float | None) -> dict[str, Any]:
    """The default command at ``n`` blocks on calibration seed ``seed`` (``budget``: mi-search's, None: its
    default): the set, held-out perplexity, cost (by stage too) and the stages that gave way to the budget."""
    plan = prune(model, n, seed, method_params={} if budget is None else {"budget": budget})
    record = plan.search.params
    per_pass = record["verification_tokens"] / (8 * 128)  # the record's passes, over the calibration tokens
    cost = record["verification_layer_passes"] * per_pass
    sleb = sleb_passes(plan.num_blocks_before, n, record["output_layer_cost"])
    return {
        "removed": plan.removed,
        "ppl": plan.evaluation.pruned_ppl,
        "cost": cost,
        "ratio": cost / sleb,
        "gave_way": record["budget_gave_way"],
        "stages": {stage: passes * per_pass for stage, passes in record["passes_by_stage"].items()},
        "finalists": [f["removed"] for f in record["finalists"]],
    }


def sleb(model: str, n: int, seed: int) -> dict[str, Any]:
    """SLEB at ``n`` blocks on the same windows, with the default's repair: its set and held-out perplexity."""
    plan = prune(model, n, seed, method="sleb")
    return {"removed": plan.removed, "ppl": plan.evaluation.pruned_ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--point", action="append", required=True, help="MODEL:N")
    parser.add_argument("--seed", action="append", type=int, required=True, help="calibration seed")
    parser.add_argument("--sleb", action="store_true", help="also SLEB + linear on the same windows")
    parser.add_argument(
        "--no-unlimited", action="store_true", help="skip the runs without the budget (only the default)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for spec in args.point:
        model, n = spec.split(":")
        for seed in args.seed:
            row: dict[str, Any] = {"model": model, "n": int(n), "seed": seed}
            row["budget"] = run(model, int(n), seed, None)
            unlimited = row["budget"]["gave_way"] and not args.no_unlimited
            row["unlimited"] = run(model, int(n), seed, 0.0) if unlimited else None
            row["sleb"] = sleb(model, int(n), seed) if args.sleb else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"### mi-search's budget against none ({TEXT})",
        "",
        "The default command on 8 x 128 calibration tokens (the seed picks the windows); held-out perplexity on "
        "8 x 256 tokens; cost in forward passes over the calibration tokens, and against SLEB's. Without the "
        "budget: run only where a stage gave way to the budget (elsewhere it is the same computation).",
        "",
        "| model, N | seed | with the budget: removed | ppl | cost (x SLEB) | gave way | without: removed | ppl | "
        "cost (x SLEB) |" + (" SLEB + linear: removed | ppl |" if args.sleb else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.sleb else ""),
    ]
    for r in rows:
        b, u = r["budget"], r["unlimited"]
        free = (
            f"{u['removed']} | {u['ppl']:.2f} | {u['cost']:.1f} ({u['ratio']:.3f}x)"
            if u
            else ("(not run) | | " if args.no_unlimited and b["gave_way"] else "(same) | | ")
        )
        s = r.get("sleb")
        lines.append(
            f"| {r['model']}, {r['n']} | {r['seed']} | {b['removed']} | {b['ppl']:.2f} | "
            f"{b['cost']:.1f} ({b['ratio']:.3f}x) | {', '.join(b['gave_way']) or '-'} | {free} |"
            + (f" {s['removed']} | {s['ppl']:.2f} |" if s else "")
        )
    write_results(args.out, "budget", {"text": TEXT, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
