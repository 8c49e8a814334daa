"""``miprun``: the command line, a thin layer over :mod:`miprun.api`.

Options come from :mod:`miprun.options` (see :mod:`miprun.cli.params`); results are shown by
:mod:`miprun.cli.show`. Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from miprun.cli import show
from miprun.cli.logs import libraries_restored, setup_logging
from miprun.cli.params import (
    DebugOpt,
    ModelOpt,
    OldOutOpt,
    OverwriteOpt,
    QuietOpt,
    json_path,
    with_options,
)
from miprun.options import (
    BenchOptions,
    CompareOptions,
    EvaluateOptions,
    HealOptions,
    PruneOptions,
    ScoreOptions,
)

app = typer.Typer(
    name="miprun",
    help="Depth-prune causal language models by mutual information (MI-PRUN).\n\n"
    "Examples:\n\n"
    "  miprun prune --num-blocks 3 --out out/smollm2-pruned --eval\n\n"
    "  miprun score --model ./my-llama --json scores.json\n\n"
    "  miprun prune --model ./my-llama --scores scores.json --ratio 0.2 --out out/llama-pruned\n\n"
    "  miprun list methods",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=True,  # --install-completion / --show-completion: bash, zsh, fish, PowerShell
)
console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from miprun.versions import package_versions

        typer.echo(f"miprun {package_versions()['miprun']}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print miprun's version and exit."
        ),
    ] = False,
) -> None:
    """Depth-prune causal language models by mutual information (MI-PRUN)."""


def _main_process() -> bool:
    """Join torchrun's process group if launched by it; whether this process prints and writes."""
    from miprun.capture import distributed

    return distributed.is_main()


