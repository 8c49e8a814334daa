"""The repair stage: fit a repair on the dense model (one extra pass when it reads statistics) and fold it in,
or fit it for each of a method's candidate sets."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from miprun.capture.statistic import CapturedStats
from miprun.data import available_windows, load_text
from miprun.errors import DataError
from miprun.methods import Evidence, GatherContext, Method
from miprun.model.loading import LoadedModel
from miprun.pipeline.scoring import calibration_windows, capture_pass
from miprun.pipeline.setup import RunSettings
from miprun.repair import Repair, RepairContext, RepairRecord

log = logging.getLogger(__name__)


def fit_repair(
    loaded: LoadedModel, repair: Repair, removed: list[int], run: RunSettings
) -> tuple[dict[str, torch.Tensor], RepairRecord]:
    """Fit ``repair`` for ``removed`` on the dense model (one extra calibration pass if it needs statistics)."""
    start = time.perf_counter()
    requests = repair.statistics(loaded.model, removed)
    stats = windows = check = None
    fit_run = replace(run, calibration=repair.calibration(run.calibration))
    if requests:
        drawn = repair_windows(loaded, repair, fit_run)
        windows, check = repair.split(drawn)
        stats = capture_pass(loaded, windows, requests, fit_run)
    context = RepairContext(
        loaded.model, removed, stats, windows, run.progress, check, calibration=fit_run.calibration
    )
    edits, record = repair.fit(context)
    record.seconds = round(time.perf_counter() - start, 3)
    return edits, record


def repair_windows(loaded: LoadedModel, repair: Repair, fit_run: RunSettings) -> torch.Tensor:
    """The windows of a repair's own calibration pass: as many as it asks for, or every window of a shorter
    text (said in the log; the repair's record gives the tokens it read)."""
    cal = fit_run.calibration
    held = available_windows(loaded.tokenizer, load_text(cal.source, "calibration"), cal.seq_len)
    if 0 < held < cal.samples:
        log.warning(
            "the %s repair reads up to %d windows of %d tokens; the calibration text holds %d, so it fits on "
            "those (%d tokens; a larger --calib gives it more)",
            repair.name,
            cal.samples,
            cal.seq_len,
            held,
            held * cal.seq_len,
        )
        fit_run = replace(fit_run, calibration=replace(cal, samples=held))
    try:
        return calibration_windows(loaded, fit_run.calibration)[1]
    except DataError as err:
        raise DataError(
            f"the {repair.name} repair reads {fit_run.calibration.samples} windows of its own: {err} For the "
            "repair, lower its tokens (--repair-opt tokens=N, or tokens=0 for the scoring windows) or pass a "
            "larger --calib."
        ) from err


def repair_model(
    loaded: LoadedModel,
    repair: Repair,
    removed: list[int],
    run: RunSettings,
    hook: RepairHook | None = None,
) -> RepairRecord:
    """Fit ``repair`` for ``removed`` and fold it into the weights for good (surgery comes after); from the
    statistics ``hook`` already captured for this set when it did (a method that measured its candidates
    after the repair), saving the repair's own pass."""
    if hook is not None and hook.repair is repair and hook.covers(removed):
        start = time.perf_counter()
        edits, record = hook.fit(removed, run.progress)
        record.seconds = round(time.perf_counter() - start, 3)
    else:
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
        self.check: torch.Tensor | None = None
        self.fitted: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # trial edits since the last capture

    def prepare(self, sets: list[list[int]]) -> None:
        """Capture what the repair of every set in ``sets`` reads, unless the last capture already holds it
        (a search that measures a few sets again on more tokens pays no second pass)."""
        if all(self.covers(removed) for removed in sets):
            return
        requests = [stat for removed in sets for stat in self.repair.statistics(self.loaded.model, removed)]
        drawn = repair_windows(self.loaded, self.repair, self.run)
        self.windows, self.check = self.repair.split(drawn)
        self.stats = capture_pass(self.loaded, self.windows, requests, self.run)
        self.fitted.clear()

    def fit(self, removed: list[int], progress: bool = False) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        """The repair's edits for ``removed`` and its record, from the statistics :meth:`prepare` captured."""
        tokens = self.stats.num_tokens if self.stats is not None else 0
        context = RepairContext(
            self.loaded.model, removed, self.stats, self.windows, progress, self.check, self.run.calibration
        )
        edits, record = self.repair.fit(context)
        record.tokens = tokens
        return edits, record

    def edits(self, removed: list[int]) -> dict[str, torch.Tensor]:
        """The edits for ``removed``, as :meth:`fit` gives them."""
        return self.fit(removed)[0]

    def trial(self, removed: list[int]) -> dict[str, torch.Tensor]:
        """The edits a method measures ``removed`` with: fitted once per capture, without the guard's passes over
        held-out windows (the measurement after the repair is the check; they would cost a few full passes per
        set). The chosen set's repair is fitted with the guard, as any."""
        key = tuple(removed)
        if key not in self.fitted:
            context = RepairContext(
                self.loaded.model, removed, self.stats, self.windows, False, None, measuring=True
            )
            self.fitted[key] = self.repair.fit(context)[0]
        return self.fitted[key]

    def covers(self, removed: list[int]) -> bool:
        """Whether :meth:`prepare` captured everything the repair of ``removed`` reads."""
        requests = self.repair.statistics(self.loaded.model, removed)
        if not requests:
            return True
        return self.stats is not None and all(self.stats.find(want) is not None for want in requests)


def attach_live(
    loaded: LoadedModel, method: Method, evidence: Evidence, repair: Repair | None, run: RunSettings
) -> RepairHook | None:
    """Add a method's live evidence (it measures with the model at choice time) to ``evidence``; returns the
    repair hook it measures through (its statistics serve the chosen set's repair), if any."""
    if not method.live_keys:
        return None
    _, windows = calibration_windows(loaded, run.calibration)
    hook = RepairHook(loaded, repair, run) if repair is not None and repair.changes_weights else None
    ctx = GatherContext(
        loaded.model, windows, None, run.calibration.batch_size, run.max_blocks, run.progress, hook
    )
    evidence.extras.update(method.attach(ctx))
    return hook
