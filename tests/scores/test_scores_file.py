"""A version-1 scores file (baselines kept under ``baselines``, cosine as raw sums) reads back with the evidence
classes the methods register below the file format: reading it imports no method."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import SRC

import miprun.methods  # noqa: F401 - the built-in methods add their evidence classes (every entry point does)
from miprun.errors import ScoresError, UnknownNameError
from miprun.scores import ScoreResult

T = 3  # blocks: states 0..3


def _version1(baselines: dict) -> dict:
    return {
        "kind": "miprun-scores",
        "version": 1,
        "model": {"name": "tiny", "path": None, "model_type": "llama", "num_blocks": T, "fingerprint": "f"},
        "estimator": None,
        "calibration": {
            "source": "wiki",
            "fingerprint": "a",
            "windows_fingerprint": "b",
            "num_windows": 2,
            "seq_len": 8,
            "seed": 0,
            "tokens": 14,
        },
        "scores": None,
        "baselines": baselines,
    }


def _baselines() -> dict:
    eye = [[2.0 * (i == j) + 1.0 * (i != j) for j in range(T + 1)] for i in range(T + 1)]
    return {
        "cosine": {"count": 2, "cos_sum": eye, "angle_sum": [[0.5] * (T + 1)] * (T + 1)},
        "oneshot": {"losses": [1.0, 2.0, 3.0], "forward_passes": 3, "seconds": 0.1},
        "sleb": {"order": [2], "losses": [1.5], "forward_passes": [3], "seconds": [0.1]},
    }


def test_a_version1_file_reads_its_baselines_as_evidence(tmp_path: Path) -> None:
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(_version1(_baselines())))
    result = ScoreResult.read(path)
    cos = result.evidence["cosine"]
    assert cos.tokens == 2 and float(cos.mean_cos[0, 0]) == 1.0 and float(cos.mean_cos[0, 1]) == 0.5
    assert float(cos.mean_angle[1, 2]) == 0.25
    assert result.evidence["oneshot"].losses == [1.0, 2.0, 3.0]
    assert result.evidence["sleb"].removed(1) == [2]
    again = ScoreResult.from_json(json.loads(json.dumps(result.to_json())))  # written as version 2
    assert sorted(again.evidence) == ["cosine", "oneshot", "sleb"]


def test_a_version1_file_with_no_cosine_tokens_has_no_cosine_evidence(tmp_path: Path) -> None:
    baselines = _baselines()
    baselines["cosine"]["count"] = 0
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(_version1(baselines)))
    assert "cosine" not in ScoreResult.read(path).evidence


def test_non_finite_version1_losses_are_refused(tmp_path: Path) -> None:
    baselines = _baselines()
    baselines["oneshot"]["losses"][1] = 1e400  # json.dumps writes Infinity
    assert math.isinf(baselines["oneshot"]["losses"][1])
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(_version1(baselines)))
    with pytest.raises(ScoresError, match="non-finite"):
        ScoreResult.read(path)


def test_unknown_evidence_names_the_known_keys() -> None:
    from miprun.scores.evidence import EVIDENCE_TYPES

    with pytest.raises(UnknownNameError, match="Did you mean 'cosine'"):
        EVIDENCE_TYPES.get("cosin")


def test_reading_scores_imports_no_method() -> None:
    """The file format sits below the methods: importing it pulls in none of them."""
    code = "import sys, miprun.scores.result; print(any(m.startswith('miprun.methods') for m in sys.modules))"
    src = str(SRC)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert out.stdout.strip() == "False"


def test_one_key_takes_one_class_but_a_class_defined_again_replaces_itself() -> None:
    from miprun.scores.evidence import EvidenceTypes

    def defined() -> type:
        class Matrix:  # the same name each time, as a notebook cell run again defines it
            pass

        return Matrix

    class Other:
        pass

    types = EvidenceTypes()
    first, again = defined(), defined()
    types.add("m", first)
    types.add("m", first)  # several methods reading one key with one class
    types.add("m", again)
    assert types.get("m") is again
    with pytest.raises(ValueError, match="needs a key of its own"):
        types.add("m", Other)
