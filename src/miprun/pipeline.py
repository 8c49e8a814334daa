"""The stages of a pruning run, each a small function the API composes:

    windows -> capture (what the estimator, the method and the repair ask for) -> scores / evidence
            -> select -> repair -> surgery -> save (checkpoint, manifest, report)

Nothing here parses options or prints: :mod:`miprun.api` decides what runs, :mod:`miprun.cli` shows it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from miprun import estimators, methods, repair
from miprun.capture import distributed
from miprun.capture.engine import capture
from miprun.capture.sequential import capture_sequential
from miprun.capture.statistic import CapturedStats, Statistic
from miprun.data import TextSource, load_text, token_windows
from miprun.errors import InvalidOptionError, InvalidTypeError, ScoresError
from miprun.estimators import Estimator
from miprun.methods import Evidence, GatherContext, Method
from miprun.model.identity import model_fingerprint, tensor_fingerprint
from miprun.model.layouts import layout_for, max_positions, num_blocks
from miprun.model.loading import LoadedModel, resolve_device
from miprun.options import (
    CalibrationConfig,
    EstimatorOptions,
    RepairOptions,
    RuntimeOptions,
    ScoringOptions,
    groups,
)
from miprun.repair import Repair, RepairContext, RepairRecord
from miprun.scores import CalibrationInfo, ScoreResult, ScoreTable
from miprun.scores import cache as scores_cache

log = logging.getLogger(__name__)


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[phase]`` (seconds, 3 decimals)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = round(timings.get(phase, 0.0) + time.perf_counter() - start, 3)


@dataclass
class RunSettings:
    """What every stage of one run shares: the data, where it runs, and what to reuse."""

    calibration: CalibrationConfig
    runtime: RuntimeOptions
    progress: bool = True
    cache: bool = True
    sequential: bool = False  # calibrate one decoder layer at a time
    max_blocks: int = 1  # the largest N that N-dependent evidence (SLEB's path) must serve
    all_spans: bool = False  # score every span, not only those the method asks for
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- named parts of a run


def method_of(scoring: ScoringOptions) -> Method:
    """The method the options name, with its parameters (``k`` goes to methods that take one)."""
    cls = methods.REGISTRY.get(scoring.method)
    params = dict(scoring.method_params)
    if "k" in {f.name for f in dataclasses.fields(cls)}:
        params.setdefault("k", scoring.k)
    return methods.build(scoring.method, params)


def estimator_of(estimation: EstimatorOptions) -> Estimator:
    return estimators.build(estimation.estimator, estimation.estimator_params)


def repair_of(options: RepairOptions) -> Repair:
    return repair.build(options.repair, options.repair_params)


def repair_with(name: str, params: dict[str, Any]) -> Repair:
    """The repair ``name`` with those of ``params`` it has (one --repair-opt set serves several repairs)."""
    fields = {f.name for f in dataclasses.fields(repair.REGISTRY.get(name))}
    return repair.build(name, {k: v for k, v in params.items() if k in fields})


def check(options: Any) -> None:
    """Build every named part an options object names (method, estimator, repairs) so that an unknown name
    or a bad parameter fails before any work, with the registry's "did you mean"."""
    for value in _walk(options):
        if isinstance(value, ScoringOptions):
            method_of(value)
        elif isinstance(value, EstimatorOptions):
            estimator_of(value)
        elif isinstance(value, RepairOptions):
            repair_of(value)
    for name in getattr(options, "methods", []):
        methods.build(name)
    names = getattr(options, "repairs", [])
    for name in names:
        repair_with(name, getattr(options, "repair_params", {}))
    known = {f.name for name in names for f in dataclasses.fields(repair.REGISTRY.get(name))}
    unused = sorted(set(getattr(options, "repair_params", {}) if names else ()) - known)
    if unused:
        raise InvalidOptionError(
            f"no repair among {', '.join(names)} has the parameter(s) {', '.join(unused)}"
        )