@app.command()
@with_options(PruneOptions)
def prune(
    options: PruneOptions,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the pruned model and report.")],
    model: ModelOpt = None,
    scores: Annotated[
        Path | None, typer.Option("--scores", help="Reuse a `miprun score` file: no calibration pass.")
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score blocks, remove N of them, and save a normal Hugging Face checkpoint with miprun.json and a report.

    Example: miprun prune --num-blocks 3 --out out/smollm2-pruned --eval

    Example (data-parallel): torchrun --nproc_per_node 4 $(which miprun) prune -n 8 --out out/p8
    """
    from miprun import api
    from miprun.options import with_overrides

    main = _main_process()
    setup_logging(console, quiet or not main)
    result = api.prune(
        model, with_overrides(options, progress=not quiet), scores=scores, out=out, overwrite=overwrite
    )
    if main:
        show.prune_summary(result)


@app.command()
@with_options(ScoreOptions)
def score(
    options: ScoreOptions,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Scores file (JSON) to write (required).")
    ] = None,
    model: ModelOpt = None,
    old_out: OldOutOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --json if it exists (written atomically when done).")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score every block and every contiguous span; `prune --scores FILE` reuses them for any N.

    --method shortgpt, angular or angular-mean adds the cosine statistics those read; --method sleb or
    ppl-oneshot adds the forward passes those need.

    Example: miprun score --json scores.json && miprun prune --scores scores.json -n 4 --out out/p4

    Example: miprun score --method sleb --max-blocks 6 --json sleb.json

    Example (70B on one GPU): miprun score --model ./llama-70b --sequential --device cuda --json s.json
    """
    from miprun import api
    from miprun.atomic import check_file_output
    from miprun.options import with_overrides

    out, flag = json_path(console, json_file, old_out, "score")
    if out is None:
        raise typer.BadParameter("give the scores file to write: --json FILE", param_hint="--json")
    inputs = (model, options.calibration.source)
    # before any work, so a long run never ends in a refusal
    check_file_output(out, overwrite, inputs=inputs, flag=flag)
    main = _main_process()
    setup_logging(console, quiet or not main)
    result = api.score(model, with_overrides(options, progress=not quiet))
    if not main:  # every process holds the same merged result; the main one writes it
        return
    result.write(out)
    show.block_scores(result)
    show.out.print(f"scores written to {out}")


@app.command("eval")
@with_options(EvaluateOptions)
def eval_command(
    options: EvaluateOptions,
    model: ModelOpt = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    old_out: OldOutOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --json if it exists.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Held-out perplexity and zero-shot accuracy (acc, acc_norm through lm-evaluation-harness).

    Example: miprun eval --model out/smollm2-pruned --tasks social_iqa,next_sentence --limit 200 --json eval.json
    """
    from miprun.atomic import check_file_output, write_json
    from miprun.evaluation.evaluate import evaluate
    from miprun.options import with_overrides

    out, flag = json_path(console, json_file, old_out, "eval")
    if out is not None:
        check_file_output(out, overwrite, inputs=(model, *options.ppl, options.task_text), flag=flag)
    setup_logging(console, quiet)
    result = evaluate(model, with_overrides(options, progress=not quiet))
    show.evaluation(result)
    if out is not None:
        write_json(out, result)
        show.out.print(f"results written to {out}")


@app.command()
@with_options(BenchOptions)
def bench(
    options: BenchOptions,
    model: ModelOpt = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    old_out: OldOutOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --json if it exists.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prefill latency, decode throughput, memory and size; with --against, pruned/dense ratios.

    Example: miprun bench --model out/smollm2-pruned --against smollm2-135m --json bench.json
    """
    from miprun.atomic import check_file_output, write_json
    from miprun.evaluation.bench import bench as run_bench
    from miprun.options import with_overrides

    out, flag = json_path(console, json_file, old_out, "bench")
    if out is not None:
        check_file_output(out, overwrite, inputs=(model, options.against), flag=flag)
    setup_logging(console, quiet)
    result = run_bench(model, with_overrides(options, progress=not quiet))
    show.bench(result, options.config)
    if out is not None:
        write_json(out, result)
        show.out.print(f"results written to {out}")


@app.command()
@with_options(CompareOptions)
def compare(
    options: CompareOptions,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for comparison.md/.json and plots.")],
    model: ModelOpt = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Replace only these methods' rows in the comparison already in --out (same model, data "
            "and tasks); keep the other rows.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace --out if it is an earlier comparison (or empty); never anything else. The old "
            "output stays until the new one is complete.",
        ),
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune with every method at every N on the same data; evaluate (and repair); write a table and plots.

    Example (about ten minutes on 2 CPU cores):
    miprun compare -n 3 -n 6 --methods mi-prun,shortgpt,angular,sleb --samples 16 --seq-len 128 --out out/cmp
    """
    from miprun.options import with_overrides
    from miprun.pipeline.compare import run

    setup_logging(console, quiet)
    opts = with_overrides(options, progress=not quiet)
    paths = run(model, out, opts, update_existing=update, overwrite=overwrite)
    show.out.print((Path(out) / "comparison.md").read_text(encoding="utf-8"))
    for path in paths:
        show.out.print(f"wrote {path}")


@app.command()
@with_options(HealOptions)
def heal(
    options: HealOptions,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="A `miprun prune` output folder (the student).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the healed model.")],
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Distil a pruned model toward its dense parent (LoRA, merged back): a stock checkpoint of the same shape.

    Checkpoints go beside --out (or to --work-dir); rerunning the same command resumes after an interruption.

    Example: miprun prune -n 6 --out out/p6 && miprun heal --model out/p6 --out out/p6-healed --eval

    Several GPUs (Trainer under accelerate; --batch-size is the global batch):
    accelerate launch --multi_gpu --num_processes 4 -m miprun heal --model out/p6 --out out/p6-healed --bf16
    """
    from miprun import api
    from miprun.options import with_overrides

    setup_logging(console, quiet)
    from miprun.capture import distributed

    result = api.heal(model, with_overrides(options, progress=not quiet), out=out, overwrite=overwrite)
    if distributed.is_main():  # under accelerate launch, one summary
        show.heal_summary(result)


@app.command("show")
def show_command(
    folder: Annotated[
        Path,
        typer.Argument(help="A folder `miprun prune` or `miprun heal` wrote, or the miprun.json in it."),
    ],
    quiet: QuietOpt = False,  # accepted like every command's; show prints only its result anyway
    debug: DebugOpt = False,
) -> None:
    """Show what a saved run did, read from its miprun.json: the blocks removed, the method and repair, the
    calibration, the held-out perplexities, the time of each phase, the search's candidates, finalists and
    cost, and the heal when one ran. Loads no model.

    Example: miprun show out/demo
    """
    from miprun.output.manifest import MANIFEST_NAME, PrunePlan

    plan = PrunePlan.read(folder / MANIFEST_NAME if folder.is_dir() else folder)
    show.plan_summary(plan)
    if plan.heal is not None:
        show.heal_record(plan)


@app.command("list")
def list_command(
    what: Annotated[
        Literal["methods", "estimators", "repairs", "tasks", "texts"], typer.Argument(help="What to list.")
    ] = "methods",
) -> None:
    """What can be chosen by name, with each one's parameters and defaults (texts: the built-in --calib names).

    Example: miprun list estimators
    """
    show.registry(what)


INTERRUPTED = (
    "miprun: interrupted ({why}); the output holds its previous content or the complete new output, "
    "never a partial one"
)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors with a non-zero exit, tracebacks only with --debug.

    SIGTERM and SIGHUP (``timeout``, Slurm, ``docker stop``) stop a run the way Ctrl-C does: the same
    cleanup runs, and the exit code is 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM).
    """
    from miprun.signals import Interrupted, interrupts_as_keyboard_interrupt

    args = sys.argv[1:] if argv is None else argv
    if "--help" in args:  # the plugins' own summaries, listed only when asked for
        from miprun.cli.params import describe_plugins

        describe_plugins(app)
    try:
        with interrupts_as_keyboard_interrupt() as caught, libraries_restored():
            # typer turns a KeyboardInterrupt inside a command into a returned 130, not an exception
            code = app(args=args, prog_name="miprun", standalone_mode=False)
        if code == 130:
            signum = caught.signum
            why = "Ctrl-C" if signum is None else f"stopped by {signal.Signals(signum).name}"
            console.print(INTERRUPTED.format(why=why))
            return 130 if signum is None else 128 + signum
        if isinstance(code, int) and code:  # e.g. completion asked for a shell it does not know
            return code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:  # shell completion (--show-completion, _MIPRUN_COMPLETE) ends with sys.exit
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except typer.TyperException as exc:  # a command-line mistake: typer prints the usage line and why
        show_error = getattr(exc, "show", None)
        if show_error is not None:
            show_error()
        else:
            console.print(f"miprun: error: {exc.format_message()}", markup=False, highlight=False)
        return int(exc.exit_code)
    except Interrupted as exc:
        console.print(INTERRUPTED.format(why=str(exc)))
        return 128 + exc.signum
    except (KeyboardInterrupt, typer.Abort):
        console.print(INTERRUPTED.format(why="Ctrl-C"))
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
