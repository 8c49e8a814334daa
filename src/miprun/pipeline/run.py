"""One run: a loaded model, the settings its stages share, and the stages themselves.

    load -> capture (scores, evidence) -> select -> repair -> cut -> evaluate -> save

``prune`` puts one :class:`Variant` through every stage once (:mod:`miprun.pipeline.prune`); ``compare``
puts every variant through scoring and selection, then measures each choice in place
(:mod:`miprun.pipeline.compare`). Both build their variants from the same option groups, so every method,
estimator and repair setting means the same in either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from miprun.data import source_of
from miprun.estimators import Estimator
from miprun.evaluation.heldout import HeldoutText, heldout_text
from miprun.methods import Evidence, Method, SearchInfo
from miprun.methods import run as choose_blocks
from miprun.model.identity import ModelInfo
from miprun.model.loading import LoadedModel, as_loaded, check_seq_len
from miprun.model.perplexity import perplexity
from miprun.model.placement import input_device
from miprun.model.surgery import remove_blocks
from miprun.options import HeldoutOptions, RepairOptions, ScoringOptions
from miprun.pipeline.repairing import RepairHook, attach_live, repair_model
from miprun.pipeline.scoring import check_scores_match, evidence_of, score_model
from miprun.pipeline.setup import (
    RunSettings,
    estimator_of,
    method_of,
    model_info,
    repair_of,
    timed,
)
from miprun.repair import Repair, RepairRecord
from miprun.scores import ScoreResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One way to prune: a method with its parameters, the estimator it reads MI with, and a repair."""

    method: Method
    estimator: Estimator
    repair: Repair

    @classmethod
    def of(cls, scoring: ScoringOptions, repair: RepairOptions) -> Variant:
        """The variant the options name (an unknown name or parameter fails here, before any work)."""
        return cls(method_of(scoring), estimator_of(scoring.estimation), repair_of(repair))

    @property
    def mi_estimator(self) -> Estimator | None:
        """The estimator when the method reads MI; a baseline captures no MI statistics."""
        return self.estimator if self.method.uses_mi else None


@dataclass
class Selection:
    """The blocks a variant chose (0-based, sorted) and how the choice went."""

    removed: list[int]
    search: SearchInfo


class Run:
    """A loaded model and the settings every stage of one run shares (data, device, timings)."""

    def __init__(self, loaded: LoadedModel, settings: RunSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.hook: RepairHook | None = None  # the repair a live method measured its candidates through
        self.info: ModelInfo = model_info(loaded)  # an unsupported architecture fails here

    @classmethod
    def load(
        cls,
        model: str | LoadedModel | None,
        settings: RunSettings,
        *,
        layerwise: bool,
        revision: str | None = None,
    ) -> Run:
        """Load ``model`` (kept on the CPU for a ``layerwise`` capture; a hub model at ``revision``) and check
        its architecture."""
        with timed(settings.timings, "load_model"):
            return cls(as_loaded(model, settings.runtime, layerwise, revision), settings)

    @property
    def num_blocks(self) -> int:
        return self.info.num_blocks

    @property
    def timings(self) -> dict[str, float]:
        return self.settings.timings

    def reaching(self, max_blocks: int) -> Run:
        """This run with evidence that serves every N up to ``max_blocks`` (SLEB's path, live evidence)."""
        self.settings = replace(self.settings, max_blocks=max_blocks)
        return self

    # ------------------------------------------------------------------------- capture and select

    def scores(
        self, variant: Variant, given: ScoreResult | str | Path | None = None, *, mi: bool = False
    ) -> ScoreResult:
        """Fresh (or cached) scores for the variant's method, or ``given`` ones checked against this model.

        ``mi`` scores blocks and spans by MI whatever the method (``miprun score``: a file for any method).
        """
        if given is None:
            estimator = variant.estimator if mi else variant.mi_estimator
            return score_model(self.loaded, variant.method, estimator, self.settings)
        result = given if isinstance(given, ScoreResult) else ScoreResult.read(given)
        check_scores_match(result, self.info, self.settings.calibration.source)
        log.info("reusing the given scores: no calibration pass")
        # what measures or repairs with the model from here on reads the windows the scores were made on
        made, cal = result.calibration, self.settings.calibration
        self.settings.calibration = replace(
            cal,
            source=cal.source or source_of(made.source),
            samples=made.num_windows,
            seq_len=made.seq_len,
            seed=made.seed,
            exclude_first_token=made.exclude_first_token,
        )
        for phase, seconds in result.timings.items():
            self.timings.setdefault(phase, seconds)
        return result

    def evidence(self, variant: Variant, scores: ScoreResult) -> Evidence:
        """What the method reads: the scores' evidence, plus live evidence measured after the variant's repair."""
        evidence = evidence_of(scores)
        if variant.method.live_keys:
            with timed(self.timings, "live_evidence"):
                self.hook = attach_live(self.loaded, variant.method, evidence, variant.repair, self.settings)
        return evidence

    def select(self, variant: Variant, evidence: Evidence, n: int) -> Selection:
        """The variant's method's ``n`` blocks (seeded by the calibration seed)."""
        removed, search = choose_blocks(variant.method, evidence, n, self.settings.calibration.seed)
        return Selection(removed, search)

    # ------------------------------------------------------------------------- repair, cut, evaluate

    def repair(self, repair: Repair, removed: list[int]) -> RepairRecord:
        """Fit ``repair`` for ``removed`` and fold it into the kept weights for good (from the statistics a
        live method's verification already captured for this set, when it did)."""
        with timed(self.timings, "repair"):
            return repair_model(self.loaded, repair, removed, self.settings, self.hook)

    def cut(self, removed: list[int]) -> None:
        """Remove the blocks for good (renumbering the rest)."""
        with timed(self.timings, "surgery"):
            remove_blocks(self.loaded.model, removed)

    def heldout(self, options: HeldoutOptions) -> HeldoutText:
        """The held-out windows perplexity is measured on (disjoint from the calibration text)."""
        return heldout_for(self.loaded, options)

    def perplexity(self, windows: torch.Tensor) -> float:
        """Held-out perplexity of the model as it is now."""
        return model_perplexity(self.loaded, windows, self.settings.progress)


def heldout_for(loaded: LoadedModel, options: HeldoutOptions) -> HeldoutText:
    """The held-out windows of ``options`` for ``loaded`` (a window longer than the model's positions fails)."""
    check_seq_len(loaded, options.eval_seq_len, "--eval-seq-len")
    return heldout_text(loaded.tokenizer, options.eval_source, options.eval_seq_len, options.eval_samples)


def model_perplexity(loaded: LoadedModel, windows: torch.Tensor, progress: bool = False) -> float:
    """Perplexity of ``loaded`` on ``windows``, fed on the device its embeddings live on."""
    return perplexity(loaded.model, windows, device=input_device(loaded.model), progress=progress)


def inputs_of(*values: Any) -> tuple[Path, ...]:
    """Files and folders among ``values`` that a run reads, which an output folder must neither be nor contain."""
    found = []
    for value in values:
        if isinstance(value, (str, Path)) and Path(value).expanduser().exists():
            found.append(Path(value).expanduser())
    return tuple(found)
