"""Held-out perplexity of a healed model against the time spent healing (the target: 1.3x dense in 15 min).

Prunes SmolLM2-135M by 6 of 30 blocks once (kept in ``--pruned``), then for each ``--run`` heals a fresh
copy toward the dense model and measures held-out perplexity (8 x 256 tokens of the wiki evaluation split)
every ``--eval-every`` steps. The clock covers everything ``heal`` does (fingerprints, windows, adapters,
training, merging) and leaves the measurements out: wall time and process CPU time (all threads) of the
healing alone. Intermediate points are read from a run with the budget's cosine schedule, so they are a
little pessimistic for a run given that smaller budget.

    python benchmarks/heal.py --out benchmarks/results/heal-smollm2-135m --eval-every 5 \\
        --run tokens=20480,lr=5e-3 --run tokens=20480,lr=5e-3,batch_size=2
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_io import TEXT, write_results

import miprun
from miprun.evaluation.heldout import heldout_windows
from miprun.model.loading import as_loaded
from miprun.model.perplexity import perplexity
from miprun.options import CalibrationConfig
from miprun.repair.heal import HealConfig, heal

log = logging.getLogger("benchmarks.heal")


class Clock:
    """Wall and process CPU seconds since start, less the time spent in measurements."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.paused_wall = self.paused_cpu = 0.0

    def now(self) -> tuple[float, float]:
        return (
            time.perf_counter() - self.wall - self.paused_wall,
            time.process_time() - self.cpu - self.paused_cpu,
        )

    def measure(self, fn: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            self.paused_wall += time.perf_counter() - wall
            self.paused_cpu += time.process_time() - cpu


def parse_run(text: str) -> HealConfig:
    """``lr=5e-3,rank=8,tokens=20480`` -> a HealConfig (fields typed by their defaults)."""
    config = HealConfig(source=TEXT)
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        default = getattr(config, key)
        if isinstance(default, bool):
            setattr(config, key, value.lower() in ("1", "true", "yes"))
            continue
        parsed = value if isinstance(default, str) or key == "source" else float(value)
        setattr(config, key, int(parsed) if isinstance(default, int) or key == "teacher_topk" else parsed)
    config.validate()
    return config


def heal_curve(pruned: str, teacher: Any, windows: torch.Tensor, config: HealConfig, every: int) -> dict:
    """Heal a fresh copy of ``pruned`` with ``config``, measuring perplexity every ``every`` steps."""
    student = as_loaded(pruned)
    points = [
        {"step": 0, "tokens": 0, "wall_s": 0.0, "cpu_s": 0.0, "ppl": perplexity(student.model, windows)}
    ]
    log.info("%s: start ppl %.2f", config, points[0]["ppl"])
    clock = Clock()

    def on_step(step: int, loss: float, model: Any) -> None:
        if step % every == 0 and step < config.steps:
            wall, cpu = clock.now()
            ppl = clock.measure(lambda: perplexity(model, windows))
            tokens = step * config.batch_size * config.seq_len
            points.append(
                {"step": step, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "ppl": ppl, "kl": loss}
            )
            log.info(
                "step %d: %.1f min wall, %.1f min CPU, ppl %.2f, kl %.4f",
                step,
                wall / 60,
                cpu / 60,
                ppl,
                loss,
            )

    with tempfile.TemporaryDirectory() as work:
        report = heal(student, teacher, config, work_dir=Path(work), progress=False, on_step=on_step)
    wall, cpu = clock.now()
    points.append(
        {"step": report.steps, "tokens": report.tokens, "wall_s": wall, "cpu_s": cpu,
         "ppl": perplexity(student.model, windows), "kl": report.loss_end}
    )  # fmt: skip
    log.info("done: %.1f min wall, %.1f min CPU, ppl %.2f", wall / 60, cpu / 60, points[-1]["ppl"])
    return {"config": dataclasses.asdict(config), "points": points, "losses": report.losses}


def at_minutes(points: list[dict], minutes: float, key: str = "cpu_s") -> float | None:
    """Perplexity at ``minutes`` of the clock ``key``, interpolated linearly between measurements.

    None when the run ended before then.
    """
    limit = minutes * 60
    for before, after in itertools.pairwise(points):
        if before[key] <= limit <= after[key]:
            share = (limit - before[key]) / max(after[key] - before[key], 1e-9)
            return float(before["ppl"] + share * (after["ppl"] - before["ppl"]))
    return None


def markdown(results: dict) -> str:
    """A summary row per run (perplexity at 5/10/15 CPU-minutes, and at the end) and every measurement."""
    dense = results["dense_ppl"]
    lines = [
        f"# Healing SmolLM2-135M pruned by 6 of 30 blocks (dense ppl {dense:.2f}, target 1.3x = {1.3 * dense:.2f})",
        "",
        f"Process CPU minutes (all {results['threads']} threads; the machine is shared, so wall time is longer and "
        "noisy). Values at 5/10/15 minutes are interpolated between measurements.",
        "",
        "| run | tokens | batch | lr | rank | adapted blocks | ppl @5 CPU-min | @10 | @15 | end ppl | end CPU min "
        "| end wall min |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(results["runs"]):
        c, pts = run["config"], run["points"]
        cells = " | ".join("—" if (v := at_minutes(pts, m)) is None else f"{v:.2f}" for m in (5, 10, 15))
        end = pts[-1]
        lines.append(
            f"| {i} | {c['tokens']} | {c['batch_size']} | {c['lr']:g} | {c['rank']} | {c.get('blocks', 'all')} | "
            f"{cells} | {end['ppl']:.2f} | "
            f"{end['cpu_s'] / 60:.1f} | {end['wall_s'] / 60:.1f} |"
        )
    lines += [
        "",
        "| run | step | tokens | CPU min | wall min | ppl | batch KL |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(results["runs"]):
        for p in run["points"]:
            kl = f"{p['kl']:.3f}" if "kl" in p else "—"
            lines.append(
                f"| {i} | {p['step']} | {p['tokens']} | {p['cpu_s'] / 60:.1f} | {p['wall_s'] / 60:.1f} | "
                f"{p['ppl']:.2f} | {kl} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pruned", default=str(Path(tempfile.gettempdir()) / "miprun-heal-bench-pruned"))
    parser.add_argument("--run", action="append", default=[], help="KEY=VALUE,... of HealConfig fields")
    parser.add_argument("--eval-every", type=int, default=8, help="steps between measurements")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite heal.md from heal.json")
    parser.add_argument(
        "--repair", default="none", help="repair of the pruned model before healing (e.g. linear)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "heal.json").read_text())
        write_results(out, "heal", results, markdown(results))
        return
    if not (Path(args.pruned) / "miprun.json").is_file():
        miprun.prune(
            "smollm2-135m",
            num_blocks=6,
            repair=args.repair,
            calibration=CalibrationConfig(source=TEXT),
            progress=False,
            out=args.pruned,
            overwrite=True,
        )
    teacher = as_loaded("smollm2-135m")
    _, windows = heldout_windows(teacher.tokenizer, TEXT, 256, 8)
    path = out / "heal.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    results["dense_ppl"] = perplexity(teacher.model, windows)
    results["threads"] = args.threads
    for text in args.run or [""]:
        results["runs"].append(heal_curve(args.pruned, teacher, windows, parse_run(text), args.eval_every))
        results.setdefault("repair", {})[str(len(results["runs"]) - 1)] = args.repair
        write_results(out, "heal", results, markdown(results))
    log.info("\n%s", markdown(results))


if __name__ == "__main__":
    main()
