"""How stable are the chosen blocks across calibration seeds and text registers? (issue 3, 5(b))

For each seed (different calibration windows) and each source (Wikipedia vs New York Times articles),
one capture pass gives both MI-PRUN's selection (default estimator, Fast-Block-Select) and ShortGPT's,
and SLEB's greedy search runs on the first ``--sleb-samples`` of the same windows. SLEB costs about
N x T forward passes per run, so it only runs up to ``--sleb-max-n`` blocks (default: the smallest N).
Reported: mean pairwise Jaccard overlap of the removed sets across seeds, and Jaccard between the
sources at seed 0.

    python benchmarks/stability.py --model smollm2-135m --out benchmarks/results/stability-smollm2-135m
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from miprun import estimators
from miprun.model.layouts import num_blocks
from miprun.baselines import block_influence, shortgpt_select, sleb_path
from miprun.capture import capture
from miprun.data import load_text, token_windows
from miprun.model.loading import load_model
from miprun.methods import run_method
from miprun.scores import ScoreTable
from miprun.stats import CaptureSpec


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
    stats = capture(loaded.model, windows, est.capture_spec().merge(CaptureSpec(cosine=True)), seed=seed)
    table = ScoreTable(num_blocks=stats.num_blocks, estimator=est, stats=stats)
    assert stats.cosine is not None
    bi = block_influence(stats.cosine.mean_cos())
    sleb_ns = [n for n in ns if n <= args.sleb_max_n]
    chosen = {
        "mi-prun": {n: run_method(table, n, "mi-prun")[0] for n in ns},
        "shortgpt": {n: shortgpt_select(bi, n) for n in ns},
    }
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
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device="auto", dtype="float32")
    total = num_blocks(loaded.model)
    ns = sorted({max(1, round(total * r)) for r in args.ratios})
    if args.sleb_max_n is None:
        args.sleb_max_n = ns[0]
    runs = {seed: selections(loaded, "wiki", seed, ns, args) for seed in range(args.seeds)}
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
        f"{args.seq_len} wiki tokens, SLEB on the first {args.sleb_samples} of them; wiki vs "
        f"{args.other_source} at seed 0)",
        "",
        "| method | N | mean pairwise Jaccard across seeds | Jaccard wiki vs " + args.other_source + " |",
        "|---|---|---|---|",
    ]
    for method in ("mi-prun", "shortgpt", "sleb"):
        for n in runs[0].get(method, {}):
            sets = [runs[s][method][n] for s in runs]
            across = statistics.mean(jaccard(a, b) for a, b in itertools.combinations(sets, 2))
            between = jaccard(runs[0][method][n], other[method][n])
            result["summary"][f"{method}/{n}"] = {"seeds": across, "sources": between}
            lines.append(f"| {method} | {n} | {across:.2f} | {between:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
