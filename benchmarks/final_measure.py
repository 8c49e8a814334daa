"""How should mi-search measure its finalists after the repair? (issue 16, sixth round)

For each removal set: the model pruned with ``--blocks`` and the ``linear`` repair's dense fit (every run on
the dense model's activations, as mi-search measures its finalists; fitted as the default command fits it), its KL to the dense model and its
next-token loss on the first 512 calibration tokens (the default's verification tokens), scored at every
position, every 2nd and every 4th (the stride the search uses on Gemma-3-270M), on their first 256 at every
position, on all 1,024, and on 4,096 calibration
tokens drawn separately; beside the held-out perplexity miprun's evaluation reports. A measurement that
ranks the sets as the held-out text does is one the finalists can be judged by.

    MIPRUN_BENCH_TEXT=novel python benchmarks/final_measure.py --model gemma3-270m \
        --set 9,15 --set 15,16 --set 7,8,9,12,15 --set 7,8,9,14,15 --set 6,7,8,14,15 --set 6,7,8,9,15 \
        --out benchmarks/results/final-measure-gemma3-270m
"""

from __future__ import annotations

import argparse

import torch
from results_io import TEXT, pruned_with_linear, write_results

from miprun.methods.targets import coarse_kl, next_token_nll, top_k_with_tail
from miprun.methods.verified import scored_positions
from miprun.model.loading import load_model
from miprun.options import CalibrationConfig
from miprun.pipeline.scoring import calibration_windows

BATCH = 4
CALIBRATION = CalibrationConfig(source=TEXT, samples=8, seq_len=128)  # the benchmarks' calibration


def measures(model, windows, stride=1):
    """Every batch of ``windows`` with the dense model's top-256 targets at the scored positions."""
    at = scored_positions(windows.shape[1], stride)
    out = []
    for i in range(0, len(windows), BATCH):
        batch = windows[i : i + BATCH]
        logits = model(input_ids=batch).logits.float()
        out.append((batch, at, top_k_with_tail(logits if at is None else logits[:, at], 256)))
    return out


def measured(model, targets):
    """Mean KL to the dense targets and mean next-token loss over the batches (equal sizes)."""
    kl = nll = 0.0
    for batch, at, (values, indices, tail) in targets:
        logits = model(input_ids=batch).logits.float()
        scored = logits if at is None else logits[:, at]
        kl += float(coarse_kl(scored, values, indices, tail))
        nll += float(next_token_nll(scored, batch, at))
    return kl / len(targets), nll / len(targets)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--set", action="append", required=True, help="removed blocks, comma-separated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sets = [sorted(int(b) for b in s.split(",")) for s in args.set]
    dense = load_model(args.model)
    _, small = calibration_windows(dense, CALIBRATION)
    _, big = calibration_windows(dense, CalibrationConfig(source=TEXT, samples=32, seq_len=128))
    where = {
        "512 tokens, every position": (small[:4], 1),
        "512 tokens, every 2nd position": (small[:4], 2),
        "256 tokens, every position": (small[:2], 1),
        "512 tokens, every 4th position": (small[:4], 4),
        "1,024 tokens, every position": (small, 1),
        "4,096 tokens, every position": (big, 1),
    }
    targets = {name: measures(dense.model, windows, stride) for name, (windows, stride) in where.items()}
    del dense
    rows = []
    for removed in sets:
        # the dense fit: what mi-search measures its finalists with (the saved model's later runs are refitted)
        result = pruned_with_linear(args.model, removed, CALIBRATION, activations="dense")
        row = {"removed": removed, "heldout_ppl": result.plan.evaluation.pruned_ppl}
        for name, parts in targets.items():
            row[name] = dict(zip(("kl", "nll"), measured(result.model, parts), strict=True))
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"### {args.model}: the repaired sets measured on calibration tokens against held-out perplexity ({TEXT})",
        "",
        "| removed | held-out ppl | " + " | ".join(f"KL, {name}" for name in where) + " |",
        "|---|---|" + "---|" * len(where),
    ]
    for row in rows:
        cells = " | ".join(f"{row[name]['kl']:.4f}" for name in where)
        lines.append(f"| {row['removed']} | {row['heldout_ppl']:.2f} | {cells} |")
    write_results(
        args.out, "final-measure", {"model": args.model, "text": TEXT, "rows": rows}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
