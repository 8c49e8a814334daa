"""Whether a ``miprun.json`` still describes the weights beside it: a hand-edited manifest (``removed``
changed, the weights replaced by another model's) is refused by the commands that read it, rather than
copied into a new output that disagrees with its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from miprun.errors import ScoresError
from miprun.model.layouts import decoder_layers, layout_for, model_config, num_blocks
from miprun.output.manifest import PrunePlan

RESTORE = "restore the miprun.json this folder was written with, or prune the dense model again"


def check_removed(before: Any, removed: Any, path: Path) -> None:
    """The manifest's own fields agree: ``removed`` is a list of distinct block indices of the dense model."""
    problem = ""
    if type(before) is not int or before < 2:
        problem = f"num_blocks_before is {before!r}, expected a whole number of at least 2"
    elif not isinstance(removed, list) or any(type(i) is not int for i in removed):
        problem = f"removed is {removed!r}, expected a list of block indices"
    elif len(set(removed)) != len(removed) or any(not 0 <= i < before for i in removed):
        problem = f"removed is {removed}, expected distinct block indices in 0..{before - 1}"
    elif len(removed) >= before:
        problem = f"removed lists {len(removed)} of the {before} blocks; at least one must stay"
    if problem:
        raise ScoresError(f"the pruning plan {path} is inconsistent: {problem}; {RESTORE}")


def check_block_count(before: int, removed: list[int], path: Path, model: torch.nn.Module) -> None:
    """The model beside the manifest has the ``before - len(removed)`` blocks the manifest says remain."""
    found = num_blocks(model)
    if found != before - len(removed):
        raise ScoresError(
            f"the pruning plan {path} says {before} - {len(removed)} = {before - len(removed)} blocks "
            f"remain, but the model beside it has {found}; {RESTORE}"
        )


def check_plan_matches(plan: PrunePlan, path: Path, model: torch.nn.Module, dense: Any = None) -> None:
    """The pruned ``model`` has the blocks ``plan`` says, and (given the ``dense`` model it was cut from, and
    when no healing changed every weight) each kept block holds that dense block's weights, apart from
    those the repair changed."""
    check_removed(plan.num_blocks_before, plan.removed, path)
    check_block_count(plan.num_blocks_before, plan.removed, path, model)
    if dense is None or plan.heal is not None:
        return
    layers_path = layout_for(model_config(dense)).layers_path
    kept = [i for i in range(plan.num_blocks_before) if i not in set(plan.removed)]
    changed = set(plan.repair.changed)
    dense_layers, pruned_layers = decoder_layers(dense), decoder_layers(model)
    for new, old in enumerate(kept):
        theirs = dict(dense_layers[old].named_parameters())
        for name, mine in pruned_layers[new].named_parameters():
            if f"{layers_path}.{old}.{name}" in changed or name not in theirs:
                continue
            if not _close(mine, theirs[name]):
                raise ScoresError(
                    f"the pruning plan {path} says block {new} of the model beside it is block {old} of "
                    f"the dense model, but its {name} differs from that block's (removed {plan.removed} "
                    f"was edited, or the weights replaced); {RESTORE}"
                )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a cast between float dtypes (a pruned model saved in bfloat16 from a float32 one)."""
    if a.shape != b.shape:
        return False
    x, y = a.detach().float().cpu(), b.detach().float().cpu()
    return bool(torch.linalg.vector_norm(x - y) <= 1e-2 * torch.linalg.vector_norm(y) + 1e-6)
