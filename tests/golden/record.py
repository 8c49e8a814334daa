"""Record (or re-check) the golden outputs: removed blocks and scores of every method on tiny models.

Recorded once from the code before the pipeline refactor, so the refactored code is held to the same
answers: ``python tests/golden/record.py`` rewrites ``tests/golden/golden.json`` (only when the
behaviour is meant to change, with the reason in the commit message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

GOLDEN = HERE / "golden.json"
ARCHS = ("llama", "gemma3_text", "qwen2", "gpt2")
ESTIMATORS = {
    "coordinate": {},
    "gaussian": {"proj_dim": 16},
    "renyi": {"sample_tokens": 100},
    "binned": {"sample_tokens": 100, "bins": 4},
}
METHODS = ("mi-prun", "mi-optimal", "shortgpt", "angular", "sleb", "ppl-oneshot", "last-n", "random")
NS = (1, 2, 3)


def record() -> dict:
    import torch
    from conftest import CALIBRATION_TXT, train_tiny_tokenizer
    from tiny_models import tiny_model

    from miprun.api import CalibrationConfig, score, select
    from miprun.model.loading import LoadedModel

    torch.set_num_threads(1)
    tokenizer = train_tiny_tokenizer()
    cal = CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, seed=0, batch_size=3)
    out: dict = {}
    for arch in ARCHS:
        lm = LoadedModel(tiny_model(arch)[0], tokenizer, f"tiny-{arch}", None)
        for est, params in ESTIMATORS.items():
            result = score(
                lm, calibration=cal, estimator=est, estimator_params=params, cache=False, progress=False
            )
            out[f"{arch}/{est}/spans"] = result.table.to_json()
            for method in ("mi-prun", "mi-optimal"):
                for n in NS:
                    removed, _ = select(result, n, method=method)
                    out[f"{arch}/{est}/{method}/{n}"] = {"removed": removed}
        for method in METHODS[2:]:
            result = score(
                lm, calibration=cal, method=method, max_blocks=max(NS), cache=False, progress=False
            )
            for n in NS:
                removed, info = select(result, n, method=method, seed=cal.seed)
                out[f"{arch}/{method}/{n}"] = {"removed": removed, "record": info.params}
    return out


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")
