"""Every registered plugin keeps its kind's contract, run on its own ``example()`` on a tiny model: a plugin
file added to a plugin package is tested here with no line of its own.

* a statistic reduces and updates on a real forward pass, and two shares merged equal one pass over both;
* an estimator returns finite MI (nats, >= 0) and NMI in [0, 1];
* a method chooses N distinct in-range blocks through ``miprun.prune``;
* a repair fits and folds: the cut model's logits stay finite and, where it changes weights, differ from
  the cut alone.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import NUM_LAYERS, VOCAB, tiny_model

import miprun
from miprun import estimators, methods, repair
from miprun.capture import statistics
from miprun.capture.engine import capture
from miprun.capture.statistic import CapturedStats, Statistic
from miprun.model.loading import LoadedModel
from miprun.options import CalibrationConfig

pytestmark = pytest.mark.integration

CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=12, seq_len=16, batch_size=3)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")[0].eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(3, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))  # (windows, seq)


def _loaded(tokenizer) -> LoadedModel:
    return LoadedModel(tiny_model("llama")[0], tokenizer, "tiny-llama", None)


def _state(stat: Statistic) -> dict:
    return {k: v for k, v in stat.state_dict().items() if not isinstance(v, list) or v}


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        gap = float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-12))
        assert gap < 1e-5, f"{where}: relative gap {gap:.2e}"  # float32 batch products, summed apart
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", statistics.REGISTRY.names())
def test_statistic_fills_on_a_forward_pass_and_two_shares_merge_into_one_pass(name, model, windows):
    example = statistics.REGISTRY.get(name).example()
    cal = dataclasses.replace(CAL, batch_size=1)
    whole = capture(model, windows, [example], cal, progress=False)
    first, second = (capture(model, windows, [example], cal, share=(i, 2), progress=False) for i in (0, 1))
    assert whole.num_tokens == first.num_tokens + second.num_tokens > 0
    # as data-parallel ranks merge (capture.distributed): each share's state crosses a process boundary
    shares = [pickle.loads(pickle.dumps(part.find(example).state_dict())) for part in (first, second)]
    merged = type(example).from_state_dict(shares[0])
    merged.merge_(type(example).from_state_dict(shares[1]))
    filled = _state(whole.find(example))
    assert filled.keys() == _state(merged).keys()
    assert any(isinstance(v, torch.Tensor) or v for v in filled.values())  # it recorded something
    for key, value in filled.items():
        _assert_same(value, _state(merged)[key], f"{name}.{key}")


@pytest.mark.parametrize("name", estimators.REGISTRY.names())
def test_estimator_gives_finite_mi_in_nats_and_nmi_in_the_unit_interval(name, model, windows):
    estimator = estimators.REGISTRY.get(name).example()
    stats: CapturedStats = capture(model, windows, estimator.statistics(), CAL, progress=False)
    for a, b in [(0, 1), (1, 3), (2, NUM_LAYERS)]:
        mi = estimator.mi(stats, a, b)
        assert math.isfinite(mi) and mi >= 0.0, (a, b, mi)
        assert 0.0 <= estimator.nmi(stats, a, b) <= 1.0
    assert estimator.mi(stats, 2, 2) >= estimator.mi(stats, 2, 5) - 1e-6  # a state shares most with itself


@pytest.mark.parametrize("name", methods.REGISTRY.names())
def test_method_chooses_n_distinct_blocks_in_range(name, tiny_tokenizer):
    example = methods.REGISTRY.get(name).example()
    result = miprun.prune(
        _loaded(tiny_tokenizer),
        num_blocks=2,
        method=name,
        method_params=example.params(),
        repair="none",  # the method's choice alone
        calibration=CAL,
        cache=False,
        progress=False,
    )
    removed = result.plan.removed
    assert len(set(removed)) == len(removed) == 2 and all(0 <= b < NUM_LAYERS for b in removed), removed
    assert result.plan.search.method == name and result.plan.num_blocks_before == NUM_LAYERS


@pytest.mark.parametrize("name", repair.REGISTRY.names())
def test_repair_folds_into_the_cut_model_and_changes_it_only_if_it_says_so(name, tiny_tokenizer, windows):
    cls = repair.REGISTRY.get(name)
    fixed, cut = (
        miprun.prune(
            _loaded(tiny_tokenizer),
            num_blocks=2,
            method="last-n",
            repair=chosen,
            repair_params=params,
            calibration=CAL,
            cache=False,
            progress=False,
        )
        for chosen, params in ((name, cls.example().params()), ("none", {}))
    )
    assert fixed.plan.removed == cut.plan.removed and fixed.plan.repair.name == name
    with torch.no_grad():
        logits = fixed.model(windows).logits
        alone = cut.model(windows).logits
    assert torch.isfinite(logits).all()
    assert bool(fixed.plan.repair.changed) == cls.changes_weights
    assert (not torch.allclose(logits, alone)) == cls.changes_weights
