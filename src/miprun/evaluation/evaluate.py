"""Evaluate a (pruned) model: held-out perplexity and zero-shot multiple-choice accuracy.

Perplexity comes from :mod:`miprun.model.perplexity` on non-overlapping windows of the *evaluation* split of
each text source. Accuracy comes from the real lm-evaluation-harness, driven in-process on the loaded
model (``HFLM(pretrained=<model object>)``): the offline tasks of :mod:`miprun.evaluation.tasks` run anywhere; any
other name is passed to lm-eval as is and needs the Hugging Face Hub for its data.

import miprun.evaluation.evaluate as ev
result = ev.evaluate("out/pruned", tasks=["social_iqa", "next_sentence"], limit=200)
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from miprun.assets import HubUnreachableError, is_hub_unreachable
from miprun.data.sources import check_sources
from miprun.errors import InvalidOptionError, MissingDependencyError, UnknownNameError
from miprun.evaluation.heldout import heldout_windows, perplexity_record
from miprun.evaluation.tasks import OFFLINE_TASKS, write_tasks
from miprun.model.layouts import num_blocks
from miprun.model.loading import LoadedModel, as_loaded, check_revision, check_seq_len
from miprun.options import EvaluateOptions, with_overrides
from miprun.output.manifest import MANIFEST_NAME
from miprun.versions import package_versions

log = logging.getLogger(__name__)

PASS_THROUGH = "lm-eval:"  # forces a name to lm-eval's own task, e.g. lm-eval:social_iqa (needs the hub)
METRICS = ("acc", "acc_norm")


def perplexity_on(
    loaded: LoadedModel,
    source: str | None,
    *,
    seq_len: int = 256,
    max_windows: int | None = 64,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity on the first ``max_windows`` (all when None) windows of ``source``'s evaluation split."""
    text, windows = heldout_windows(loaded.tokenizer, source, seq_len, max_windows)
    return perplexity_record(loaded.model, text, windows, batch_size=batch_size, progress=progress)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise MissingDependencyError(
            "zero-shot tasks need lm-evaluation-harness: pip install 'miprun[eval]' (or pip install lm-eval)"
        ) from exc
    return lm_eval


@contextlib.contextmanager
def _quiet(logger: str, quiet: bool) -> Iterator[None]:
    """Raise ``logger`` to ERROR for the duration when ``quiet``."""
    target = logging.getLogger(logger)
    old = target.level
    if quiet:
        target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(old)


