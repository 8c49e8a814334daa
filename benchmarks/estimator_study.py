"""Which form of MI predicts the damage of removing a block? (spec 5.2; issues 3-5a and 5)

For one model, this measures the true damage of removing each block alone (held-out perplexity, the
oracle), then for every MI variant (estimator x preprocessing x token choice): the Spearman rank
correlation of its block importance (1 - NMI) with that damage, and the held-out perplexity of the
blocks chosen by Fast-Block-Select and by ``mi-optimal`` at 10/20/30 % of blocks, against ShortGPT, the
angular window, the oracle's best contiguous window and the oracle's N least damaging single blocks.
Also its cost, as a multiple of one plain forward pass over the same calibration tokens.

    python benchmarks/estimator_study.py --model smollm2-135m --out benchmarks/results/study-smollm2-135m
    python benchmarks/estimator_study.py --model gemma3-270m --out benchmarks/results/study-gemma3-270m

``--variants LABEL ...`` runs only those variants and merges their rows into an existing ``study.json``
in ``--out`` (same model and windows), so a new variant does not re-run the slow ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results_io import TEXT, write_results

from miprun import estimators, methods
from miprun.capture.engine import capture
from miprun.capture.statistics import CosineSums
from miprun.data import eval_windows, load_text, token_windows
from miprun.evaluation.bench import forward_pass_seconds
from miprun.evaluation.oracle import DamageOracle, spearman
from miprun.methods.similarity import angular_select, block_influence, shortgpt_select
from miprun.model.identity import model_fingerprint, tensor_fingerprint
from miprun.model.layouts import num_blocks
from miprun.model.loading import load_model
from miprun.options import CalibrationConfig
from miprun.output.report import write_figure
from miprun.scores import ScoreTable

log = logging.getLogger("estimator_study")


@dataclass(frozen=True)
class Variant:
    """One MI signal: an estimator with its parameters, and whether each window's first token is dropped."""

    label: str
    estimator: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    exclude_first: bool = False

    @property
    def normalize(self) -> bool:
        return bool(self.params.get("normalize", False))


