"""The Python API: ``score`` a model, ``select`` blocks, ``prune`` and save. The CLI is a thin layer on it.

import miprun
result = miprun.prune("smollm2-135m", num_blocks=3, out="out/smollm2-pruned")
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from miprun import distributed, estimators
from miprun.architectures import layout_for, num_blocks
from miprun.assets import cache_dir
from miprun.baselines import BaselineScores
from miprun.capture import capture, input_device
from miprun.checkpoint import check_not_replacing, check_output, write_steps
from miprun.data import eval_windows, load_text, token_windows
from miprun.estimators import Estimator
from miprun.identity import model_fingerprint, tensor_fingerprint
from miprun.loading import LoadedModel, load_model, resolve_device, resolve_dtype
from miprun.methods import DEFAULT_METHOD, check_method, gather_evidence, run_method
from miprun.perplexity import perplexity
from miprun.plan import MANIFEST_NAME, CalibrationInfo, PrunePlan, SearchInfo, package_versions
from miprun.scores import ScoreTable
from miprun.sequential import capture_sequential
from miprun.stats import BlockStats, CaptureSpec
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
    """Scores of every block (and the spans computed so far) with what produced them.

    ``baselines`` holds what the non-MI methods read (cosine sums, one-shot losses, the SLEB path).
    """

    table: ScoreTable
    estimator: Estimator
    calibration: CalibrationInfo
    model: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    baselines: BaselineScores = field(default_factory=BaselineScores)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": SCORES_KIND,
            "model": self.model,
            "estimator": self.estimator.params(),
            "calibration": asdict(self.calibration),
            "scores": self.table.to_json(),
            "baselines": self.baselines.to_json(),
            "timings": self.timings,
        }

    def write(self, path: str | Path) -> None:
        """Write the JSON atomically (floats as their exact repr), so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def read(cls, path: str | Path) -> ScoreResult:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"cannot read scores file {path}: {err}. Expected the JSON written by "
                "`miprun score --out FILE`; re-create it with that command"
            ) from err
        if not isinstance(data, dict) or data.get("kind") != SCORES_KIND:
            raise ValueError(f"{path} is not a miprun scores file (write one with `miprun score --out FILE`)")
        try:
            params = dict(data["estimator"])
            estimator = estimators.get(params.pop("name"), **params)
            return cls(
                table=ScoreTable.from_json(data["scores"]),
                estimator=estimator,
                calibration=CalibrationInfo(**data["calibration"]),
                model=data["model"],
                timings=data.get("timings", {}),
                baselines=BaselineScores.from_json(data.get("baselines")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is an incomplete or incompatible miprun scores file ({type(err).__name__}: {err}); "
                "re-create it with `miprun score --out FILE`"
            ) from err


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
    model: str | LoadedModel | None,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    device_map: str | None = None,
    sequential: bool = False,
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if sequential and device_map is None:  # weights stay on the CPU; each layer visits `device` in turn
        dtype_ = resolve_dtype(dtype, resolve_device(device))
        return load_model(model, device="cpu", dtype=dtype_, trust_remote_code=trust_remote_code)
    return load_model(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )


def _capture(
    model: torch.nn.Module,
    windows: torch.Tensor,
    spec: CaptureSpec,
    cal: CalibrationConfig,
    *,
    sequential: bool,
    device: str,
    progress: bool,
) -> BlockStats:
    """The calibration pass: whole-model or layer by layer, on this rank's share, merged over all ranks."""
    kwargs: dict[str, Any] = dict(
        batch_size=cal.batch_size,
        seed=cal.seed,
        exclude_first_token=cal.exclude_first_token,
        progress=progress,
        share=distributed.share(len(windows)),
    )
    if sequential:
        stats = capture_sequential(model, windows, spec, device=resolve_device(device), **kwargs)
    else:
        stats = capture(model, windows, spec, **kwargs)
    return distributed.merge_stats(stats)


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


def check_budget(num_blocks: int | None, ratio: float | None) -> None:
    """Check what can be checked of N before the model is loaded: exactly one of the two, in range."""
    if (num_blocks is None) == (ratio is None):
        got = "neither" if num_blocks is None else f"both: {num_blocks} and {ratio}"
        raise ValueError(
            f"give exactly one of num_blocks (--num-blocks N) or ratio (--ratio R), got {got}; "
            "e.g. --num-blocks 3 or --ratio 0.2"
        )
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(
            f"ratio (--ratio) must be strictly between 0 and 1, got {ratio}; "
            "e.g. 0.2 removes ceil(0.2 * T) of the model's T blocks"
        )
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(
            f"num_blocks (--num-blocks) must be at least 1, got {num_blocks}; it counts blocks to remove"
        )


def blocks_to_remove(total: int, num_blocks: int | None, ratio: float | None) -> int:
    """N from ``num_blocks`` or ``ratio`` (N = ceil(T * ratio)), validated against ``total`` blocks."""
    check_budget(num_blocks, ratio)
    n = math.ceil(total * ratio) if ratio is not None else num_blocks
    assert n is not None
    if not 0 < n < total:
        how = f"ratio {ratio} gives ceil({total} * {ratio}) = {n}" if ratio is not None else f"got {n}"
        raise ValueError(
            f"can remove between 1 and {total - 1} of the model's {total} blocks ({how}); "
            f"pass --num-blocks between 1 and {total - 1} or a smaller --ratio"
        )
    return n


def score(
    model: str | LoadedModel | None = None,
    *,
    calibration: CalibrationConfig | None = None,
    estimator: str | Estimator = estimators.DEFAULT,
    estimator_params: dict[str, Any] | None = None,
    all_spans: bool = True,
    method: str = DEFAULT_METHOD,
    max_blocks: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: bool = True,
    cache: bool = True,
    device_map: str | None = None,
    sequential: bool = False,
) -> ScoreResult:
    """One dense forward pass over calibration text, then the MI of every block (and every span).

    With ``cache``, the result is stored under ``cache_dir()/scores`` (keyed by :func:`scores_cache_key`,
    always with every span) and a later call with the same model, windows and settings reuses it.

    For ``shortgpt`` and ``angular`` the same pass also records cosine statistics; a ``method`` that
    needs forward passes of the pruned model (``sleb``, ``ppl-oneshot``) runs them on the same windows.

    Args:
        model: embedded name, local folder, ``.gguf`` file, hub name, a :class:`LoadedModel`, or None for
            the embedded default.
        all_spans: also compute every contiguous span, so any N and method can reuse the result.
        max_blocks: the largest N the scores must serve where the evidence depends on N (the SLEB path);
            default a quarter of the blocks.
        device_map: an accelerate device map for a model larger than one device (``"auto"``, or a
            dict-like string accelerate accepts); layers may sit on several devices or be offloaded.
        sequential: keep the model on the CPU and run one decoder layer at a time on ``device``.

    Under ``torchrun``, each rank captures its share of the windows and the statistics are merged, so
    every rank returns the same result; only rank 0 logs progress (and the scores cache is not used).
    """
    check_method(method)
    cal = calibration or CalibrationConfig()
    if distributed.init_from_env():
        progress, cache = progress and distributed.is_main(), False
    timings: dict[str, float] = {}
    with _timed(timings, "load_model"):
        loaded = _as_loaded(model, device, dtype, trust_remote_code, device_map, sequential)
        info = model_info(loaded)
    est = (
        estimator
        if isinstance(estimator, Estimator)
        else estimators.get(estimator, **(estimator_params or {}))
    )
    with _timed(timings, "calibration_data"):
        text = load_text(cal.source, "calibration")
        windows = token_windows(loaded.tokenizer, text, cal.samples, cal.seq_len, cal.seed)
    spec = check_method(method)
    # Cosine sums hold every state's unit vectors for one batch (GBs on a 70B model): only when read.
    with_cosine = spec.needs == "cosine"
    cached_path = None
    if cache:
        evidence: dict[str, Any] | None = None
        if spec.gather is not None:  # N-dependent forward-pass evidence (SLEB) is only valid for its N
            evidence = {"method": method, "max_blocks": max_blocks}
        elif with_cosine:
            evidence = {"cosine": True}
        key = scores_cache_key(loaded, text.fingerprint, windows, est, cal, evidence)
        cached_path = cache_dir() / "scores" / f"{key}.json"
        hit = _read_cached(cached_path, info)
        if hit is not None:
            hit.timings = timings  # this run's: loading and tokenizing only
            return hit
    with _timed(timings, "capture"):
        stats = _capture(
            loaded.model,
            windows,
            est.capture_spec().merge(CaptureSpec(cosine=with_cosine)),
            cal,
            sequential=sequential,
            device=device,
            progress=progress,
        )
    table = ScoreTable(num_blocks=stats.num_blocks, estimator=est, stats=stats)
    with _timed(timings, "block_scores"):
        table.block_nmi()
    if all_spans or cached_path is not None:  # a cached result must serve any N and method
        with _timed(timings, "span_scores"):
            table.fill_all(progress=progress)
    baselines = BaselineScores(cosine=stats.cosine)
    start = time.perf_counter()
    if gather_evidence(method, loaded.model, windows, baselines, max_blocks, cal.batch_size, progress):
        timings["method_forward_passes"] = round(time.perf_counter() - start, 3)
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
    result = ScoreResult(table, est, calibration_info, info, timings, baselines)
    if cached_path is not None:
        _write_cached(result, cached_path)
    return result


def scores_cache_key(
    loaded: LoadedModel,
    text_fingerprint: str,
    windows: torch.Tensor,
    est: Estimator,
    cal: CalibrationConfig,
    evidence: dict[str, Any] | None = None,
) -> str:
    """Hash of all a :class:`ScoreResult` depends on: model, token windows, estimator and capture settings.

    A new setting that changes the scores must be added here (every ``CalibrationConfig`` field already is).
    """
    param = next(loaded.model.parameters())
    settings = {
        "model": model_fingerprint(loaded.model),
        "dtype": str(param.dtype),
        "device": param.device.type,
        "text": text_fingerprint,
        "windows": tensor_fingerprint(windows),
        "estimator": est.params(),
        "calibration": {k: v for k, v in asdict(cal).items() if k != "source"},  # the text is hashed
        "evidence": evidence,
        "miprun": package_versions().get("miprun"),
    }
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read_cached(path: Path, info: dict[str, Any]) -> ScoreResult | None:
    """The cached result at ``path`` for this model, or None (absent, unreadable or incomplete: recompute)."""
    if not path.is_file():
        return None
    try:
        result = ScoreResult.read(path)
    except ValueError as err:
        log.warning("ignoring an unreadable cached scores file (%s); recomputing", err)
        return None
    t = result.table.num_blocks
    if t != info["num_blocks"] or len(result.table.spans) < t * (t + 1) // 2:
        log.warning("ignoring an incomplete cached scores file %s; recomputing", path)
        return None
    log.info("reusing cached scores %s: no calibration pass (--no-cache recomputes)", path)
    result.model = info
    return result


def _write_cached(result: ScoreResult, path: Path) -> None:
    try:
        result.write(path)
    except OSError as err:  # a read-only or full cache must not fail the run
        log.warning("could not cache the scores in %s: %s", path, err)


def select(
    scores: ScoreResult | ScoreTable,
    num_blocks: int | None = None,
    *,
    ratio: float | None = None,
    method: str = DEFAULT_METHOD,
    k: int = 5,
    seed: int = 0,
) -> tuple[list[int], SearchInfo]:
    """Choose the blocks to remove from existing scores; no forward pass (``seed`` drives ``random``)."""
    table = scores.table if isinstance(scores, ScoreResult) else scores
    base = scores.baselines if isinstance(scores, ScoreResult) else None
    n = blocks_to_remove(table.num_blocks, num_blocks, ratio)
    return run_method(table, n, method, k, baselines=base, seed=seed)


def _check_scores_match(scores: ScoreResult, info: dict[str, Any], source: str | None) -> None:
    if scores.model.get("fingerprint") != info["fingerprint"]:
        raise ValueError(
            f"the scores file was made for model {scores.model.get('name')!r} "
            f"(fingerprint {scores.model.get('fingerprint')}), not for {info['name']!r} "
            f"(fingerprint {info['fingerprint']}); re-run `miprun score` for this model"
        )
    if source is not None:
        text = load_text(source, "calibration")
        if text.fingerprint != scores.calibration.fingerprint:
            raise ValueError(
                f"the scores file was computed on calibration text {scores.calibration.source!r} "
                f"(fingerprint {scores.calibration.fingerprint}), but --calib {source!r} holds other text "
                f"(fingerprint {text.fingerprint}); drop --calib or re-run `miprun score --calib {source}`"
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
    cache: bool = True,
    device_map: str | None = None,
    sequential: bool = False,
) -> PruneResult:
    """Score (or reuse ``scores``), select ``num_blocks`` (or ``ratio``) blocks, remove them, and save to ``out``.

    With ``evaluate``, held-out perplexity of the dense and pruned model is measured on text disjoint from
    the calibration text and recorded in the plan. ``cache`` reuses and stores scores as in :func:`score`;
    ``device_map`` and ``sequential`` are as in :func:`score`. Under ``torchrun`` every rank calibrates its
    share and selects the same blocks; only rank 0 evaluates, saves and shows progress.
    """
    check_method(method)
    check_budget(num_blocks, ratio)
    main = not distributed.init_from_env() or distributed.is_main()
    progress = progress and main
    if out is not None:
        check_output(Path(out), overwrite)  # fail before the expensive part
    timings: dict[str, float] = {}
    with _timed(timings, "load_model"):
        loaded = _as_loaded(model, device, dtype, trust_remote_code, device_map, sequential)
        info = model_info(loaded)
    if out is not None and loaded.path is not None:
        check_not_replacing(Path(out), Path(loaded.path), "model folder")
    n = blocks_to_remove(info["num_blocks"], num_blocks, ratio)
    if scores is None:
        result = score(
            loaded,
            calibration=calibration,
            estimator=estimator,
            estimator_params=estimator_params,
            all_spans=method == "mi-optimal",
            method=method,
            max_blocks=n,
            progress=progress,
            cache=cache,
            device=device,
            sequential=sequential,
        )
    else:
        result = scores if isinstance(scores, ScoreResult) else ScoreResult.read(scores)
        _check_scores_match(result, info, calibration.source if calibration else None)
        log.info("reusing scores from %s: no calibration pass", scores)
    for phase, seconds in result.timings.items():
        timings.setdefault(phase, seconds)
    seed = calibration.seed if calibration is not None else result.calibration.seed  # for `random`
    removed, search = run_method(result.table, n, method, k, baselines=result.baselines, seed=seed)
    timings["selection"] = search.seconds
    timings["optimum_for_comparison"] = search.optimum_seconds
    evaluation: dict[str, Any] = {}
    eval_ids = None
    eval_device = input_device(loaded.model)  # where the first layer runs, also under a device map
    if evaluate and main:
        with _timed(timings, "evaluation"):
            eval_text = load_text(eval_source, "evaluation")
            eval_ids = eval_windows(loaded.tokenizer, eval_text, eval_seq_len, eval_samples)
            evaluation = {
                "source": eval_text.name,
                "fingerprint": eval_text.fingerprint,
                "windows": int(eval_ids.shape[0]),
                "seq_len": int(eval_ids.shape[1]),
                "dense_ppl": perplexity(loaded.model, eval_ids, device=eval_device, progress=progress),
            }
    with _timed(timings, "surgery"):
        remove_blocks(loaded.model, removed)
    if eval_ids is not None:
        with _timed(timings, "evaluation"):
            evaluation["pruned_ppl"] = perplexity(
                loaded.model, eval_ids, device=eval_device, progress=progress
            )
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
    out_path = Path(out) if out is not None and main else None  # one writer under torchrun: rank 0
    if out_path is not None:
        save(loaded, plan, out_path, overwrite=overwrite, progress=progress)
    return PruneResult(loaded.model, loaded.tokenizer, plan, out_path)


def save(
    loaded: LoadedModel, plan: PrunePlan, out: Path, *, overwrite: bool = False, progress: bool = True
) -> None:
    """Write weights (safetensors), tokenizer, ``miprun.json`` and the report, atomically.

    ``plan.timings["save"]`` records the time up to the manifest (weights and tokenizer: nearly all of it).
    """
    from miprun.report import write_report  # matplotlib is only imported when a report is written

    start = time.perf_counter()

    def manifest(folder: Path) -> None:
        plan.timings["save"] = round(time.perf_counter() - start, 3)
        plan.write(folder / MANIFEST_NAME)

    write_steps(
        out,
        [
            ("weights", lambda d: loaded.model.save_pretrained(d, safe_serialization=True)),
            ("tokenizer", lambda d: loaded.tokenizer.save_pretrained(d)),
            ("manifest", manifest),
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