def _walk(options: Any) -> Iterator[Any]:
    """An options object and every option group nested in it."""
    yield options
    for _, group in groups(options):
        yield from _walk(group)


# ----------------------------------------------------------------------------- budget and identity


def blocks_to_remove(total: int, num_blocks: int | None, ratio: float | None) -> int:
    """N from ``num_blocks`` or ``ratio`` (N = ceil(T * ratio)), checked against the model's ``total`` blocks."""
    if (num_blocks is None) == (ratio is None):
        got = "neither" if num_blocks is None else f"both: {num_blocks} and {ratio}"
        raise InvalidOptionError(
            f"give exactly one of num_blocks (--num-blocks N) or ratio (--ratio R), got {got}; "
            "e.g. --num-blocks 3 or --ratio 0.2"
        )
    if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int)):
        raise InvalidTypeError(f"num_blocks (--num-blocks) must be an int, got {num_blocks!r}")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise InvalidOptionError(
            f"ratio (--ratio) must be strictly between 0 and 1, got {ratio}; "
            "e.g. 0.2 removes ceil(0.2 * T) of the model's T blocks"
        )
    if total < 2:
        raise InvalidOptionError(
            f"the model has {total} decoder block(s): depth pruning needs at least 2, to remove one and keep one"
        )
    n = math.ceil(total * ratio) if ratio is not None else num_blocks
    assert n is not None
    if not 0 < n < total:
        how = f"ratio {ratio} gives ceil({total} * {ratio}) = {n}" if ratio is not None else f"got {n}"
        raise InvalidOptionError(
            f"can remove between 1 and {total - 1} of the model's {total} blocks ({how}); "
            f"pass --num-blocks between 1 and {total - 1} or a smaller --ratio"
        )
    return n


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """Identity of a loaded model for manifests and scores files."""
    config = loaded.model.config
    layout_for(config)  # an unsupported architecture fails here, before any forward pass
    return {
        "name": loaded.name,
        "path": loaded.path,
        "model_type": config.model_type,
        "num_blocks": num_blocks(loaded.model),
        "fingerprint": model_fingerprint(loaded.model),
    }


# ----------------------------------------------------------------------------- windows and capture


def check_seq_len(loaded: LoadedModel, seq_len: int, flag: str) -> None:
    """Refuse windows longer than the model's positions, before any text is read."""
    limit = max_positions(loaded.model)
    if limit is not None and seq_len > limit:
        raise InvalidOptionError(
            f"{flag} {seq_len} is longer than the {limit} positions {loaded.name} was built for; "
            f"use {flag} {limit} or less"
        )


def calibration_windows(loaded: LoadedModel, cal: CalibrationConfig) -> tuple[TextSource, torch.Tensor]:
    """The calibration text and the token windows drawn from it."""
    check_seq_len(loaded, cal.seq_len, "--seq-len")
    text = load_text(cal.source, "calibration")
    return text, token_windows(loaded.tokenizer, text, cal.samples, cal.seq_len, cal.seed)


def calibration_info(
    text: TextSource, windows: torch.Tensor, cal: CalibrationConfig, tokens: int
) -> CalibrationInfo:
    return CalibrationInfo(
        source=text.name,
        fingerprint=text.fingerprint,
        windows_fingerprint=tensor_fingerprint(windows),
        num_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seed=cal.seed,
        tokens=tokens,
        exclude_first_token=cal.exclude_first_token,
    )


def capture_pass(
    loaded: LoadedModel, windows: torch.Tensor, requests: list[Statistic], run: RunSettings
) -> CapturedStats:
    """One calibration pass for ``requests``: whole-model or layer by layer, on this process's share, merged."""
    share = distributed.share(len(windows))
    cal, progress = run.calibration, run.progress
    if run.sequential:
        device = resolve_device(run.runtime.device)
        stats = capture_sequential(
            loaded.model, windows, requests, cal, device=device, share=share, progress=progress
        )
    else:
        stats = capture(loaded.model, windows, requests, cal, share=share, progress=progress)
    return distributed.merge_stats(stats)


