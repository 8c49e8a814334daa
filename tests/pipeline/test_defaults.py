"""What `miprun prune` does without --method and --repair: the measured best path (mi-search + linear),
MI-PRUN's one pass with --sequential, and no repair where the family cannot fold one."""

from __future__ import annotations

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

import miprun
from miprun.errors import UnsupportedArchitectureError
from miprun.model.loading import LoadedModel
from miprun.options import DEFAULT_METHOD, DEFAULT_REPAIR, LAYERWISE_METHOD, PruneOptions, ScoringOptions
from miprun.pipeline.setup import method_of, repair_of

CAL = miprun.CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, batch_size=3)


def test_the_defaults_are_mi_search_and_linear_and_mi_prun_layer_by_layer():
    opts = PruneOptions()
    assert opts.scoring.method is None and opts.repair_config.repair is None  # "the default", resolved late
    assert (DEFAULT_METHOD, DEFAULT_REPAIR, LAYERWISE_METHOD) == ("mi-search", "linear", "mi-prun")
    assert method_of(opts.scoring).name == "mi-search"
    assert method_of(ScoringOptions(sequential=True)).name == "mi-prun"
    assert (
        method_of(ScoringOptions(method="sleb", sequential=True)).name == "sleb"
    )  # an explicit choice stays
    assert repair_of(opts.repair_config).name == "linear"


def _model(arch: str, **config_changes) -> torch.nn.Module:
    config = tiny_config(arch)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.integration
def test_prune_without_method_or_repair_searches_and_repairs(tiny_tokenizer):
    loaded = LoadedModel(_model("llama"), tiny_tokenizer, "tiny-llama", None)
    result = miprun.prune(loaded, num_blocks=2, calibration=CAL, cache=False, progress=False)
    plan = result.plan
    assert plan.search.method == "mi-search" and plan.repair.name == "linear"
    finalists = plan.search.params["finalists"]
    assert any(f["measured"] != f["cut"] for f in finalists)  # measured again, after their repairs
    assert plan.repair.tokens > 0


@pytest.mark.integration
def test_the_default_repair_steps_aside_where_the_family_cannot_fold_it_and_an_explicit_one_is_refused(
    tiny_tokenizer, caplog
):
    post_norm = _model("opt", do_layer_norm_before=False)  # OPT-350m's layout: the norm after the add
    loaded = LoadedModel(post_norm, tiny_tokenizer, "tiny-opt-post-norm", None)
    with caplog.at_level("WARNING"):
        result = miprun.prune(
            loaded, num_blocks=2, method="mi-prun", calibration=CAL, cache=False, progress=False
        )
    assert result.plan.repair.name == "none" and "no repair after the cut" in caplog.text
    loaded = LoadedModel(
        _model("opt", do_layer_norm_before=False), tiny_tokenizer, "tiny-opt-post-norm", None
    )
    with pytest.raises(UnsupportedArchitectureError, match="normalises after the residual add"):
        miprun.prune(
            loaded,
            num_blocks=2,
            method="mi-prun",
            repair="linear",
            calibration=CAL,
            cache=False,
            progress=False,
        )
