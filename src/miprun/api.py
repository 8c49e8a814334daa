"""The Python API: ``score`` a model, ``select`` blocks, ``prune`` and save. The CLI is a thin layer on it.

import miprun
result = miprun.prune("smollm2-135m", num_blocks=3, out="out/smollm2-pruned")
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from miprun import estimators
from miprun.architectures import layout_for, num_blocks
from miprun.capture import capture
from miprun.checkpoint import check_output, write_steps
from miprun.data import eval_windows, load_text, token_windows
from miprun.estimators import Estimator
from miprun.identity import model_fingerprint, tensor_fingerprint
from miprun.loading import LoadedModel, load_model
from miprun.methods import DEFAULT_METHOD, check_method, run_method
from miprun.perplexity import perplexity
from miprun.plan import MANIFEST_NAME, CalibrationInfo, PrunePlan, SearchInfo
from miprun.scores import ScoreTable
from miprun.surgery import remove_blocks

log = logging.getLogger(__name__)

SCORES_KIND = "miprun-scores"


@dataclass
class CalibrationConfig:
    """How calibration windows are drawn. Defaults fit a 135M model on a 2-core laptop CPU."""

    source: str | None = None  # None: the built-in Wikipedia paragraphs
    samples: int = 32  # windows
    seq_len: int = 256  # tokens per window
    seed: int = 0
    batch_size: int = 4
    exclude_first_token: bool = False


@dataclass
class ScoreResult:
    """Scores of every block (and the spans computed so far) with what produced them."""

    table: ScoreTable
    estimator: Estimator
    calibration: CalibrationInfo
    model: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": SCORES_KIND,
            "model": self.model,
            "estimator": self.estimator.params(),
            "calibration": asdict(self.calibration),
            "scores": self.table.to_json(),
            "timings": self.timings,
        }

    def write(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> ScoreResult:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read scores file {path}: {err}") from err
        if not isinstance(data, dict) or data.get("kind") != SCORES_KIND:
            raise ValueError(f"{path} is not a miprun scores file (write one with `miprun score --out FILE`)")
        params = dict(data["estimator"])
        estimator = estimators.get(params.pop("name"), **params)
        return cls(
            table=ScoreTable.from_json(data["scores"]),
            estimator=estimator,
            calibration=CalibrationInfo(**data["calibration"]),
            model=data["model"],
            timings=data.get("timings", {}),
        )


@dataclass
class PruneResult:
    """The pruned in-memory model, its tokenizer, the plan, and where it was saved (if anywhere)."""

    model: torch.nn.Module
    tokenizer: Any
    plan: PrunePlan
    out: Path | None = None


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = round(timings.get(phase, 0.0) + time.perf_counter() - start, 3)


def _as_loaded(
    model: str | LoadedModel | None, device: str, dtype: str, trust_remote_code: bool
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


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


def blocks_to_remove(total: int, num_blocks: int | None, ratio: float | None) -> int:
    """N from ``num_blocks`` or ``ratio`` (N = ceil(T * ratio)), validated against ``total`` blocks."""
    if (num_blocks is None) == (ratio is None):
        raise ValueError("give exactly one of num_blocks (--num-blocks) or ratio (--ratio)")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        num_blocks = math.ceil(total * ratio)
    assert num_blocks is not None
    if not 0 < num_blocks < total:
        raise ValueError(
            f"can remove between 1 and {total - 1} of the model's {total} blocks, not {num_blocks}"
        )
    return num_blocks


def score(
    model: str | LoadedModel | None = None,
    *,
    calibration: CalibrationConfig | None = None,
    estimator: str | Estimator = estimators.DEFAULT,
    estimator_params: dict[str, Any] | None = None,
    all_spans: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ScoreResult:
    """One dense forward pass over calibration text, then the MI of every block (and every span).

    Args:
        model: embedded name, local folder, ``.gguf`` file, hub name, a :class:`LoadedModel`, or None for
            the embedded default.
        all_spans: also compute every contiguous span, so any N and method can reuse the result.
    """
    cal = calibration or CalibrationConfig()
    timings: dict[str, float] = {}
    with _timed(timings, "load_model"):
        loaded = _as_loaded(model, device, dtype, trust_remote_code)
        info = model_info(loaded)
    est = (
        estimator
        if isinstance(estimator, Estimator)
        else estimators.get(estimator, **(estimator_params or {}))
    )
    with _timed(timings, "calibration_data"):
        text = load_text(cal.source, "calibration")
        windows = token_windows(loaded.tokenizer, text, cal.samples, cal.seq_len, cal.seed)
    with _timed(timings, "capture"):
        stats = capture(
            loaded.model,
            windows,
            est.capture_spec(),
            batch_size=cal.batch_size,
            seed=cal.seed,
            exclude_first_token=cal.exclude_first_token,
            progress=progress,
        )
    table = ScoreTable(num_blocks=stats.num_blocks, estimator=est, stats=stats)
    with _timed(timings, "block_scores"):
        table.block_nmi()
    if all_spans:
        with _timed(timings, "span_scores"):
            table.fill_all(progress=progress)
    calibration_info = CalibrationInfo(
        source=text.name,
        fingerprint=text.fingerprint,
        windows_fingerprint=tensor_fingerprint(windows),
        num_windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        seed=cal.seed,
        tokens=stats.num_tokens,
        exclude_first_token=cal.exclude_first_token,
    )
    return ScoreResult(table, est, calibration_info, info, timings)


def select(
    scores: ScoreResult | ScoreTable,
    num_blocks: int | None = None,
    *,
    ratio: float | None = None,
    method: str = DEFAULT_METHOD,
    k: int = 5,
) -> tuple[list[int], SearchInfo]:
    """Choose the blocks to remove from existing scores; no forward pass."""
    table = scores.table if isinstance(scores, ScoreResult) else scores
    n = blocks_to_remove(table.num_blocks, num_blocks, ratio)
    return run_method(table, n, method, k)


def _check_scores_match(scores: ScoreResult, info: dict[str, Any], source: str | None) -> None:
    if scores.model.get("fingerprint") != info["fingerprint"]:
        raise ValueError(
            f"the scores file was made for model {scores.model.get('name')!r} "
            f"(fingerprint {scores.model.get('fingerprint')}), not for {info['name']!r} "
            f"(fingerprint {info['fingerprint']}); re-run `miprun score` for this model"
        )
    if source is not None and source != scores.calibration.source:
        raise ValueError(
            f"the scores file was computed on calibration text {scores.calibration.source!r}, "
            f"not {source!r}; drop --calib or re-run `miprun score --calib {source}`"
        )


def prune(
    model: str | LoadedModel | None = None,
    *,
    num_blocks: int | None = None,
    ratio: float | None = None,
    method: str = DEFAULT_METHOD,
    k: int = 5,
    scores: ScoreResult | str | Path | None = None,
    calibration: CalibrationConfig | None = None,
    estimator: str = estimators.DEFAULT,
    estimator_params: dict[str, Any] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    evaluate: bool = False,
    eval_source: str | None = None,
    eval_samples: int = 16,
    eval_seq_len: int = 256,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Score (or reuse ``scores``), select ``num_blocks`` (or ``ratio``) blocks, remove them, and save to ``out``.

    With ``evaluate``, held-out perplexity of the dense and pruned model is measured on text disjoint from
    the calibration text and recorded in the plan.
    """
    check_method(method)
    if out is not None:
        check_output(Path(out), overwrite)  # fail before the expensive part
    timings: dict[str, float] = {}
    with _timed(timings, "load_model"):
        loaded = _as_loaded(model, device, dtype, trust_remote_code)
        info = model_info(loaded)
    n = blocks_to_remove(info["num_blocks"], num_blocks, ratio)
    if scores is None:
        result = score(
            loaded,
            calibration=calibration,
            estimator=estimator,
            estimator_params=estimator_params,
            all_spans=method == "mi-optimal",
            progress=progress,
        )
    else:
        result = scores if isinstance(scores, ScoreResult) else ScoreResult.read(scores)
        _check_scores_match(result, info, calibration.source if calibration else None)
        log.info("reusing scores from %s: no calibration pass", scores)
    for phase, seconds in result.timings.items():
        timings.setdefault(phase, seconds)
    removed, search = run_method(result.table, n, method, k)
    timings["selection"] = search.seconds
    timings["optimum_for_comparison"] = search.optimum_seconds
    evaluation: dict[str, Any] = {}
    eval_ids = None
    if evaluate:
        with _timed(timings, "evaluation"):
            eval_text = load_text(eval_source, "evaluation")
            eval_ids = eval_windows(loaded.tokenizer, eval_text, eval_seq_len, eval_samples)
            evaluation = {
                "source": eval_text.name,
                "fingerprint": eval_text.fingerprint,
                "windows": int(eval_ids.shape[0]),
                "seq_len": int(eval_ids.shape[1]),
                "dense_ppl": perplexity(loaded.model, eval_ids, progress=progress),
            }
    with _timed(timings, "surgery"):
        remove_blocks(loaded.model, removed)
    if eval_ids is not None:
        with _timed(timings, "evaluation"):
            evaluation["pruned_ppl"] = perplexity(loaded.model, eval_ids, progress=progress)
    plan = PrunePlan(
        model=info,
        num_blocks_before=info["num_blocks"],
        removed=removed,
        estimator=result.estimator.params(),
        calibration=result.calibration,
        search=search,
        scores=result.table.to_json(),
        timings=timings,
        evaluation=evaluation,
    )
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        with _timed(timings, "save"):
            save(loaded, plan, out_path, overwrite=overwrite, progress=progress)
        plan.write(out_path / MANIFEST_NAME)  # again, now with the save time
    return PruneResult(loaded.model, loaded.tokenizer, plan, out_path)


def save(
    loaded: LoadedModel, plan: PrunePlan, out: Path, *, overwrite: bool = False, progress: bool = True
) -> None:
    """Write weights (safetensors), tokenizer, ``miprun.json`` and the report, atomically."""
    from miprun.report import write_report  # matplotlib is only imported when a report is written

    write_steps(
        out,
        [
            ("weights", lambda d: loaded.model.save_pretrained(d, safe_serialization=True)),
            ("tokenizer", lambda d: loaded.tokenizer.save_pretrained(d)),
            ("manifest", lambda d: plan.write(d / MANIFEST_NAME)),
            ("report", lambda d: write_report(plan, d)),
        ],
        overwrite=overwrite,
        progress=progress,
    )


def apply_plan(model: torch.nn.Module, plan: PrunePlan | str | Path) -> torch.nn.Module:
    """Re-apply a saved plan (``miprun.json``) to the dense base model it was made for."""
    plan = plan if isinstance(plan, PrunePlan) else PrunePlan.read(Path(plan))
    found = num_blocks(model)
    if found != plan.num_blocks_before:
        raise ValueError(
            f"the plan is for a model with {plan.num_blocks_before} blocks; this one has {found}"
        )
    return remove_blocks(model, plan.removed)
