"""Size and llama.cpp speed of a pruned GGUF against its source, measured side by side.

Writes the source GGUF without ``--remove`` blocks (quantised tensors copied as they are), then, when
``llama-cpp-python`` is importable, loads both files with llama.cpp and generates ``--tokens`` tokens greedily
from the same prompt, dense and pruned interleaved over ``--rounds`` rounds after a warm-up; decode speed is
llama.cpp's own timing of the generated tokens (``llama_perf_context``). Without llama-cpp-python only the
sizes are reported (it builds llama.cpp from source on install: ``pip install llama-cpp-python``, about 20
minutes on 2 cores).

    python benchmarks/gguf_speed.py --model smollm2-135m --remove 12 14 17 \\
        --out benchmarks/results/gguf-smollm2-135m

A GGUF that llama.cpp's converter wrote from a *transformers* checkpoint (``miprun prune --out-format gguf``
on a folder or the embedded transformers model) is timed the same way with ``--pruned``: pass it and the dense
model converted alike as ``--model`` (``--remove`` is then not used):

    miprun prune -m FOLDER -n 3 --out-format both --gguf-type q8_0 --out out/p3
    python benchmarks/gguf_speed.py --model dense-q8_0.gguf --pruned out/p3/model.gguf --out OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from results_io import write_results

from miprun.assets import EMBEDDED_MODELS, embedded_gguf
from miprun.output.gguf import gguf_block_count, write_pruned_gguf


def source_gguf(model: str) -> Path:
    if model in EMBEDDED_MODELS:
        found = embedded_gguf(model, build=True)
        assert found is not None
        return found
    return Path(model)


def decode_speed(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Median generated tokens per second (llama.cpp's decode timing, and wall clock) per file, interleaved."""
    import llama_cpp

    models = {
        name: llama_cpp.Llama(
            model_path=str(path), n_ctx=512, n_threads=args.threads, n_batch=64, seed=0, verbose=False
        )
        for name, path in paths.items()
    }
    for model in models.values():
        model.create_completion(args.prompt, max_tokens=16, temperature=0.0)  # warm-up
    decode: dict[str, list[float]] = {name: [] for name in models}
    wall: dict[str, list[float]] = {name: [] for name in models}
    texts: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.reset()
            llama_cpp.llama_perf_context_reset(model._ctx.ctx)
            start = time.perf_counter()
            out = model.create_completion(args.prompt, max_tokens=args.tokens, temperature=0.0)
            seconds = time.perf_counter() - start
            perf = llama_cpp.llama_perf_context(model._ctx.ctx)
            decode[name].append(perf.n_eval / (perf.t_eval_ms / 1000))
            wall[name].append(out["usage"]["completion_tokens"] / seconds)
            texts[name] = out["choices"][0]["text"]
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "decode_tok_s": {name: statistics.median(v) for name, v in decode.items()},
        "wall_tok_s": {name: statistics.median(v) for name, v in wall.items()},
        "decode_ratio": statistics.median(decode["pruned"]) / statistics.median(decode["dense"]),
        "text": texts,
    }


def markdown(result: dict[str, Any]) -> str:
    what = (
        f"{result['pruned']} against {result['source']}"
        if "pruned" in result
        else f"GGUF without blocks {result['removed']}"
    )
    lines = [
        f"### {result['model']}: {what} ({result['blocks_before']} -> {result['blocks_after']} blocks)",
        "",
        "| file | bytes | tensor types |",
        "|---|---:|---|",
        f"| source | {result['source_bytes']:,} | |",
        f"| pruned | {result['out_bytes']:,} ({-100 * result['shrink']:.1f} %) | {result['type_counts']} |",
    ]
    speed = result.get("speed")
    if speed is None:
        lines += ["", f"llama.cpp speed not measured: {result['speed_skipped']}"]
        return "\n".join(lines)
    ideal = result["blocks_before"] / result["blocks_after"]
    lines += [
        "",
        f"llama.cpp (llama-cpp-python {speed['llama_cpp_python']}, {speed['threads']} thread(s)), greedy "
        f"generation of {speed['tokens']} tokens, medians of {speed['rounds']} interleaved rounds:",
        "",
        "| file | decode tok/s | wall tok/s |",
        "|---|---:|---:|",
        *(
            f"| {name} | {speed['decode_tok_s'][name]:.1f} | {speed['wall_tok_s'][name]:.1f} |"
            for name in ("dense", "pruned")
        ),
        "",
        f"Decode speed-up {speed['decode_ratio']:.3f}x (the blocks alone would give {ideal:.3f}x; the "
        "embedding and output layer are not made smaller).",
    ]
    return "\n".join(lines)


def given_files(model: str, source: Path, pruned: Path) -> dict[str, Any]:
    """The record of a pruned GGUF written elsewhere (e.g. converted from a transformers checkpoint)."""
    before, after = gguf_block_count(source), gguf_block_count(pruned)
    size, out = source.stat().st_size, pruned.stat().st_size
    return {
        "model": model,
        "source": source.name,
        "pruned": pruned.name,
        "removed": f"{before - after} blocks",
        "blocks_before": before,
        "blocks_after": after,
        "source_bytes": size,
        "out_bytes": out,
        "shrink": 1 - out / size,
        "type_counts": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model name or a .gguf file")
    parser.add_argument("--remove", type=int, nargs="+", default=[], help="blocks to remove (0-based)")
    parser.add_argument("--pruned", type=Path, help="a pruned GGUF written elsewhere: time it, write none")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if bool(args.pruned) == bool(args.remove):
        parser.error("give one of --remove (prune the source GGUF here) and --pruned FILE (a pruned GGUF)")
    source = source_gguf(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pruned is not None:
            pruned = args.pruned
            result = given_files(args.model, source, pruned)
        else:
            pruned = Path(tmp) / "pruned.gguf"
            report = write_pruned_gguf(source, pruned, args.remove)
            result = {
                "model": args.model,
                "source": source.name,
                "removed": sorted(args.remove),
                "blocks_before": report.blocks_before,
                "blocks_after": report.blocks_after,
                "source_bytes": report.source_bytes,
                "out_bytes": report.out_bytes,
                "shrink": report.shrink,
                "type_counts": dict(report.type_counts),
            }
        if importlib.util.find_spec("llama_cpp") is None:
            result["speed_skipped"] = "llama-cpp-python is not installed (pip install llama-cpp-python)"
        else:
            result["speed"] = decode_speed({"dense": source, "pruned": pruned}, args)
    write_results(args.out, "gguf_speed", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
