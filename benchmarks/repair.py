"""Which repair, on which blocks? Linear-repair variants on the sets each method chose, with their cost.

Reads the removal sets from a ``miprun compare`` result (``comparison.json``: every method's choice at
every N, on the same calibration and held-out text), then, for each repair variant, runs the variant's
one calibration pass for all sets at once, fits and folds it per set, and measures held-out perplexity.
The pass is timed against a plain forward pass of the model body over the same tokens, interleaved, so
the cost is in forward-pass units. The best repaired set at each N is marked: it need not be the set that
was best before the repair.

    python benchmarks/repair.py --model smollm2-135m --sets benchmarks/results/compare-smollm2-135m \
        --out benchmarks/results/repair-smollm2-135m

A variant is ``LABEL=NAME`` or ``LABEL=NAME:KEY=VALUE;KEY=VALUE`` (a repair and its ``--repair-opt``
parameters), e.g. ``--variant "ridge 0=linear:ridge=0"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from results_io import TEXT, write_results

from miprun import repair
from miprun.evaluation.bench import forward_pass_seconds
from miprun.evaluation.heldout import heldout_windows
from miprun.evaluation.oracle import DamageOracle
from miprun.methods import default_comparison
from miprun.model.edits import edited
from miprun.model.loading import load_model
from miprun.model.surgery import skip_blocks
from miprun.options import CalibrationConfig, RuntimeOptions
from miprun.pipeline import RunSettings
from miprun.pipeline.repairing import RepairHook

log = logging.getLogger("repair")

DEFAULT_VARIANTS = [
    "linear=linear",
    "unguarded=linear:guard=0",
    "ridge 0=linear:ridge=0",
    "ridge 1e-2=linear:ridge=1e-2",
    "relative weighting=linear:weighting=relative",
    "diagonal=linear:fold=diagonal",
    "8k tokens=linear:tokens=8192",
]
METHODS = [m for m in default_comparison() if m not in ("last-n", "random")]  # the rest collapse


def parse_variant(spec: str) -> tuple[str, str, dict[str, str]]:
    """``LABEL=NAME:KEY=VALUE;...`` as (label, repair name, parameters)."""
    label, _, rest = spec.partition("=")
    name, _, params = rest.partition(":")
    pairs = [p.split("=", 1) for p in params.split(";") if p]
    return label, name, {k: v for k, v in pairs}


def sets_from(folder: Path, methods: list[str]) -> dict[int, dict[str, list[int]]]:
    """Each method's cut-only choice at each N in a comparison (the choice made without a repair)."""
    rows = json.loads((folder / "comparison.json").read_text(encoding="utf-8"))["rows"]
    found: dict[int, dict[str, list[int]]] = {}
    for row in rows:
        if row.get("repair", "none") == "none" and row["method"] in methods:
            found.setdefault(row["num_blocks"], {})[row["method"]] = sorted(row["removed"])
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model, device=args.device, dtype="float32")
    cal = CalibrationConfig(
        source=TEXT, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size
    )
    settings = RunSettings(cal, RuntimeOptions(device=args.device), progress=False)
    _, held = heldout_windows(loaded.tokenizer, TEXT, args.eval_seq_len, args.eval_samples)
    oracle = DamageOracle(loaded.model, held, batch_size=args.batch_size)
    chosen = sets_from(Path(args.sets), args.methods)
    distinct = sorted({tuple(s) for by_method in chosen.values() for s in by_method.values()})
    cut = {s: oracle(list(s)) for s in distinct}
    variants = []
    passes: dict[str, tuple[RepairHook, float, float]] = {}  # variants that read the same sums share a pass
    for spec in args.variant:
        label, name, params = parse_variant(spec)
        try:
            fix = repair.build(name, params)
            hook = RepairHook(loaded, fix, settings)
            fix.statistics(loaded.model, list(distinct[0]))  # an unsupported family fails here
        except Exception as err:  # a variant this family cannot take is reported, not fatal
            variants.append({"label": label, "repair": name, "params": params, "error": str(err)})
            log.info("%s: %s", label, err)
            continue
        sets = [list(s) for s in distinct]
        # the fit windows are the first of those drawn, so a pass serves every variant with its tokens
        key = repr((params.get("tokens"), [fix.statistics(loaded.model, s) for s in sets]))
        if key in passes and (passes[key][0].check is not None or not getattr(fix, "guard", 0)):
            shared, pass_s, fwd_s = passes[key]
            hook.stats, hook.windows, hook.check = shared.stats, shared.windows, shared.check
        else:
            start = time.perf_counter()
            hook.prepare(sets)
            pass_s = time.perf_counter() - start
            fwd_s = (
                forward_pass_seconds(loaded.model, hook.windows, cal.batch_size, 1)
                if hook.windows is not None
                else 0
            )
            passes[key] = (hook, pass_s, fwd_s)
        ppl: dict[str, float] = {}
        fit_s = []
        for s in distinct:
            start = time.perf_counter()
            edits, _ = hook.fit(list(s))
            fit_s.append(time.perf_counter() - start)
            with edited(loaded.model, edits), skip_blocks(loaded.model, list(s)):
                ppl[str(list(s))] = oracle.measure()
        variants.append(
            {
                "label": label,
                "repair": name,
                "params": fix.params(),
                "tokens": hook.stats.num_tokens if hook.stats is not None else 0,
                "pass_x_forward": pass_s / fwd_s if fwd_s else 0.0,
                "fit_seconds_median": statistics.median(fit_s),
                "ppl": ppl,
            }
        )
        log.info("%s: pass %.2fx fwd, %s", label, variants[-1]["pass_x_forward"], ppl)
    return {
        "model": loaded.name,
        "dense_ppl": oracle.dense,
        "sets_from": str(args.sets),
        "calibration": {"samples": cal.samples, "seq_len": cal.seq_len},
        "evaluation": {"samples": args.eval_samples, "seq_len": args.eval_seq_len},
        "chosen": {str(n): by_method for n, by_method in chosen.items()},
        "cut_ppl": {str(list(s)): v for s, v in cut.items()},
        "variants": variants,
    }


