"""MI-PRUN's pruning time as a multiple of one plain forward pass (issue 3's target: at most 1.25x).

Both are measured on the same tokenized calibration windows in the same process, interleaved
(forward, prune, forward, prune, ...) after a warm-up of each, so machine load hits both alike; the
report gives the median of each and the median of the per-round ratios. "Prune" is everything
``miprun prune`` does between tokenizing and surgery: the capture pass, block scores and
Fast-Block-Select with the span scores it asks for. Tokenizing the text is left out of both.

    python benchmarks/prune_time.py --model smollm2-135m --out benchmarks/results/prune-time-smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from results_io import TEXT, write_results

from miprun import api, estimators
from miprun.data import load_text, token_windows
from miprun.evaluation.bench import forward_pass_seconds
from miprun.model.loading import load_model


def prune_seconds(loaded: Any, cal: api.CalibrationConfig, n: int, estimator: str) -> float:
    """Wall time of scoring (capture + block scores) and Fast-Block-Select for ``n`` blocks."""
    start = time.perf_counter()
    scores = api.score(
        loaded, calibration=cal, estimator=estimator, all_spans=False, progress=False, cache=False
    )
    api.select(scores, n, method="mi-prun")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", nargs="+", default=["8x128", "32x256"], help="WINDOWSxLENGTH")
    parser.add_argument("--num-blocks", type=int, default=3)
    parser.add_argument("--estimator", default=estimators.DEFAULT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    text = load_text(TEXT, "calibration")
    results: dict[str, Any] = {
        "model": loaded.name,
        "estimator": args.estimator,
        "num_blocks": args.num_blocks,
        "device": str(next(loaded.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "configs": {},
    }
    for config in args.configs:
        samples, seq_len = (int(x) for x in config.split("x"))
        cal = api.CalibrationConfig(source=TEXT, samples=samples, seq_len=seq_len)
        windows = token_windows(loaded.tokenizer, text, samples, seq_len, cal.seed)
        forward_pass_seconds(loaded.model, windows, cal.batch_size, 1)  # warm-up
        prune_seconds(loaded, cal, args.num_blocks, args.estimator)
        fwd, prune = [], []
        for _ in range(args.rounds):
            fwd.append(forward_pass_seconds(loaded.model, windows, cal.batch_size, 1))
            prune.append(prune_seconds(loaded, cal, args.num_blocks, args.estimator))
        results["configs"][config] = {
            "forward_s": fwd,
            "prune_s": prune,
            "median_forward_s": statistics.median(fwd),
            "median_prune_s": statistics.median(prune),
            "median_ratio": statistics.median(p / f for p, f in zip(prune, fwd, strict=True)),
        }
        print(config, results["configs"][config]["median_ratio"])
    lines = [
        f"### {loaded.name}: MI-PRUN pruning time vs one forward pass ({args.estimator}, N={args.num_blocks}, "
        f"{results['device']}, {results['threads']} threads, {args.rounds} interleaved rounds)",
        "",
        "| calibration tokens | forward pass s (median) | pruning s (median) | ratio (median of rounds) |",
        "|---|---|---|---|",
    ]
    for config, r in results["configs"].items():
        lines.append(
            f"| {config} | {r['median_forward_s']:.2f} | {r['median_prune_s']:.2f} | {r['median_ratio']:.2f}x |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "prune_time", results, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