def gather(
    loaded: LoadedModel, windows: torch.Tensor, method: Method, estimator: Estimator | None, run: RunSettings
) -> tuple[Evidence, CapturedStats, dict[str, float]]:
    """Capture what ``method`` (and ``estimator``, for MI) reads, then let the method measure the rest."""
    cal, progress = run.calibration, run.progress
    timings: dict[str, float] = {}
    requests = [*(estimator.statistics() if estimator is not None else []), *method.statistics()]
    with timed(timings, "capture"):
        stats = capture_pass(loaded, windows, requests, run)
    evidence = Evidence(num_blocks=stats.num_blocks)
    if estimator is not None:
        evidence.table = ScoreTable(num_blocks=stats.num_blocks, estimator=estimator, stats=stats)
        with timed(timings, "block_scores"):
            evidence.table.block_nmi()
        if run.all_spans:
            with timed(timings, "span_scores"):
                evidence.table.fill_all(progress=progress)
    ctx = GatherContext(loaded.model, windows, stats, cal.batch_size, run.max_blocks, progress)
    start = time.perf_counter()
    evidence.extras = method.gather(ctx)
    if method.evidence_keys and not method.statistics():
        timings["method_forward_passes"] = round(time.perf_counter() - start, 3)
    return evidence, stats, timings


def score_model(
    loaded: LoadedModel, method: Method, estimator: Estimator | None, run: RunSettings
) -> ScoreResult:
    """Scores and evidence for ``method`` on ``loaded``: from the cache when allowed and present, else measured.

    Phase times are added to ``run.timings``.
    """
    timings = run.timings
    info = model_info(loaded)
    with timed(timings, "calibration_data"):
        text, windows = calibration_windows(loaded, run.calibration)
    key = None
    if run.cache and not distributed.is_distributed():
        key = _cache_key(loaded, info, text, windows, method, estimator, run)
        hit = scores_cache.read(key, info["num_blocks"])
        if hit is not None:
            hit.model, hit.timings = info, timings  # this run's: loading and tokenizing only
            return hit
    spans = run.all_spans or key is not None  # a cached result must serve any N and method
    evidence, stats, measured = gather(loaded, windows, method, estimator, replace(run, all_spans=spans))
    timings.update(measured)
    result = ScoreResult(
        calibration=calibration_info(text, windows, run.calibration, stats.num_tokens),
        model=info,
        table=evidence.table,
        estimator=estimator,
        evidence=evidence.extras,
        timings=timings,
    )
    if key is not None:
        scores_cache.write(key, result)
    return result


def _cache_key(
    loaded: LoadedModel,
    info: dict[str, Any],
    text: TextSource,
    windows: torch.Tensor,
    method: Method,
    estimator: Estimator | None,
    run: RunSettings,
) -> str:
    """Everything a scoring run's result depends on (every CalibrationConfig field but the text's name)."""
    cal = {k: v for k, v in asdict(run.calibration).items() if k != "source"}
    scoring = {
        "estimator": estimator.params() if estimator is not None else None,
        "evidence": list(method.evidence_keys),
        "method_statistics": [list(map(str, s.config())) for s in method.statistics()],
        "max_blocks": run.max_blocks if method.n_dependent else None,
        "calibration": cal,
    }
    param = next(loaded.model.parameters())
    return scores_cache.cache_key(
        scores_cache.settings_for(info["fingerprint"], param, text.fingerprint, windows, scoring)
    )


def evidence_of(result: ScoreResult) -> Evidence:
    """The evidence a method reads, from a scoring result (live or read from a file)."""
    return Evidence(num_blocks=result.num_blocks, table=result.table, extras=dict(result.evidence))


