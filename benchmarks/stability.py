"""How stable are the chosen blocks across calibration seeds and text registers? (issue 3, 5(b))

For each seed (different calibration windows) and each source (Wikipedia vs New York Times articles),
one capture pass gives MI-PRUN's selection (default estimator, Fast-Block-Select) and ShortGPT's;
``mi-verified`` measures its candidates on the same windows (``--verified``), and SLEB's greedy search runs
on the first ``--sleb-samples`` of them. SLEB costs about N x T forward passes per run, so it only runs up
to ``--sleb-max-n`` blocks (default: the smallest N).
Reported: mean pairwise Jaccard overlap of the removed sets across seeds, and Jaccard between the
sources at seed 0.

    python benchmarks/stability.py --model smollm2-135m --out benchmarks/results/stability-smollm2-135m
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any

from results_io import TEXT, write_results

from miprun import estimators, methods
from miprun.capture.engine import capture
from miprun.capture.statistics import CosineSums
from miprun.data import load_text, token_windows
from miprun.methods import GatherContext
from miprun.methods.forward import sleb_path
from miprun.methods.similarity import block_influence, shortgpt_select
from miprun.model.layouts import num_blocks
from miprun.model.loading import load_model
from miprun.options import CalibrationConfig
from miprun.pipeline import RunSettings, attach_live
from miprun.scores import ScoreTable


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def selections(
    loaded: Any, source: str, seed: int, ns: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """MI-PRUN and ShortGPT removal sets from one capture pass; SLEB's from its greedy search."""
    est = estimators.get(estimators.DEFAULT)
    windows = token_windows(
        loaded.tokenizer, load_text(source, "calibration"), args.samples, args.seq_len, seed
    )
    cal = CalibrationConfig(source=source, samples=args.samples, seq_len=args.seq_len, seed=seed)
    verified = methods.build("mi-verified")
    requests = [*est.statistics(), CosineSums(), *(verified.statistics() if args.verified else [])]
    stats = capture(loaded.model, windows, requests, cal, progress=False)
    table = ScoreTable(num_blocks=stats.num_blocks, estimator=est, stats=stats)
    bi = block_influence(stats.get(CosineSums()).mean_cos())
    sleb_ns = [n for n in ns if n <= args.sleb_max_n]
    evidence = methods.Evidence(stats.num_blocks, table)
    if args.verified:  # the one-pass baselines' sets it also measures, from the same pass
        evidence.extras = verified.gather(GatherContext(loaded.model, windows, stats))
    chosen = {
        "mi-prun": {n: methods.run(methods.build("mi-prun"), evidence, n)[0] for n in ns},
        "shortgpt": {n: shortgpt_select(bi, n) for n in ns},
    }
    if args.verified:
        attach_live(loaded, verified, evidence, None, RunSettings(cal, None, progress=False))  # type: ignore[arg-type]
        chosen["mi-verified"] = {n: methods.run(verified, evidence, n)[0] for n in ns}
    if sleb_ns:
        path = sleb_path(loaded.model, windows[: args.sleb_samples], max(sleb_ns), progress=False)
        chosen["sleb"] = {n: path.removed(n) for n in sleb_ns}
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--other-source", default="nyt")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--sleb-max-n", type=int, default=None, help="default: the smallest N")
    parser.add_argument("--sleb-samples", type=int, default=8, help="calibration windows SLEB reads")
    parser.add_argument("--verified", action="store_true", help="also mi-verified (measures candidates)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device="auto", dtype="float32")
    total = num_blocks(loaded.model)
    ns = sorted({max(1, round(total * r)) for r in args.ratios})
    if args.sleb_max_n is None:
        args.sleb_max_n = ns[0]
    runs = {seed: selections(loaded, TEXT, seed, ns, args) for seed in range(args.seeds)}
    other = selections(loaded, args.other_source, 0, ns, args)
    result: dict[str, Any] = {
        "model": loaded.name,
        "ns": ns,
        "runs": runs,
        "other_source": other,
        "summary": {},
    }
    lines = [
        f"### {loaded.name}: stability of the removed blocks ({args.seeds} seeds of {args.samples} x "
        f"{args.seq_len} wiki tokens"
        + (f", SLEB on the first {args.sleb_samples} of them" if args.sleb_max_n > 0 else "")
        + f"; wiki vs {args.other_source} at seed 0)",
        "",
        "| method | N | mean pairwise Jaccard across seeds | Jaccard wiki vs " + args.other_source + " |",
        "|---|---|---|---|",
    ]
    for method in ("mi-prun", "mi-verified", "shortgpt", "sleb"):
        for n in runs[0].get(method, {}):
            sets = [runs[s][method][n] for s in runs]
            across = statistics.mean(jaccard(a, b) for a, b in itertools.combinations(sets, 2))
            between = jaccard(runs[0][method][n], other[method][n])
            result["summary"][f"{method}/{n}"] = {"seeds": across, "sources": between}
            lines.append(f"| {method} | {n} | {across:.2f} | {between:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "stability", result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
