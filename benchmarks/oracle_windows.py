"""The true damage of removing every contiguous window of 2-4 blocks (issue 5, point 1).

Shares the estimator study's oracle cache (same model, same held-out windows), so single-block and
window perplexities measured there are reused. Writes a table of the best window per length and a plot
of the damage of every window beside the single-block damage.

    python benchmarks/oracle_windows.py --model smollm2-135m --eval-samples 8 --out benchmarks/results/study-smollm2-135m
    python benchmarks/oracle_windows.py --model gemma3-270m --eval-samples 4 --out benchmarks/results/study-gemma3-270m
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from results_io import TEXT, write_results

from miprun.data import eval_windows, load_text
from miprun.evaluation.oracle import DamageOracle
from miprun.model.identity import model_fingerprint, tensor_fingerprint
from miprun.model.layouts import num_blocks
from miprun.model.loading import load_model
from miprun.output.report import write_figure


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, device=args.device, dtype="float32")
    held = eval_windows(loaded.tokenizer, load_text(TEXT, "evaluation"), args.eval_seq_len, args.eval_samples)
    key = f"{model_fingerprint(loaded.model)}-{tensor_fingerprint(held)}"
    oracle = DamageOracle(loaded.model, held, cache_path=out / f"oracle-{key}.json")
    total = num_blocks(loaded.model)
    single = oracle.single_damage(total)
    rows = {}
    for length in args.lengths:
        window, ppl = oracle.best_window(total, length)
        damage = [
            math.log(oracle(tuple(range(a, a + length))) / oracle.dense) for a in range(total - length + 1)
        ]
        rows[length] = {"best": window, "ppl": ppl, "damage_by_start": damage}
    lines = [
        f"### {loaded.name}: removing contiguous windows (held-out perplexity; dense {oracle.dense:.2f})",
        "",
        "| window length | best window | its perplexity | median window perplexity |",
        "|---|---|---|---|",
    ]
    for length, row in rows.items():
        median = sorted(row["damage_by_start"])[len(row["damage_by_start"]) // 2]
        lines.append(
            f"| {length} | {row['best']} | {row['ppl']:.2f} | {oracle.dense * math.exp(median):.2f} |"
        )
    write_results(out, "oracle_windows", {"single": single, "windows": rows}, "\n".join(lines))
    plot(loaded.name, single, rows, out / "oracle_windows.png")
    print("\n".join(lines))


def plot(name: str, single: list[float], rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(range(len(single)), single, marker="o", label="1 block")
    for length, row in rows.items():
        ax.plot(
            range(len(row["damage_by_start"])), row["damage_by_start"], marker=".", label=f"{length} blocks"
        )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("first block of the removed window")
    ax.set_ylabel("log(perplexity / dense)")
    ax.set_title(f"{name}: true damage of removing a window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(fig, path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