def check_scores_match(scores: ScoreResult, info: dict[str, Any], source: str | None) -> None:
    """Refuse scores made for another model or (when ``source`` is given) other calibration text."""
    if scores.model.get("fingerprint") != info["fingerprint"]:
        raise ScoresError(
            f"the scores file was made for model {scores.model.get('name')!r} "
            f"(fingerprint {scores.model.get('fingerprint')}), not for {info['name']!r} "
            f"(fingerprint {info['fingerprint']}); re-run `miprun score` for this model"
        )
    if source is not None:
        text = load_text(source, "calibration")
        if text.fingerprint != scores.calibration.fingerprint:
            raise ScoresError(
                f"the scores file was computed on calibration text {scores.calibration.source!r} "
                f"(fingerprint {scores.calibration.fingerprint}), but --calib {source!r} holds other text "
                f"(fingerprint {text.fingerprint}); drop --calib or re-run `miprun score --calib {source}`"
            )


# ----------------------------------------------------------------------------- repair


def fit_repair(
    loaded: LoadedModel, repair: Repair, removed: list[int], run: RunSettings
) -> tuple[dict[str, torch.Tensor], RepairRecord]:
    """Fit ``repair`` for ``removed`` on the dense model (one extra calibration pass if it needs statistics)."""
    start = time.perf_counter()
    requests = repair.statistics(loaded.model, removed)
    stats = windows = None
    if requests:
        fit_run = replace(run, calibration=repair.calibration(run.calibration))
        _, windows = calibration_windows(loaded, fit_run.calibration)
        stats = capture_pass(loaded, windows, requests, fit_run)
    edits, record = repair.fit(RepairContext(loaded.model, removed, stats, windows, run.progress))
    record.seconds = round(time.perf_counter() - start, 3)
    return edits, record


def repair_model(loaded: LoadedModel, repair: Repair, removed: list[int], run: RunSettings) -> RepairRecord:
    """Fit ``repair`` for ``removed`` and fold it into the weights for good (surgery comes after)."""
    edits, record = fit_repair(loaded, repair, removed, run)
    repair.apply(loaded.model, edits)
    return record


class RepairHook:
    """Lets a method measure candidate sets after the run's repair: one extra pass captures what every
    candidate's repair reads, then each candidate's edits are fitted from it."""

    def __init__(self, loaded: LoadedModel, repair: Repair, run: RunSettings) -> None:
        self.loaded, self.repair = loaded, repair
        self.run = replace(run, calibration=repair.calibration(run.calibration))
        self.stats: CapturedStats | None = None
        self.windows: torch.Tensor | None = None

    def prepare(self, sets: list[list[int]]) -> None:
        requests = [stat for removed in sets for stat in self.repair.statistics(self.loaded.model, removed)]
        if requests:
            _, self.windows = calibration_windows(self.loaded, self.run.calibration)
            self.stats = capture_pass(self.loaded, self.windows, requests, self.run)

    def edits(self, removed: list[int]) -> dict[str, torch.Tensor]:
        ctx = RepairContext(self.loaded.model, removed, self.stats, self.windows, False)
        return self.repair.fit(ctx)[0]


def attach_live(
    loaded: LoadedModel, method: Method, evidence: Evidence, repair: Repair | None, run: RunSettings
) -> None:
    """Add a method's live evidence (it measures with the model at choice time) to ``evidence``."""
    if not method.live_keys:
        return
    _, windows = calibration_windows(loaded, run.calibration)
    hook = RepairHook(loaded, repair, run) if repair is not None and repair.name != "none" else None
    ctx = GatherContext(
        loaded.model, windows, None, run.calibration.batch_size, run.max_blocks, run.progress, hook
    )
    evidence.extras.update(method.attach(ctx))


@contextmanager
def repaired(
    loaded: LoadedModel, repair: Repair, removed: list[int], run: RunSettings
) -> Iterator[RepairRecord]:
    """Inside the ``with`` block the model carries ``repair``'s edits for ``removed``; afterwards the originals."""
    edits, record = fit_repair(loaded, repair, removed, run)
    params = dict(loaded.model.named_parameters())
    saved = {name: params[name].detach().clone() for name in edits}
    repair.apply(loaded.model, edits)
    try:
        yield record
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