VARIANTS = [
    Variant("gaussian", "gaussian"),
    Variant("gaussian, no first token", "gaussian", exclude_first=True),
    Variant("gaussian, rms-normalised", "gaussian", {"normalize": True}),
    Variant("coordinate", "coordinate", {"center": False}),  # the default
    Variant("coordinate, rms-normalised", "coordinate", {"center": False, "normalize": True}),
    Variant("coordinate, centred", "coordinate", {"center": True}),
    Variant("coordinate, centred, no first token", "coordinate", {"center": True}, exclude_first=True),
    Variant("coordinate, centred, rms-normalised", "coordinate", {"center": True, "normalize": True}),
    Variant(
        "coordinate, centred, rms-normalised, no first token",
        "coordinate",
        {"center": True, "normalize": True},
        exclude_first=True,
    ),
    Variant("renyi", "renyi"),
    Variant("renyi, shared bandwidth", "renyi", {"shared_bandwidth": True}),
    Variant("renyi, rms-normalised", "renyi", {"normalize": True}),
    Variant("binned", "binned"),
    Variant("binned, rms-normalised", "binned", {"normalize": True}),
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, device=args.device, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    total = num_blocks(model)
    ns = sorted({max(1, round(total * r)) for r in args.ratios})
    cal = token_windows(
        tok, load_text(args.calib or TEXT, "calibration"), args.samples, args.seq_len, args.seed
    )
    held = eval_windows(tok, load_text(TEXT, "evaluation"), args.eval_seq_len, args.eval_samples)

    # The oracle persists after every evaluation, keyed by the model and the exact held-out windows, so
    # an interrupted study resumes where it stopped and a changed configuration never reuses old figures.
    key = f"{model_fingerprint(model)}-{tensor_fingerprint(held)}"
    oracle = DamageOracle(model, held, cache_path=out / f"oracle-{key}.json")
    oracle.fill([()] + [(i,) for i in range(total)], desc="oracle: single blocks")
    damage = oracle.single_damage(total)
    best_windows = {n: oracle.best_window(total, n) for n in ns if n <= args.oracle_window_max}

    fwd = forward_pass_seconds(model, cal, args.batch_size, repeats=3)
    groups: dict[tuple[bool, bool], list[Variant]] = {(False, False): []}  # the baselines' capture
    for v in VARIANTS if not args.variants else [v for v in VARIANTS if v.label in args.variants]:
        groups.setdefault((v.normalize, v.exclude_first), []).append(v)

    rows: list[dict[str, Any]] = []
    baselines: dict[str, dict[int, list[int]]] = {}
    for (_normalize, exclude_first), variants in groups.items():
        ests = {v: estimators.get(v.estimator, **v.params) for v in variants}
        # Estimators of one group share one capture; a larger token sample serves a smaller one, each
        # estimator reading an even subsample of it across every window.
        requests = [CosineSums(), CosineSums(positions="last")]
        requests += [stat for est in ests.values() for stat in est.statistics()]
        settings = CalibrationConfig(
            batch_size=args.batch_size, seed=args.seed, exclude_first_token=exclude_first
        )
        start = time.perf_counter()
        stats = capture(model, cal, requests, settings)
        capture_s = time.perf_counter() - start
        if (_normalize, exclude_first) == (False, False):
            bi = block_influence(stats.get(CosineSums()).mean_cos())
            baselines["shortgpt"] = {n: shortgpt_select(bi, n) for n in ns}
            last = stats.get(CosineSums(positions="last")).mean_angle()
            baselines["angular"] = {n: angular_select(last, n) for n in ns}
            baselines["angular-mean"] = {
                n: angular_select(stats.get(CosineSums()).mean_angle(), n) for n in ns
            }
            rows.append({"label": "shortgpt (cosine)", "spearman": spearman(bi, damage), "block_score": bi})
        for v, est in ests.items():
            table = ScoreTable(num_blocks=total, estimator=est, stats=stats)
            start = time.perf_counter()
            importance = [1.0 - x for x in table.block_nmi()]
            block_s = time.perf_counter() - start
            row: dict[str, Any] = {
                "label": v.label,
                "estimator": est.params(),
                "exclude_first_token": v.exclude_first,
                "spearman": spearman(importance, damage),
                "block_score": importance,
                "capture_s_shared": capture_s,
                "block_scores_s": block_s,
            }
            for n in ns:
                removed, info = methods.run(methods.build("mi-prun"), methods.Evidence(total, table), n)
                row[f"fbs_{n}"] = {"removed": removed, "ppl": oracle(removed), "evals": info.num_evaluations}
                row[f"fbs_{n}"]["seconds"] = info.seconds
                row[f"opt_{n}"] = {"removed": info.optimal_removed, "ppl": oracle(info.optimal_removed or [])}
                log.info("%s N=%d: FBS %s ppl %.2f", v.label, n, removed, row[f"fbs_{n}"]["ppl"])
            rows.append(row)
    reference = {
        "shortgpt": {n: {"removed": r, "ppl": oracle(r)} for n, r in baselines["shortgpt"].items()},
        "angular (last token)": {
            n: {"removed": r, "ppl": oracle(r)} for n, r in baselines["angular"].items()
        },
        "angular-mean (all tokens)": {
            n: {"removed": r, "ppl": oracle(r)} for n, r in baselines["angular-mean"].items()
        },
        "oracle best window": {
            n: {"removed": w, "ppl": p} if n in best_windows else {"removed": None, "ppl": None}
            for n, (w, p) in {n: best_windows.get(n, ([], None)) for n in ns}.items()
        },
        "oracle N least damaging blocks": {
            n: {"removed": sorted(sorted(range(total), key=lambda i: damage[i])[:n])} for n in ns
        },
    }
    for entry in reference["oracle N least damaging blocks"].values():
        entry["ppl"] = oracle(entry["removed"])
    return {
        "model": loaded.name,
        "num_blocks": total,
        "ns": ns,
        "calibration": {"source": args.calib or TEXT, "samples": args.samples, "seq_len": args.seq_len},
        "evaluation": {
            "source": f"{TEXT}:evaluation",
            "windows": int(held.shape[0]),
            "seq_len": int(held.shape[1]),
        },
        "dense_ppl": oracle.dense,
        "single_block_damage": damage,
        "forward_pass_s": fwd,
        "variants": rows,
        "reference": reference,
    }


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s variant rows added or replaced (both from the same model and windows)."""
    for key in ("model", "ns", "calibration", "evaluation", "single_block_damage"):
        if old[key] != new[key]:
            raise SystemExit(
                f"cannot merge: {key} differs from the existing study.json ({old[key]} vs {new[key]})"
            )
    fresh = {r["label"] for r in new["variants"]}
    labels = [v.label for v in VARIANTS]
    rows = [r for r in old["variants"] if r["label"] not in fresh] + new["variants"]
    order = {label: i for i, label in enumerate(["shortgpt (cosine)", *labels])}
    rows.sort(key=lambda r: order.get(r["label"], len(order)))
    reference = {
        **{k: {int(n): v for n, v in e.items()} for k, e in old["reference"].items()},
        **new["reference"],
    }
    reference.pop(
        "angular", None
    )  # renamed: the all-token distance is "angular-mean", the paper's is last-token
    return {**old, "reference": reference, "variants": rows}  # int N keys, as markdown() reads


def markdown(result: dict[str, Any]) -> str:
    ns = result["ns"]
    head = "| signal | Spearman vs damage | " + " | ".join(f"FBS N={n} | opt N={n}" for n in ns) + " |"
    lines = [
        f"### {result['model']} ({result['num_blocks']} blocks, dense held-out perplexity "
        f"{result['dense_ppl']:.2f} on {result['evaluation']['windows']} x {result['evaluation']['seq_len']} tokens)",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(ns)),
    ]
    for row in result["variants"]:
        cells = [row["label"], f"{row['spearman']:+.2f}"]
        for n in ns:
            cells += [f"{row[k]['ppl']:.1f}" if k in row else "" for k in (f"fbs_{n}", f"opt_{n}")]
        lines.append("| " + " | ".join(cells) + " |")
    for name, entries in result["reference"].items():
        cells = [f"*{name}*", ""]
        for n in ns:
            ppl = entries[n]["ppl"]
            cells += [f"{ppl:.1f}" if ppl is not None and math.isfinite(ppl) else "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"One plain forward pass over the calibration tokens: {result['forward_pass_s']:.1f} s (median of 3)."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    damage = result["single_block_damage"]
    rows = sorted(result["variants"], key=lambda r: -r["spearman"])
    picks = rows[:3] + [
        r for r in rows if r["label"] in ("gaussian", "shortgpt (cosine)") and r not in rows[:3]
    ]
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(4 * (len(picks) + 1), 3.6))
    axes[0].bar(range(len(damage)), damage, color="tab:gray")
    axes[0].set_title("oracle: log ppl ratio, block removed alone")
    axes[0].set_xlabel("block")
    for ax, row in zip(axes[1:], picks, strict=True):
        ax.bar(range(len(row["block_score"])), row["block_score"], color="tab:blue")
        ax.set_title(f"{row['label']}\nSpearman {row['spearman']:+.2f}", fontsize=9)
        ax.set_xlabel("block")
    fig.suptitle(f"{result['model']}: block importance vs true damage")
    fig.tight_layout()
    write_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--oracle-window-max", type=int, default=4, help="longest contiguous window the oracle evaluates"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--variants", nargs="+", default=None, help="only these labels, merged into --out's study.json"
    )
    args = parser.parse_args()
    unknown = set(args.variants or ()) - {v.label for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {[v.label for v in VARIANTS]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    out = Path(args.out)
    if args.variants and (out / "study.json").exists():
        result = merged(json.loads((out / "study.json").read_text()), result)
    write_results(out, "study", result, markdown(result))
    plot(result, out / "study.png")
    print(markdown(result))
    if any(math.isnan(r["spearman"]) for r in result["variants"]):
        log.warning("some Spearman values are NaN")


if __name__ == "__main__":
    main()
