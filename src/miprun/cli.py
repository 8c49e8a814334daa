"""``miprun``: the command line, a thin layer over :mod:`miprun.api`.

Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from miprun import estimators
from miprun.methods import DEFAULT_METHOD, describe_methods

app = typer.Typer(
    name="miprun",
    help="Depth-prune causal language models by mutual information (MI-PRUN).\n\n"
    "Examples:\n\n"
    "  miprun prune --num-blocks 3 --out out/smollm2-pruned --eval\n\n"
    "  miprun score --model ./my-llama --out scores.json\n\n"
    "  miprun prune --model ./my-llama --scores scores.json --ratio 0.2 --out out/llama-pruned",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()

# ----------------------------------------------------------------------------- shared options

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Embedded name (smollm2-135m, gemma3-270m), local HF folder, .gguf file or hub name. "
        "Default: the embedded SmolLM2-135M-Instruct.",
    ),
]
CalibOpt = Annotated[
    str | None,
    typer.Option(
        "--calib",
        help="Calibration text: wiki (default, SQuAD Wikipedia paragraphs), new_wiki, nyt, reddit, amazon, "
        "a local .txt/.jsonl file, or a hub data set (wikitext2, c4, alpaca, pg19).",
    ),
]
EstimatorOpt = Annotated[
    str,
    typer.Option("--estimator", "-e", help=f"MI estimator: {', '.join(sorted(estimators.REGISTRY))}."),
]
EstOptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--est-opt", help="Estimator parameter KEY=VALUE (repeatable), e.g. --est-opt proj_dim=256."
    ),
]
SamplesOpt = Annotated[int, typer.Option("--samples", "-s", min=1, help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", "-l", min=2, help="Tokens per calibration window.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed for window sampling, projections and token sample.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")]
FirstTokOpt = Annotated[
    bool, typer.Option("--exclude-first-token", help="Leave each window's first token out of the statistics.")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps ...")
]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16.")
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow model code from the hub (off by default: it runs code)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
NoCacheOpt = Annotated[
    bool,
    typer.Option("--no-cache", help="Recompute the scores even if cached (cache: $MIPRUN_CACHE/scores)."),
]
MethodOpt = Annotated[str, typer.Option("--method", help=f"Pruning method: {describe_methods()}.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread a model larger than one device with accelerate: auto, balanced, balanced_low_0, "
        "sequential (layers on several GPUs, the rest offloaded to CPU). Default: all on --device.",
    ),
]
SequentialOpt = Annotated[
    bool,
    typer.Option(
        "--sequential",
        help="Keep the model on the CPU and calibrate one decoder layer at a time on --device "
        "(scores equal to the whole-model pass; device memory: one layer and one batch).",
    ),
]


def _main_process() -> bool:
    """Join torchrun's process group if launched by it; whether this process prints and writes (rank 0)."""
    from miprun import distributed

    distributed.init_from_env()
    return distributed.is_main()


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    logging.getLogger("miprun").setLevel(level)
    if quiet:  # transformers draws its own "Loading weights" bar otherwise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _parse_est_opts(items: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--est-opt")
        try:
            params[key] = json.loads(raw.lower() if raw.lower() in ("true", "false") else raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _calibration(
    calib: str | None, samples: int, seq_len: int, seed: int, batch_size: int, first: bool
) -> Any:
    from miprun.api import CalibrationConfig

    return CalibrationConfig(calib, samples, seq_len, seed, batch_size, first)


# ----------------------------------------------------------------------------- commands


@app.command()
def prune(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned model and report.")],
    model: ModelOpt = None,
    calib: CalibOpt = None,
    num_blocks: Annotated[
        int | None, typer.Option("--num-blocks", "-n", help="Blocks to remove (N).")
    ] = None,
    ratio: Annotated[
        float | None, typer.Option("--ratio", "-r", help="Fraction of blocks: N = ceil(T*R).")
    ] = None,
    method: MethodOpt = DEFAULT_METHOD,
    estimator: EstimatorOpt = estimators.DEFAULT,
    est_opt: EstOptOpt = None,
    k: Annotated[
        int, typer.Option("--k", min=0, help="Fast-Block-Select candidate surplus: floor(ln L)+k.")
    ] = 5,
    scores: Annotated[
        Path | None, typer.Option("--scores", help="Reuse a `miprun score` file: no calibration pass.")
    ] = None,
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 4,
    exclude_first_token: FirstTokOpt = False,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Held-out perplexity of the dense and pruned model.")
    ] = False,
    eval_source: Annotated[
        str | None, typer.Option("--eval-text", help="Held-out text (default: wiki).")
    ] = None,
    eval_samples: Annotated[int, typer.Option("--eval-samples", min=1, help="Held-out windows.")] = 16,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", min=2, help="Held-out window length.")] = 256,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists (only once done).")
    ] = (False),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    no_cache: NoCacheOpt = False,
    device_map: DeviceMapOpt = None,
    sequential: SequentialOpt = False,
) -> None:
    """Score blocks, remove N of them, and save a normal Hugging Face checkpoint with miprun.json and a report.

    Example: miprun prune --num-blocks 3 --out out/smollm2-pruned --eval

    Example (data-parallel): torchrun --nproc_per_node 4 $(which miprun) prune -n 8 --out out/p8
    """
    from miprun import api

    main = _main_process()
    _setup_logging(quiet or not main)
    result = api.prune(
        model,
        num_blocks=num_blocks,
        ratio=ratio,
        method=method,
        k=k,
        scores=scores,
        calibration=_calibration(calib, samples, seq_len, seed, batch_size, exclude_first_token),
        estimator=estimator,
        estimator_params=_parse_est_opts(est_opt),
        out=out,
        overwrite=overwrite,
        evaluate=evaluate,
        eval_source=eval_source,
        eval_samples=eval_samples,
        eval_seq_len=eval_seq_len,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
        cache=not no_cache,
        device_map=device_map,
        sequential=sequential,
    )
    if main:
        _print_prune_summary(result)


