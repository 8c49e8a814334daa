"""Peak memory of scoring against the number of calibration tokens: it should stay flat.

Each measurement scores SmolLM2-135M (embedded, fp32, CPU) in a fresh subprocess and reads the
process's peak resident set size (``ru_maxrss``) at the end, so nothing carries over between runs. It
also reads the resident size once the model is loaded and has run one tiny forward pass (the weights
are memory-mapped and only become resident when used), to separate the model's share from the
calibration pass's. Sizes are 1x, 4x and 16x a base number of windows; each is repeated and the median
is reported.

    python benchmarks/memory.py                       # 8, 32, 128 windows of 128 tokens, 3 repeats
    python benchmarks/memory.py --repeats 1 --sequential   # also the layer-by-layer mode, once each
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results_io import TEXT, write_results

RESULTS = Path(__file__).parent / "results"
MIB = 1024 * 1024


def _rss_now() -> int:
    """Current resident set size in bytes (``/proc``, or ``psutil`` where there is no ``/proc``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def child(model: str, windows: int, seq_len: int, sequential: bool) -> dict[str, Any]:
    """One measurement, run in its own process: load, score, report memory."""
    import torch

    from miprun.api import CalibrationConfig, score
    from miprun.model.loading import load_model

    torch.set_num_threads(2)
    loaded = load_model(model, device="cpu", dtype="float32")
    with torch.inference_mode():  # weights are memory-mapped: touch them all before the baseline
        loaded.model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
    after_load = _rss_now()
    start = time.perf_counter()
    result = score(
        loaded,
        calibration=CalibrationConfig(source=TEXT, samples=windows, seq_len=seq_len, batch_size=4),
        all_spans=False,
        sequential=sequential,
        cache=False,
        progress=False,
    )
    return {
        "windows": windows,
        "seq_len": seq_len,
        "tokens": result.calibration.tokens,
        "sequential": sequential,
        "after_load_mib": round(after_load / MIB, 1),
        "peak_mib": round(_peak_rss() / MIB, 1),
        "score_seconds": round(time.perf_counter() - start, 2),
    }


def measure(model: str, windows: int, seq_len: int, sequential: bool) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and return its report."""
    cmd = [sys.executable, __file__, "--child", str(windows), "--model", model, "--seq-len", str(seq_len)]
    if sequential:
        cmd.append("--sequential")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median peak per (mode, windows), with the ratio to the smallest size of the same mode."""
    rows: list[dict[str, Any]] = []
    for sequential in sorted({r["sequential"] for r in runs}):
        sizes = sorted({r["windows"] for r in runs if r["sequential"] == sequential})
        base = None
        for windows in sizes:
            same = [r for r in runs if r["sequential"] == sequential and r["windows"] == windows]
            peak = statistics.median(r["peak_mib"] for r in same)
            load = statistics.median(r["after_load_mib"] for r in same)
            base = base or (peak, peak - load)
            rows.append(
                {
                    "mode": "sequential" if sequential else "whole model",
                    "windows": windows,
                    "tokens": same[0]["tokens"],
                    "repeats": len(same),
                    "peak_mib": round(peak, 1),
                    "after_load_mib": round(load, 1),
                    "calibration_mib": round(peak - load, 1),
                    "peak_ratio": round(peak / base[0], 3),
                    "calibration_ratio": round((peak - load) / base[1], 3) if base[1] > 0 else None,
                    "score_seconds": round(statistics.median(r["score_seconds"] for r in same), 2),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Peak memory of `miprun score` against calibration tokens ({meta['model']}, fp32, CPU)",
        "",
        f"Each row: the median over {meta['repeats']} fresh process(es) per size (peak RSS from `ru_maxrss`); "
        f"windows of "
        f"{meta['seq_len']} tokens, batches of 4, Gaussian MI (128-wide projection) plus the cosine sums. "
        "'after load' is the resident size once the model is loaded and has run once (its weights paged in); "
        "'calibration' is peak minus that.",
        "",
        "| mode | windows | tokens | peak RSS MiB | ratio to 1x | after load MiB | calibration MiB | "
        "calibration ratio | score s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['windows']} | {r['tokens']} | {r['peak_mib']:.0f} | {r['peak_ratio']:.3f} | "
            f"{r['after_load_mib']:.0f} | {r['calibration_mib']:.0f} | {r['calibration_ratio']} | "
            f"{r['score_seconds']} |"
        )
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['date']}."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--base-windows", type=int, default=8, help="windows at 1x (then 4x and 16x)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequential", action="store_true", help="also measure --sequential (once per size)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a line for the table (e.g. why fewer repeats)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.seq_len, args.sequential)))
        return

    import torch

    sizes = [args.base_windows * f for f in (1, 4, 16)]
    runs = []
    for repeat in range(args.repeats):  # interleaved, so a slow spell on a shared machine hits every size
        for windows in sizes:
            runs.append(measure(args.model, windows, args.seq_len, sequential=False))
            print(f"repeat {repeat + 1}: {runs[-1]}", flush=True)
    if args.sequential:
        for windows in sizes:
            runs.append(measure(args.model, windows, args.seq_len, sequential=True))
            print(f"sequential: {runs[-1]}", flush=True)
    meta = {
        "model": args.model,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {platform.system()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "note": args.note,
    }
    rows = summarise(runs)
    write_results(args.out, "memory", {"meta": meta, "rows": rows, "runs": runs}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
