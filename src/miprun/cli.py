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
from miprun.methods import DEFAULT_METHOD, METHODS

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


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    logging.getLogger("miprun").setLevel(level)


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
    method: Annotated[str, typer.Option("--method", help=f"Selection: {', '.join(sorted(METHODS))}.")] = (
        DEFAULT_METHOD
    ),
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
) -> None:
    """Score blocks, remove N of them, and save a normal Hugging Face checkpoint with miprun.json and a report.

    Example: miprun prune --num-blocks 3 --out out/smollm2-pruned --eval
    """
    from miprun import api

    _setup_logging(quiet)
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
    )
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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score every block and every contiguous span; `prune --scores FILE` reuses them for any N.

    Example: miprun score --out scores.json && miprun prune --scores scores.json -n 4 --out out/p4
    """
    from miprun import api

    _setup_logging(quiet)
    result = api.score(
        model,
        calibration=_calibration(calib, samples, seq_len, seed, batch_size, exclude_first_token),
        estimator=estimator,
        estimator_params=_parse_est_opts(est_opt),
        all_spans=True,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
    )
    result.write(out)
    table = Table(title=f"{result.model['name']}: normalised MI per block ({result.estimator.name})")
    table.add_column("block", justify="right")
    table.add_column("MI (nats)", justify="right")
    table.add_column("NMI", justify="right")
    for i, (mi, nmi) in enumerate(zip(result.table.block_mi(), result.table.block_nmi(), strict=True)):
        table.add_row(str(i), f"{mi:.4f}", f"{nmi:.4f}")
    out_console.print(table)
    out_console.print(f"scores written to {out}")


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
    table.add_row("iterations / MI evaluations", f"{plan.search.iterations} / {plan.search.num_evaluations}")
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


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors with a non-zero exit, tracebacks only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="miprun", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("miprun: interrupted; nothing was written to the output folder")
        return 130
    except Exception as exc:
        if "--debug" in args:
            raise
        console.print(f"miprun: error: {exc}", markup=False, highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