@contextlib.contextmanager
def _harness_quiet(quiet: bool) -> Iterator[None]:
    """lm-eval without what nobody asked for: the git hash of the working folder (its ``git describe`` prints
    "fatal: not a git repository" outside one); with ``quiet`` also its log lines, its bars and datasets'."""
    import importlib

    import datasets
    import lm_eval.evaluator

    with contextlib.ExitStack() as stack:
        stack.enter_context(_swapped(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        if quiet:
            stack.enter_context(_quiet("lm_eval", True))
            for name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
                module = importlib.import_module(name)  # each calls tqdm itself, deaf to any switch
                if hasattr(module, "tqdm"):
                    stack.enter_context(_swapped(module, "tqdm", _silent(module.tqdm)))
            if not datasets.utils.are_progress_bars_disabled():
                datasets.disable_progress_bars()  # "Generating test split"
                stack.callback(datasets.enable_progress_bars)
        yield


def _silent(bar: Any) -> Any:
    """``bar`` (a tqdm class) that never draws, whatever ``disable`` its caller passes."""
    return lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` for the duration."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _harness_results(raw: dict[str, Any], names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Our per-task record from lm-eval's output; ``names`` maps lm-eval task names to ours."""
    out: dict[str, dict[str, Any]] = {}
    for harness_name, ours in names.items():
        metrics = raw["results"][harness_name]
        entry: dict[str, Any] = {"harness_task": harness_name}
        for metric in METRICS:
            for key, field in ((f"{metric},none", metric), (f"{metric}_stderr,none", f"{metric}_stderr")):
                value = metrics.get(key)
                entry[field] = value if isinstance(value, (int, float)) else None
        samples = raw.get("n-samples", {}).get(harness_name, {})
        entry["examples"] = samples.get("effective")
        entry["available"] = samples.get("original")
        out[ours] = entry
    return out


def run_tasks(
    loaded: LoadedModel,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    task_text: str | None = None,
    progress: bool = False,
    built: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy (``acc``, ``acc_norm``) of the in-memory model on ``tasks`` with lm-eval.

    Args:
        tasks: offline task names (see :data:`miprun.evaluation.tasks.OFFLINE_TASKS`) or lm-eval task names.
        limit: the first ``limit`` examples of each task (all when None).
        seed: seed of the next-sentence task's distractors and answer positions.
        task_text: held-out text the next-sentence task is built from (default: novel).
        built: the folder :func:`write_tasks` already built the offline tasks in (else they are built here).
    """
    lm_eval = _lm_eval()
    check_tasks(tasks)  # a typo fails before any task runs
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    offline = [t for t in tasks if t in OFFLINE_TASKS]
    hub = [t.removeprefix(PASS_THROUGH) for t in tasks if t not in OFFLINE_TASKS]
    with _harness_quiet(not progress):
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        results: dict[str, dict[str, Any]] = {}
        if offline:
            folder = built or write_tasks(offline, source=task_text, seed=seed)
            manager = TaskManager(include_path=str(folder), include_defaults=False)  # no 10 s index scan
            names = {OFFLINE_TASKS[t].harness_name: t for t in offline}
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False
            )
            results.update(_harness_results(raw, names))
            for name in offline:
                results[name]["chance"] = OFFLINE_TASKS[name].chance
        if hub:
            try:
                raw = lm_eval.simple_evaluate(
                    model=lm, tasks=hub, task_manager=_default_manager(), limit=limit, log_samples=False
                )
            except Exception as exc:
                if is_hub_unreachable(exc):
                    raise HubUnreachableError(
                        f"lm-eval task(s) {', '.join(hub)} download their data from the Hugging Face Hub, "
                        f"which is unreachable from this machine ({type(exc).__name__}). miprun's offline "
                        f"tasks need no hub: {', '.join(OFFLINE_TASKS)}."
                    ) from exc
                raise
            results.update(_harness_results(raw, {t: t for t in hub}))
    return {t: results[t if t in OFFLINE_TASKS else t.removeprefix(PASS_THROUGH)] for t in tasks}


def check_tasks(tasks: Sequence[str]) -> None:
    """Refuse unknown task names (with "did you mean") before any model is loaded or any task runs."""
    hub = [t.removeprefix(PASS_THROUGH) for t in tasks if t not in OFFLINE_TASKS]
    if hub:
        _lm_eval()
        _check_known(hub, _default_manager().all_tasks)


@functools.cache
def _default_manager() -> Any:
    """lm-eval's TaskManager over its own tasks: indexing them takes about 10 s, so once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _check_known(names: Sequence[str], known: Sequence[str]) -> None:
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(dict.fromkeys([*OFFLINE_TASKS, *known])), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown task {name!r}.{hint} Offline tasks: {', '.join(OFFLINE_TASKS)}; "
                "or any lm-eval task name (`lm-eval ls tasks`; those need the hub for their data)."
            )


def _pruning(loaded: LoadedModel) -> dict[str, Any] | None:
    """What ``miprun.json`` beside the model says was removed, if the model came from a miprun folder."""
    if loaded.path is None or not (Path(loaded.path) / MANIFEST_NAME).is_file():
        return None
    from miprun.output.consistency import check_block_count, check_removed
    from miprun.ownership import read_manifest

    path = Path(loaded.path) / MANIFEST_NAME
    data = read_manifest(loaded.path)
    if data is None:  # a file of another tool under the same name
        return None
    check_removed(data.get("num_blocks_before"), data.get("removed"), path)
    check_block_count(data["num_blocks_before"], data["removed"], path, loaded.model)
    return {k: data.get(k) for k in ("removed", "num_blocks_before", "num_blocks_after")}


def check_something_to_measure(opts: EvaluateOptions) -> None:
    """Refuse an evaluation that would measure nothing (``--no-ppl`` without tasks, ``--ppl ','``)."""
    if opts.no_ppl and not opts.tasks:
        raise InvalidOptionError(
            "nothing to evaluate: --no-ppl skips perplexity and no --tasks were given; pass --tasks "
            "(e.g. --tasks social_iqa) or drop --no-ppl"
        )
    if not opts.no_ppl and not opts.ppl:
        raise InvalidOptionError(
            "ppl (--ppl) names no text; pass one or more texts (e.g. --ppl wiki,nyt), or --no-ppl with --tasks"
        )


def evaluate(
    model: str | LoadedModel | None = None, options: EvaluateOptions | None = None, **overrides: Any
) -> dict[str, Any]:
    """Perplexity on each text (evaluation split) and accuracy on each task, as one JSON-able dict.

    Args:
        model: a model folder (e.g. ``miprun prune --out``), embedded name, ``.gguf``, hub name or LoadedModel.
        options: :class:`~miprun.options.EvaluateOptions`; ``overrides`` replace fields by flat name
            (``tasks=["social_iqa"]``, ``limit=200``, ``ppl=["wiki", "nyt"]``, ``no_ppl=True``).
    """
    opts = with_overrides(options or EvaluateOptions(), **overrides)
    check_something_to_measure(opts)
    check_tasks(opts.tasks)
    check_revision(model, opts.revision)
    check_sources(*([] if opts.no_ppl else opts.ppl), *([opts.task_text] if opts.task_text else []))
    offline = [t for t in opts.tasks if t in OFFLINE_TASKS]  # built now: a text too short for one says so
    built = write_tasks(offline, source=opts.task_text, seed=opts.seed) if offline else None
    timings: dict[str, float] = {}
    start = time.perf_counter()
    loaded = as_loaded(model, opts.runtime, revision=opts.revision)
    timings["load_model"] = round(time.perf_counter() - start, 3)
    result: dict[str, Any] = {
        "model": {
            "name": loaded.name,
            "path": loaded.path,
            "num_blocks": num_blocks(loaded.model),
            "parameters": loaded.model.num_parameters(),
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "pruning": _pruning(loaded),
        },
        "perplexity": {},
        "tasks": {},
    }
    if not opts.no_ppl:
        check_seq_len(loaded, opts.ppl_seq_len, "--ppl-seq-len")
    start = time.perf_counter()
    windows = opts.ppl_windows or None
    for source in [] if opts.no_ppl else opts.ppl:
        result["perplexity"][source] = perplexity_on(
            loaded,
            source,
            seq_len=opts.ppl_seq_len,
            max_windows=windows,
            batch_size=opts.batch_size,
            progress=opts.progress,
        )
    timings["perplexity"] = round(time.perf_counter() - start, 3)
    if opts.tasks:
        start = time.perf_counter()
        result["tasks"] = run_tasks(
            loaded,
            opts.tasks,
            limit=opts.limit,
            batch_size=opts.batch_size,
            seed=opts.seed,
            task_text=opts.task_text,
            progress=opts.progress,
            built=built,
        )
        timings["tasks"] = round(time.perf_counter() - start, 3)
    result["settings"] = {
        "limit": opts.limit,
        "seed": opts.seed,
        "task_text": opts.task_text or "novel (evaluation split)",
    }
    result["versions"] = package_versions()
    result["timings"] = timings
    return result


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write an evaluation or benchmark result to ``path`` as strict, indented JSON, atomically (arguments in
    :func:`miprun.atomic.write_json`'s order); never over a file it was computed from or into a model folder it
    read."""
    from miprun.atomic import check_results_file
    from miprun.atomic import write_json as write

    models = [
        part.get("path") for part in (result.get("model"), result.get("dense")) if isinstance(part, dict)
    ]
    check_results_file(path, [*models, *(result.get("perplexity") or {})])
    write(path, result)
