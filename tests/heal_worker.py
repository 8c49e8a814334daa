"""A healing run for ``accelerate launch`` in tests: heal a pruned folder, optionally stopping after a step.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/heal_worker.py \\
        PRUNED DENSE WORK_DIR OUT.safetensors STOP_AT KEY=VALUE...

Each process heals (stopping with a KeyboardInterrupt after step STOP_AT when it is positive, as Ctrl-C
would); the main one writes the merged weights and a JSON report beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from miprun.model.loading import as_loaded
from miprun.options import HealConfig
from miprun.repair.heal import heal


def main(pruned: str, dense: str, work_dir: str, out: str, stop_at: str, *settings: str) -> None:
    fields: dict[str, Any] = {}
    for item in settings:
        key, value = item.split("=", 1)
        fields[key] = (
            value if key == "source" else (float(value) if key in ("lr", "temperature") else int(value))
        )
    config = HealConfig(**fields)

    def stop(step: int, loss: float, model: Any) -> None:
        if step == int(stop_at):
            raise KeyboardInterrupt

    student, teacher = as_loaded(pruned), as_loaded(dense)
    report = heal(student, teacher, config, work_dir=Path(work_dir), progress=False, on_step=stop)
    if report.processes > 1 and torch.distributed.get_rank() != 0:
        return  # the processes hold the same merged weights
    save_file({k: v.detach().clone().contiguous() for k, v in student.model.state_dict().items()}, out)
    Path(out).with_suffix(".json").write_text(json.dumps(report.to_json(), default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