@app.command()
def score(
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores file (JSON) to write.")],
    model: ModelOpt = None,
    calib: CalibOpt = None,
    estimator: EstimatorOpt = estimators.DEFAULT,
    est_opt: EstOptOpt = None,
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 4,
    exclude_first_token: FirstTokOpt = False,
    method: MethodOpt = DEFAULT_METHOD,
    max_blocks: Annotated[
        int | None,
        typer.Option(
            "--max-blocks",
            min=1,
            help="Largest N the file must serve for sleb (default: a quarter of the blocks).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    no_cache: NoCacheOpt = False,
    device_map: DeviceMapOpt = None,
    sequential: SequentialOpt = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists (written atomically when done).")
    ] = False,
) -> None:
    """Score every block and every contiguous span; `prune --scores FILE` reuses them for any N.

    --method shortgpt or angular adds the cosine statistics those read; --method sleb or ppl-oneshot
    adds the forward passes those need.

    Example: miprun score --out scores.json && miprun prune --scores scores.json -n 4 --out out/p4

    Example: miprun score --method sleb --max-blocks 6 --out sleb.json

    Example (70B on one GPU): miprun score --model ./llama-70b --sequential --device cuda --out s.json
    """
    from miprun import api

    if out.exists() and not overwrite:  # before any work, so a long run never ends in a refusal
        raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    main = _main_process()
    _setup_logging(quiet or not main)
    result = api.score(
        model,
        calibration=_calibration(calib, samples, seq_len, seed, batch_size, exclude_first_token),
        estimator=estimator,
        estimator_params=_parse_est_opts(est_opt),
        all_spans=True,
        method=method,
        max_blocks=max_blocks,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
        cache=not no_cache,
        device_map=device_map,
        sequential=sequential,
    )
    if not main:  # every rank holds the same merged result; rank 0 writes it
        return
    result.write(out)
    _print_block_scores(result)
    out_console.print(f"scores written to {out}")


def _print_block_scores(result: Any) -> None:
    from miprun.baselines import block_influence

    extra = result.baselines
    table = Table(title=f"{result.model['name']}: scores per block ({result.estimator.name} MI)")
    for name in ("block", "MI (nats)", "NMI", "ShortGPT BI"):
        table.add_column(name, justify="right")
    if extra.oneshot is not None:
        table.add_column("loss without it", justify="right")
    bi = block_influence(extra.cosine.mean_cos()) if extra.cosine is not None else None
    for i, (mi, nmi) in enumerate(zip(result.table.block_mi(), result.table.block_nmi(), strict=True)):
        row = [str(i), f"{mi:.4f}", f"{nmi:.4f}", f"{bi[i]:.4f}" if bi is not None else "-"]
        if extra.oneshot is not None:
            row.append(f"{extra.oneshot.losses[i]:.4f}")
        table.add_row(*row)
    out_console.print(table)
    if extra.sleb is not None:
        out_console.print(
            f"SLEB greedy order: {extra.sleb.order} (losses {[round(x, 4) for x in extra.sleb.losses]})"
        )


def _print_prune_summary(result: Any) -> None:
    plan = result.plan
    table = Table(title=f"{plan.model['name']}: {plan.num_blocks_before} -> {plan.num_blocks_after} blocks")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("removed blocks (0-based)", str(plan.removed))
    table.add_row("method / estimator", f"{plan.search.method} / {plan.estimator['name']}")
    table.add_row(
        "set loss / optimum / gap",
        f"{plan.search.loss:.4f} / {plan.search.optimal_loss:.4f} / {plan.search.gap:.4f}",
    )
    table.add_row(
        "iterations / evaluations (MI, scores or passes)",
        f"{plan.search.iterations} / {plan.search.num_evaluations}",
    )
    if "dense_ppl" in plan.evaluation:
        ev = plan.evaluation
        table.add_row(
            f"held-out perplexity ({ev['windows']}x{ev['seq_len']} tok)",
            f"{ev['dense_ppl']:.2f} -> {ev['pruned_ppl']:.2f}",
        )
    for phase, seconds in plan.timings.items():
        table.add_row(f"time: {phase}", f"{seconds:.2f} s")
    out_console.print(table)
    if result.out is not None:
        out_console.print(f"pruned model: {result.out}")
        out_console.print(f"manifest:     {result.out / 'miprun.json'}")
        out_console.print(f"report:       {result.out / 'report.md'}  {result.out / 'report.png'}")


# ----------------------------------------------------------------------------- eval and bench


def _split_list(items: list[str] | None) -> list[str]:
    """Repeatable options that also accept comma-separated values: ``-t a,b -t c`` -> [a, b, c]."""
    return [part.strip() for item in items or [] for part in item.split(",") if part.strip()]


@app.command("eval")
def eval_command(
    model: ModelOpt = None,
    ppl: Annotated[
        list[str] | None,
        typer.Option(
            "--ppl",
            help="Perplexity text (repeatable; evaluation split): wiki (default), new_wiki, nyt, reddit, "
            "amazon, a local .txt/.jsonl file, or a hub data set.",
        ),
    ] = None,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    ppl_seq_len: Annotated[
        int, typer.Option("--ppl-seq-len", min=2, help="Tokens per perplexity window.")
    ] = 256,
    ppl_windows: Annotated[
        int, typer.Option("--ppl-windows", min=0, help="First N windows of each text (0: all).")
    ] = 64,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            "-t",
            help="Zero-shot tasks (repeatable or comma-separated): social_iqa and next_sentence run offline; "
            "any other lm-eval task name (or lm-eval:NAME) needs the hub.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="First N examples per task.")] = None,
    task_text: Annotated[
        str | None, typer.Option("--task-text", help="Held-out text for next_sentence (default: wiki).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the next_sentence distractors.")] = 0,
    batch_size: BatchOpt = 4,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Held-out perplexity and zero-shot accuracy (acc, acc_norm through lm-evaluation-harness).

    Example: miprun eval --model out/smollm2-pruned --tasks social_iqa,next_sentence --limit 200 --out eval.json
    """
    from miprun.evaluate import evaluate, write_json

    _setup_logging(quiet)
    result = evaluate(
        model,
        ppl_sources=[] if no_ppl else _split_list(ppl) or ["wiki"],
        tasks=_split_list(tasks),
        limit=limit,
        seq_len=ppl_seq_len,
        max_windows=ppl_windows or None,
        batch_size=batch_size,
        task_batch_size=batch_size,
        seed=seed,
        task_text=task_text,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    info = result["model"]
    table = Table(
        title=f"{info['name']}: {info['num_blocks']} blocks, {info['parameters'] / 1e6:.1f} M parameters"
    )
    for name in ("measure", "value", "detail"):
        table.add_column(name, justify="left" if name != "value" else "right")
    for source, p in result["perplexity"].items():
        table.add_row(f"perplexity {source}", f"{p['ppl']:.3f}", f"{p['windows']} x {p['seq_len']} tokens")
    for task, t in result["tasks"].items():
        chance = f", chance {t['chance']:.2f}" if "chance" in t else ""
        for metric in ("acc", "acc_norm"):
            stderr = f" ± {t[metric + '_stderr']:.3f}" if t.get(metric + "_stderr") is not None else ""
            value = f"{t[metric]:.4f}" if t.get(metric) is not None else "-"
            table.add_row(f"{task} {metric}", value + stderr, f"{t['examples']} examples{chance}")
    out_console.print(table)
    if out is not None:
        write_json(result, out)
        out_console.print(f"results written to {out}")


@app.command()
def bench(
    model: ModelOpt = None,
    against: Annotated[
        str | None, typer.Option("--against", help="Dense model to compare with, measured interleaved.")
    ] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens.")] = 256,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", min=1, help="Greedy tokens decoded per run.")
    ] = 32,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Decode batch sizes, comma-separated.")
    ] = "1,8",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds first.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed rounds; medians are reported.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt.")] = 0,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results as JSON.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prefill latency, decode throughput, memory and size; with --against, pruned/dense ratios.

    Example: miprun bench --model out/smollm2-pruned --against smollm2-135m --out bench.json
    """
    from miprun.bench import BenchConfig
    from miprun.bench import bench as run_bench
    from miprun.evaluate import write_json

    _setup_logging(quiet)
    try:
        sizes = tuple(int(b) for b in _split_list([batch_sizes]))
    except ValueError:
        raise typer.BadParameter(
            f"expected integers like 1,8, got {batch_sizes!r}", param_hint="--batch-sizes"
        ) from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"batch sizes must be positive integers, got {batch_sizes!r}")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    config = BenchConfig(prompt_len, new_tokens, sizes, warmup, repeats, seed)
    result = run_bench(
        model,
        against=against,
        config=config,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    runs = [result["model"]] + ([result["dense"]] if "dense" in result else [])
    table = Table(title=f"bench on {result['device']} ({result['dtype']}), medians of {repeats}")
    table.add_column("measure")
    for run in runs:
        table.add_column(f"{run['name']} ({run['num_blocks']} blocks)", justify="right")
    if "ratios" in result:
        table.add_column("speed-up or size ratio", justify="right")
    ratios = result.get("ratios", {})

    def row(label: str, values: list[str], ratio: float | None = None) -> None:
        table.add_row(label, *values, *([f"{ratio:.3f}x" if ratio is not None else "-"] if ratios else []))

    row("parameters (M)", [f"{r['parameters'] / 1e6:.2f}" for r in runs], ratios.get("parameter_ratio"))
    row(
        f"prefill {prompt_len} tok (ms)",
        [f"{r['prefill_ms']:.1f}" for r in runs],
        ratios.get("prefill_speedup"),
    )
    for b in sizes:
        row(
            f"decode batch {b} (tok/s)",
            [f"{r['decode_tokens_per_s'][str(b)]:.1f}" for r in runs],
            ratios.get("decode_speedup", {}).get(str(b)),
        )
    row(
        "weights (MB)",
        [f"{r['memory']['weights_bytes'] / 2**20:.1f}" for r in runs],
        ratios.get("weights_bytes_ratio"),
    )
    if "ratios" in result:
        table.add_row("ideal layer ratio T/(T-N)", *["" for _ in runs], f"{ratios['ideal_layer_ratio']:.3f}x")
    out_console.print(table)
    out_console.print(f"memory: {result['memory_kind']}")
    if out is not None:
        write_json(result, out)
        out_console.print(f"results written to {out}")


@app.command()
def compare(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for comparison.md/.json and plots.")],
    model: ModelOpt = None,
    calib: CalibOpt = None,
    num_blocks: Annotated[
        list[int] | None,
        typer.Option("--num-blocks", "-n", help="Blocks to remove; repeat or list: -n 3 6 9."),
    ] = None,
    methods: Annotated[
        list[str] | None, typer.Option("--methods", help="Methods to compare (repeat or comma-separate).")
    ] = None,
    estimator: EstimatorOpt = estimators.DEFAULT,
    est_opt: EstOptOpt = None,
    samples: SamplesOpt = 32,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 4,
    eval_source: Annotated[
        str | None, typer.Option("--eval-text", help="Held-out text (default: wiki).")
    ] = None,
    eval_samples: Annotated[int, typer.Option("--eval-samples", min=1, help="Held-out windows.")] = 16,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", min=2, help="Held-out window length.")] = 256,
    tasks: Annotated[
        list[str] | None, typer.Option("--tasks", "-t", help="Zero-shot tasks for each pruned model.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Examples per task.")] = None,
    task_max_ppl: Annotated[
        float | None,
        typer.Option(
            "--task-max-ppl",
            min=1.0,
            help="Skip the tasks for pruned models whose held-out perplexity exceeds this multiple of dense "
            "(they answer at chance); default: run them for every row.",
        ),
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Replace only these methods' rows in the comparison already in --out (same model, data "
            "and tasks); keep the other rows.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune with every method at every N on the same data; evaluate; write a table and plots.

    Example (about ten minutes on 2 CPU cores):
    miprun compare -n 3 -n 6 --methods mi-prun,shortgpt,angular,sleb --samples 16 --seq-len 128 --out out/cmp
    """
    from miprun.compare import DEFAULT_METHODS, CompareConfig, run

    _setup_logging(quiet)
    config = CompareConfig(
        num_blocks=num_blocks or [3, 6, 9],
        methods=_split_list(methods) or list(DEFAULT_METHODS),
        calibration=_calibration(calib, samples, seq_len, seed, batch_size, False),
        estimator=estimator,
        estimator_params=_parse_est_opts(est_opt),
        eval_source=eval_source,
        eval_samples=eval_samples,
        eval_seq_len=eval_seq_len,
        tasks=_split_list(tasks),
        task_limit=limit,
        task_max_ppl_ratio=task_max_ppl,
    )
    paths = run(model, config, out, device=device, dtype=dtype, progress=not quiet, update_existing=update)
    out_console.print((Path(out) / "comparison.md").read_text(encoding="utf-8"))
    for path in paths:
        out_console.print(f"wrote {path}")


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors with a non-zero exit, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    interrupted = "miprun: interrupted; nothing was written to the output folder"
    try:
        # typer turns a KeyboardInterrupt inside a command into a returned 130, not an exception
        code = app(args=args, prog_name="miprun", standalone_mode=False)
        if code == 130:
            console.print(interrupted)
            return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print(interrupted)
        return 130
    except Exception as exc:
        if "--debug" in args:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the library said
        console.print(f"miprun: error: {message}", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