def markdown(result: dict[str, Any]) -> str:
    ok = [v for v in result["variants"] if "error" not in v]
    lines = [
        f"### {result['model']}: held-out perplexity of each method's set, cut only and under each repair "
        f"(dense {result['dense_ppl']:.2f}; bold: best repaired set at that N)",
        "",
        "| N | method | removed | cut | " + " | ".join(v["label"] for v in ok) + " |",
        "|---|---|---|---|" + "---|" * len(ok),
    ]
    for n, by_method in sorted(result["chosen"].items(), key=lambda kv: int(kv[0])):
        best = {v["label"]: min(v["ppl"][str(s)] for s in by_method.values()) for v in ok}
        best_cut = min(result["cut_ppl"][str(s)] for s in by_method.values())
        for method, s in by_method.items():
            key = str(s)
            cut = result["cut_ppl"][key]
            cells = [
                (f"**{v['ppl'][key]:.2f}**" if v["ppl"][key] == best[v["label"]] else f"{v['ppl'][key]:.2f}")
                for v in ok
            ]
            cut_cell = f"**{cut:.2f}**" if cut == best_cut else f"{cut:.2f}"
            lines.append(f"| {n} | {method} | {s} | {cut_cell} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| variant | parameters | tokens | pass cost (x one forward pass over its tokens) |",
        "|---|---|---|---|",
    ]
    for v in result["variants"]:
        if "error" in v:
            lines.append(f"| {v['label']} | {v['params']} | - | not for this model: {v['error']} |")
        else:
            lines.append(f"| {v['label']} | {v['params']} | {v['tokens']} | {v['pass_x_forward']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sets", required=True, help="a `miprun compare` output folder")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--variant", action="append", help="LABEL=NAME[:KEY=VALUE;...] (repeatable)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (as in the comparison)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.variant = args.variant or DEFAULT_VARIANTS
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    write_results(args.out, "repair", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
