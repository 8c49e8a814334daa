"""The scoring stages: calibration windows, the capture pass, the scores and evidence (cached), live evidence."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import torch

from miprun.capture import distributed
from miprun.capture.engine import capture
from miprun.capture.sequential import capture_sequential
from miprun.capture.statistic import CapturedStats, Statistic
from miprun.data import TextSource, load_text, token_windows
from miprun.errors import ScoresError
from miprun.estimators import Estimator
from miprun.methods import Evidence, GatherContext, Method
from miprun.model.identity import ModelInfo, tensor_fingerprint
from miprun.model.loading import LoadedModel, check_seq_len, resolve_device
from miprun.options import (
    CalibrationConfig,
)
from miprun.pipeline.setup import RunSettings, model_info, timed
from miprun.scores import CalibrationInfo, ScoreResult, ScoreTable
from miprun.scores import cache as scores_cache

log = logging.getLogger(__name__)


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
        owner = {"fingerprint": info.fingerprint, "windows_fingerprint": tensor_fingerprint(windows)}
        hit = scores_cache.read(key, info.num_blocks, owner)
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
    info: ModelInfo,
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
        scores_cache.settings_for(info.fingerprint, param, text.fingerprint, windows, scoring)
    )


def evidence_of(result: ScoreResult) -> Evidence:
    """The evidence a method reads, from a scoring result (live or read from a file)."""
    return Evidence(num_blocks=result.num_blocks, table=result.table, extras=dict(result.evidence))


def check_scores_match(scores: ScoreResult, info: ModelInfo, source: str | None) -> None:
    """Refuse scores made for another model or (when ``source`` is given) other calibration text."""
    if scores.model.fingerprint != info.fingerprint:
        raise ScoresError(
            f"the scores file was made for model {scores.model.name!r} "
            f"(fingerprint {scores.model.fingerprint}), not for {info.name!r} "
            f"(fingerprint {info.fingerprint}); re-run `miprun score` for this model"
        )
    if source is not None:
        text = load_text(source, "calibration")
        if text.fingerprint != scores.calibration.fingerprint:
            raise ScoresError(
                f"the scores file was computed on calibration text {scores.calibration.source!r} "
                f"(fingerprint {scores.calibration.fingerprint}), but --calib {source!r} holds other text "
                f"(fingerprint {text.fingerprint}); drop --calib or re-run `miprun score --calib {source}`"
            )
