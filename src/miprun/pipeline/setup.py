"""What a run is made of: its settings, the named parts the options choose, the budget, the model's identity."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from miprun import estimators, methods, repair
from miprun.errors import InvalidOptionError, InvalidTypeError
from miprun.estimators import Estimator
from miprun.methods import Method
from miprun.model.identity import ModelInfo, model_fingerprint
from miprun.model.layouts import layout_for, num_blocks, text_config
from miprun.model.loading import LoadedModel
from miprun.model.surgery import check_exact
from miprun.options import (
    DEFAULT_REPAIR,
    CalibrationConfig,
    EstimatorOptions,
    RepairOptions,
    RuntimeOptions,
    ScoringOptions,
    default_method,
    groups,
)
from miprun.repair import Repair

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
    """The method the options name (or the default), with its parameters (``k`` goes to methods that take
    one)."""
    name = scoring.method or default_method(scoring.sequential)
    cls = methods.REGISTRY.get(name)
    params = dict(scoring.method_params)
    if "k" in {f.name for f in dataclasses.fields(cls)}:
        params.setdefault("k", scoring.k)
    return methods.build(name, params)


def method_with(name: str, params: dict[str, Any], k: int) -> Method:
    """The method ``name`` with those of ``params`` it has, and ``k`` if it takes one (one --method-opt set
    serves every method of a comparison)."""
    fields = {f.name for f in dataclasses.fields(methods.REGISTRY.get(name))}
    own = {key: value for key, value in params.items() if key in fields}
    if "k" in fields:
        own.setdefault("k", k)
    return methods.build(name, own)


def estimator_of(estimation: EstimatorOptions) -> Estimator:
    return estimators.build(estimation.estimator, estimation.estimator_params)


def repair_of(options: RepairOptions) -> Repair:
    """The repair the options name, or the default (:func:`miprun.pipeline.prune.run_prune` drops a default that cannot fold)."""
    return repair.build(options.repair or DEFAULT_REPAIR, options.repair_params)


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
    method_names = compared_methods(options) if hasattr(options, "methods") else []
    for name in method_names:
        method_with(name, getattr(options, "method_params", {}), getattr(options, "k", 0))
    _refuse_unused("method", method_names, methods.REGISTRY, getattr(options, "method_params", {}))
    names = getattr(options, "repairs", [])
    for name in names:
        repair_with(name, getattr(options, "repair_params", {}))
    _refuse_unused("repair", names, repair.REGISTRY, getattr(options, "repair_params", {}))


def compared_methods(options: Any) -> list[str]:
    """The methods a comparison runs: those it names, or every method that belongs in the default comparison."""
    return list(options.methods) or methods.default_comparison()


def _refuse_unused(kind: str, names: list[str], registry: Any, params: dict[str, Any]) -> None:
    """A parameter that none of the named plugins has is a typo: refuse it, naming who was asked."""
    known = {f.name for name in names for f in dataclasses.fields(registry.get(name))}
    unused = sorted(set(params if names else ()) - known)
    if unused:
        raise InvalidOptionError(
            f"no {kind} among {', '.join(names)} has the parameter(s) {', '.join(unused)}"
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


def model_info(loaded: LoadedModel) -> ModelInfo:
    """Identity of a loaded model; an architecture miprun cannot prune fails here, before any forward pass."""
    config = loaded.model.config
    layout = layout_for(config)
    check_exact(text_config(config), layout)  # so does one whose layers cannot be renumbered
    return ModelInfo(
        name=loaded.name,
        path=loaded.path,
        model_type=config.model_type,
        num_blocks=num_blocks(loaded.model),
        fingerprint=model_fingerprint(loaded.model),
        revision=loaded.revision,
    )
