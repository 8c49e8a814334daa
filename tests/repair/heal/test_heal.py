"""Healing: the distillation loss, and real short runs on tiny pruned models (llama, GPT-2's Conv1D)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CALIBRATION_TXT, HELDOUT_TXT
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, Trainer

from miprun.data import eval_windows, load_text
from miprun.errors import InvalidOptionError, InvalidTypeError
from miprun.model.identity import model_fingerprint
from miprun.model.loading import LoadedModel
from miprun.model.surgery import remove_blocks
from miprun.repair import heal as heal_module
from miprun.repair.heal import (
    TARGETS_NAME,
    HealCheckpointError,
    HealConfig,
    distill_loss,
    heal,
    linear_modules,
    teacher_targets,
    top_k_distill_loss,
)
from miprun.repair.heal.checkpoints import MARKER
from miprun.repair.heal.loss import teacher_top_k

# 10 steps of 2 windows of 32 tokens: the 20 windows the fixture text holds, each read once.
SMALL = HealConfig(
    tokens=640, seq_len=32, batch_size=2, lr=1e-2, rank=4, checkpoint_every=4, source=str(CALIBRATION_TXT)
)


# ----------------------------------------------------------------------------- pure parts


def test_distill_loss_is_the_token_mean_of_kl_teacher_to_student() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = F.kl_div(
        F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none"
    ).sum(-1)  # (2, 5)
    assert distill_loss(student, teacher, 2.0).item() == pytest.approx(expected.mean().item(), rel=1e-5)
    assert distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = expected[mask.bool()].mean().item()
    assert distill_loss(student, teacher, 2.0, mask).item() == pytest.approx(masked, rel=1e-5)


def test_distill_loss_is_float32_for_half_precision_logits() -> None:
    logits = torch.randn(1, 3, 7).to(torch.bfloat16)
    assert distill_loss(logits, logits.flip(-1)).dtype == torch.float32


def test_top_k_loss_is_the_full_kl_at_the_whole_vocabulary_and_a_lower_bound_below() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    full = distill_loss(student, teacher, 2.0).item()
    whole = top_k_distill_loss(student, *teacher_top_k(teacher, 11, 2.0), 2.0).item()
    assert whole == pytest.approx(full, rel=1e-4)
    coarse = [top_k_distill_loss(student, *teacher_top_k(teacher, k, 2.0), 2.0).item() for k in (1, 3, 6, 11)]
    assert all(a <= b + 1e-6 for a, b in itertools.pairwise(coarse))  # merging outcomes only lowers KL
    values, _, tail = teacher_top_k(teacher, 3)
    assert values.shape == (2, 5, 3) and torch.allclose(values.exp().sum(-1) + tail.exp(), torch.ones(2, 5))


def test_config_counts_whole_batches_and_refuses_bad_values() -> None:
    assert HealConfig(tokens=1025, seq_len=256, batch_size=4).steps == 2
    with pytest.raises(InvalidOptionError, match=r"rank \(--rank\) must be at least 1"):
        HealConfig(rank=0)  # checked when built, like every option group
    with pytest.raises(InvalidTypeError, match=r"tokens \(--tokens\) must be int"):
        HealConfig(tokens=2.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=r"lr \(--lr\) must be greater than 0"):
        HealConfig(lr=0.0)
    with pytest.raises(InvalidOptionError, match=r"teacher_topk \(--teacher-topk\) must be at least 1"):
        HealConfig(teacher_topk=0)


# ----------------------------------------------------------------------------- real runs on tiny models


def _pair(arch: str, tokenizer: Any, removed: tuple[int, ...] = (2, 3)) -> tuple[LoadedModel, LoadedModel]:
    """A tiny dense teacher and a student with ``removed`` blocks cut out of a copy of it."""
    teacher = tiny_model(arch)[0]
    student = remove_blocks(copy.deepcopy(teacher), list(removed))
    return LoadedModel(student, tokenizer, "student", None), LoadedModel(teacher, tokenizer, "teacher", None)


def _heldout_kl(student: Any, teacher: Any, tokenizer: Any) -> float:
    """KL(teacher || student) on the held-out fixture text, which healing never reads."""
    ids = eval_windows(tokenizer, load_text(str(HELDOUT_TXT), "evaluation"), 32)
    with torch.no_grad():
        return distill_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_heal_lowers_the_kl_and_leaves_a_stock_checkpoint(
    arch: str, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    student, teacher = _pair(arch, tiny_tokenizer)
    shapes = {name: p.shape for name, p in student.model.named_parameters()}
    teacher_before = _weights(teacher.model)
    before = _heldout_kl(student.model, teacher.model, tiny_tokenizer)

    longer = dataclasses.replace(SMALL, tokens=1280)  # 20 steps: the fixture text read twice
    rng, python_rng = torch.get_rng_state(), random.getstate()
    report = heal(student, teacher, longer, work_dir=tmp_path / "work", progress=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the run seeds its own RNG, not the caller's
    assert random.getstate() == python_rng  # Trainer's seeding included
    assert all(p.requires_grad for p in student.model.parameters())  # as before the adapters

    assert _heldout_kl(student.model, teacher.model, tiny_tokenizer) < 0.85 * before
    assert report.loss_end < report.loss_start and len(report.losses) == report.steps == 20
    assert report.tokens == 1280 and not report.resumed and report.trainable_parameters > 0
    assert {name: p.shape for name, p in student.model.named_parameters()} == shapes  # no new parameter
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.model.named_parameters())
    student.model.save_pretrained(tmp_path / "healed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", attn_implementation="eager").eval()
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student.model(input_ids=ids).logits)


@pytest.mark.integration
@pytest.mark.parametrize(("arch", "suffixes"), [("llama", {"q_proj", "down_proj"}), ("gpt2", {"c_attn"})])
def test_targets_are_the_linear_layers_of_every_block(arch: str, suffixes: set[str]) -> None:
    model = tiny_model(arch)[0]
    names = linear_modules(model)
    assert suffixes <= {name.rsplit(".", 1)[-1] for name in names}
    blocks = {int(name.split(".")[2]) for name in names}  # model.layers.I... or transformer.h.I...
    assert blocks == set(range(6))
    assert not any("lm_head" in name or "embed" in name for name in names)


@pytest.mark.integration
def test_resume_after_an_interrupt_ends_with_the_uninterrupted_weights(
    tiny_tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole, teacher = _pair("llama", tiny_tokenizer)
    heal(whole, teacher, SMALL, work_dir=tmp_path / "whole", progress=False)

    student, _ = _pair("llama", tiny_tokenizer)
    original = _weights(student.model)

    def stop_after_step_6(step: int, loss: float, model: Any) -> None:
        if step == 6:  # the checkpoint at step 4 is on disk; steps 5 and 6 are lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, SMALL, work_dir=tmp_path / "cut", progress=False, on_step=stop_after_step_6)
    assert _checkpoint_step(tmp_path / "cut") == 4
    assert _weights(student.model).keys() == original.keys()  # adapters removed, nothing merged
    assert all(torch.equal(p, original[n]) for n, p in student.model.named_parameters())
    assert all(p.requires_grad for p in student.model.parameters())

    with caplog.at_level(logging.INFO, logger="miprun.repair.heal"):
        report = heal(student, teacher, SMALL, work_dir=tmp_path / "cut", progress=False)
    assert report.resumed and report.resumed_at_step == 4 and report.steps == 10
    assert "resuming the healing run" in caplog.text
    # Same windows, same adapters and Adam moments restored exactly, no dropout: bit for bit.
    healed = dict(whole.model.named_parameters())
    assert all(torch.equal(p, healed[n]) for n, p in student.model.named_parameters())


@pytest.mark.integration
def test_an_interrupt_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole, teacher = _pair("llama", tiny_tokenizer)
    heal(whole, teacher, SMALL, work_dir=tmp_path / "whole", progress=False)
    student, _ = _pair("llama", tiny_tokenizer)
    real, calls = Trainer._save_rng_state, []

    def interrupted_second_save(self: Any, output_dir: str) -> None:
        calls.append(output_dir)
        if len(calls) == 2:  # the step-8 checkpoint: its adapters and optimizer are written, the rest not
            raise KeyboardInterrupt
        real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted_second_save)
    with pytest.raises(KeyboardInterrupt):
        heal(student, teacher, SMALL, work_dir=tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    assert _checkpoint_step(tmp_path / "cut") == 4  # checkpoint-8 has no marker: unfinished, ignored
    report = heal(student, teacher, SMALL, work_dir=tmp_path / "cut", progress=False)
    assert report.resumed_at_step == 4
    healed = dict(whole.model.named_parameters())
    assert all(torch.equal(p, healed[n]) for n, p in student.model.named_parameters())


@pytest.mark.integration
def test_a_checkpoint_for_other_settings_or_models_is_refused(tiny_tokenizer: Any, tmp_path: Path) -> None:
    student, teacher = _pair("llama", tiny_tokenizer)
    few = dataclasses.replace(SMALL, tokens=256)  # 4 steps: one checkpoint

    heal(copy.deepcopy(student), teacher, few, work_dir=tmp_path, progress=False)
    other_lr = dataclasses.replace(few, lr=1e-3)
    with pytest.raises(HealCheckpointError, match=r"lr: checkpoint 0.01, now 0.001.*another --work-dir"):
        heal(copy.deepcopy(student), teacher, other_lr, work_dir=tmp_path, progress=False)
    other_cut, _ = _pair("llama", tiny_tokenizer, removed=(1, 2))
    with pytest.raises(HealCheckpointError, match="student: checkpoint"):
        heal(other_cut, teacher, few, work_dir=tmp_path, progress=False)
    garbled = tmp_path / "garbled" / "checkpoint-4"
    garbled.mkdir(parents=True)
    (garbled / MARKER).write_bytes(b"not a checkpoint")
    with pytest.raises(HealCheckpointError, match="not a readable healing checkpoint"):
        heal(copy.deepcopy(student), teacher, few, work_dir=garbled.parent, progress=False)
    # checkpoint_every and gradient_accumulation change nothing in the result, so they may differ on resume
    report = heal(
        student,
        teacher,
        dataclasses.replace(few, checkpoint_every=1, gradient_accumulation=2),
        work_dir=tmp_path,
    )
    assert report.resumed and report.resumed_at_step == 4


@pytest.mark.integration
def test_heal_on_cached_top_k_targets_needs_no_teacher_in_memory(tiny_tokenizer: Any, tmp_path: Path) -> None:
    student, teacher = _pair("llama", tiny_tokenizer)
    before = _heldout_kl(student.model, teacher.model, tiny_tokenizer)
    config = dataclasses.replace(SMALL, tokens=1280, teacher_topk=8)
    loads: list[str] = []

    def load_teacher() -> LoadedModel:
        loads.append("teacher")
        return teacher

    targets = teacher_targets(tmp_path, config, model_fingerprint(teacher.model), load_teacher)
    assert targets.values.shape == (40, 32, 8) and loads == ["teacher"]
    again = teacher_targets(tmp_path, config, model_fingerprint(teacher.model), load_teacher)
    assert loads == ["teacher"] and torch.equal(again.values, targets.values)  # read back, teacher not loaded
    assert (tmp_path / TARGETS_NAME).is_file()

    report = heal(student, again, config, work_dir=tmp_path / "work", progress=False)  # no teacher model
    assert report.loss_end < report.loss_start
    assert _heldout_kl(student.model, teacher.model, tiny_tokenizer) < 0.85 * before


@pytest.mark.integration
def test_top_k_at_the_whole_vocabulary_heals_like_the_full_kl(tiny_tokenizer: Any, tmp_path: Path) -> None:
    full, teacher = _pair("llama", tiny_tokenizer)
    original = _weights(full.model)
    heal(full, teacher, SMALL, work_dir=tmp_path / "full", progress=False)
    student, _ = _pair("llama", tiny_tokenizer)
    whole = dataclasses.replace(SMALL, teacher_topk=128)  # the tiny vocabulary: the tail bucket is empty
    report = heal(student, teacher, whole, work_dir=tmp_path / "top-k", progress=False)
    assert (tmp_path / "top-k" / TARGETS_NAME).is_file()
    healed = dict(full.model.named_parameters())
    difference = max((p - healed[n]).abs().max().item() for n, p in student.model.named_parameters())
    moved = max((p - original[n]).abs().max().item() for n, p in healed.items())
    # Measured: 8.9e-5 against a 2.6e-2 move (float sums in another order, which Adam's step rescales).
    assert difference < 0.01 * moved, (difference, moved)
    assert report.config.teacher_topk == 128


@pytest.mark.integration
def test_accumulation_checkpointing_and_bf16_pass_through_to_trainer(
    tiny_tokenizer: Any, tmp_path: Path
) -> None:
    whole, teacher = _pair("llama", tiny_tokenizer)
    original = _weights(whole.model)
    heal(whole, teacher, SMALL, work_dir=tmp_path / "whole", progress=False)
    moved = max((p - original[n]).abs().max().item() for n, p in whole.model.named_parameters())

    # Two windows a step, one per pass, activations recomputed: the same global batch, the same weights.
    split, _ = _pair("llama", tiny_tokenizer)
    lean = dataclasses.replace(SMALL, gradient_accumulation=2, gradient_checkpointing=True)
    heal(split, teacher, lean, work_dir=tmp_path / "lean", progress=False)
    healed = dict(whole.model.named_parameters())
    difference = max((p - healed[n]).abs().max().item() for n, p in split.model.named_parameters())
    assert difference < 0.01 * moved, (difference, moved)
    assert not split.model.is_activation_checkpointing  # switched off again after the run

    half, _ = _pair("llama", tiny_tokenizer)
    before = _heldout_kl(half.model, teacher.model, tiny_tokenizer)
    longer = dataclasses.replace(SMALL, tokens=1280, bf16=True)
    report = heal(half, teacher, longer, work_dir=tmp_path / "bf16", progress=False)
    assert all(p.dtype == torch.float32 for p in half.model.parameters())  # autocast, weights stay float32
    assert _heldout_kl(half.model, teacher.model, tiny_tokenizer) < 0.85 * before
    assert report.config.bf16 and report.losses != []
    with pytest.raises(InvalidOptionError, match=r"batch_size \(--batch-size\) 2 does not split evenly"):
        heal(half, teacher, dataclasses.replace(SMALL, gradient_accumulation=4), work_dir=tmp_path / "x")


@pytest.mark.integration
def test_a_teacher_that_cannot_be_the_parent_is_refused(tiny_tokenizer: Any, tmp_path: Path) -> None:
    student, teacher = _pair("llama", tiny_tokenizer)
    with pytest.raises(InvalidOptionError, match="same model object"):
        heal(teacher, teacher, SMALL, work_dir=tmp_path)
    teacher.model.resize_token_embeddings(200)
    with pytest.raises(InvalidOptionError, match="predicts 128 tokens and the teacher 200"):
        heal(student, teacher, SMALL, work_dir=tmp_path)


def _checkpoint_step(work_dir: Path) -> int:
    """The step of the newest complete checkpoint (one with miprun's marker) in ``work_dir``."""
    done = [p for p in work_dir.glob("checkpoint-*") if (p / MARKER).is_file()]
    return max(int(json.loads((p / MARKER).read_text())["step"]) for p in done)


@pytest.mark.slow
def test_heal_lowers_the_heldout_perplexity_of_pruned_smollm2(tmp_path: Path) -> None:
    from miprun.evaluation.heldout import heldout_windows
    from miprun.model.loading import as_loaded
    from miprun.model.perplexity import perplexity

    teacher = as_loaded("smollm2-135m")
    student = LoadedModel(
        remove_blocks(copy.deepcopy(teacher.model), list(range(13, 19))), teacher.tokenizer, "cut", None
    )
    _, windows = heldout_windows(teacher.tokenizer, "novel", 256, 4)
    before = perplexity(student.model, windows)
    heal(student, teacher, HealConfig(tokens=2048, lr=5e-3), work_dir=tmp_path, progress=False)
    assert perplexity(student.model, windows) < 0.95 * before


@pytest.mark.integration
def test_heal_through_the_cli_writes_a_healed_miprun_output(tmp_path, tiny_tokenizer, capsys):
    """`miprun prune` then `miprun heal`: a stock checkpoint of the pruned shape, the heal recorded in
    miprun.json and the model card, and a plan that apply_plan refuses to replay."""
    import json

    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    import miprun
    from miprun.cli import main

    dense = tmp_path / "dense"
    tiny_model("llama")[0].save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    calib = ["--calib", str(CALIBRATION_TXT)]
    pruned, healed = tmp_path / "pruned", tmp_path / "healed"
    assert (
        main(
            [
                "prune",
                "--model",
                str(dense),
                "-n",
                "2",
                "--out",
                str(pruned),
                *calib,
                "--samples",
                "4",
                "--seq-len",
                "24",
                "-q",
            ]
        )
        == 0
    )
    args = ["heal", "--model", str(pruned), "--out", str(healed), *calib, "--tokens", "96", "--seq-len", "24"]
    assert (
        main(
            [
                *args,
                "--batch-size",
                "2",
                "--eval",
                "--eval-text",
                str(CALIBRATION_TXT),
                "--eval-seq-len",
                "24",
                "-q",
            ]
        )
        == 0
    )
    plan = json.loads((healed / "miprun.json").read_text())
    assert plan["heal"]["teacher"] == str(dense) and plan["heal"]["steps"] == 2
    assert (
        plan["heal"]["evaluation"]["healed_ppl"] > 0
        and plan["removed"] == json.loads((pruned / "miprun.json").read_text())["removed"]
    )
    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(healed)
    assert [(n, p.shape) for n, p in after.named_parameters()] == [
        (n, p.shape) for n, p in before.named_parameters()
    ]
    assert not all(torch.equal(a, b) for a, b in zip(after.parameters(), before.parameters(), strict=True))
    assert "heal" in ModelCard.load(healed / "README.md").text
    assert not any(
        p.name.endswith(".heal-work") for p in tmp_path.iterdir()
    )  # the finished run's checkpoint is gone
    with pytest.raises(ValueError, match="was healed"):
        miprun.apply_plan(tiny_model("llama")[0], healed / "miprun.json")
    capsys.readouterr()
    assert main(["show", str(healed)]) == 0  # `miprun show` reads the heal back from the manifest
    squeezed = "".join(capsys.readouterr().out.split())  # rich may wrap a long teacher path anywhere
    evaluation = plan["heal"]["evaluation"]
    assert (
        f"healedtoward{dense}".replace(" ", "") in squeezed and f"{evaluation['healed_ppl']:.2f}" in squeezed
    )


@pytest.mark.integration
def test_a_work_dir_inside_the_output_is_refused_before_training(tmp_path, tiny_tokenizer, monkeypatch):
    """`heal --work-dir h --out h` trained fully, then refused to save (issue #19)."""
    import miprun
    from miprun.api import heal as heal_folder

    dense = tmp_path / "dense"  # a folder, so that the teacher loads (as heal does) without the hub
    tiny_model("llama")[0].save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    calibration = {"source": str(CALIBRATION_TXT), "samples": 4, "seq_len": 24}
    miprun.prune(
        str(dense), num_blocks=2, **calibration, cache=False, out=tmp_path / "pruned", progress=False
    )
    monkeypatch.setattr(
        heal_module, "heal", lambda *a, **k: pytest.fail("trained before checking --work-dir")
    )
    for work_dir in (tmp_path / "h", tmp_path / "h" / "checkpoints"):
        with pytest.raises(InvalidOptionError, match=r"is or lies inside --out"):
            heal_folder(tmp_path / "pruned", out=tmp_path / "h", work_dir=str(work_dir), progress=False)
    assert not (tmp_path / "h").exists()


def _edit_removed(folder: Path, removed: Any) -> None:
    manifest = json.loads((folder / "miprun.json").read_text())
    (folder / "miprun.json").write_text(json.dumps({**manifest, "removed": removed}))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda f, m: _edit_removed(f, [0, 5]),
            r"says block 0 of the model beside it is block 1 of the dense",
        ),
        (lambda f, m: _edit_removed(f, "1,2"), r"removed is '1,2', expected a list of block indices"),
        (lambda f, m: _edit_removed(f, [1, 2, 3]), r"3 = 3 blocks remain, but the model beside it has 4"),
        (lambda f, m: m.save_pretrained(f), r"2 = 4 blocks remain, but the model beside it has 3"),
    ],
    ids=["removed-changed", "removed-not-a-list", "removed-longer", "fewer-layers"],
)
def test_heal_refuses_a_manifest_that_disagrees_with_the_weights(
    tmp_path, tiny_tokenizer, monkeypatch, edit, message
):
    """heal ran to exit 0 on an edited miprun.json and wrote a manifest that disagreed with the weights."""
    from tiny_models import tiny_variant

    import miprun
    from miprun.api import heal as heal_folder
    from miprun.errors import ScoresError

    dense = tmp_path / "dense"
    tiny_model("llama")[0].save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    pruned = tmp_path / "pruned"
    calibration = {"source": str(CALIBRATION_TXT), "samples": 4, "seq_len": 24}
    result = miprun.prune(
        str(dense), num_blocks=2, method="last-n", **calibration, cache=False, out=pruned, progress=False
    )
    assert result.plan.removed == [3, 4]  # last-n: the deepest blocks but the final one
    edit(pruned, tiny_variant("llama", 3, 64))
    monkeypatch.setattr(
        heal_module, "heal", lambda *a, **k: pytest.fail("trained on an inconsistent manifest")
    )
    with pytest.raises(ScoresError, match=message):
        heal_folder(pruned, out=tmp_path / "healed", progress=False)
    assert not (tmp_path / "healed").exists()


@pytest.mark.integration
def test_heal_through_the_cli_on_cached_teacher_targets(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """`miprun heal --teacher-topk K`: the teacher runs once for the targets (and the dense perplexity), then
    the student trains alone; the output records K and the work folder goes once the run is saved."""
    import miprun
    from miprun.cli import main

    dense = tmp_path / "dense"
    tiny_model("llama")[0].save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    calib = ["--calib", str(CALIBRATION_TXT)]
    miprun.prune(
        str(dense),
        num_blocks=2,
        method="mi-prun",
        repair="none",
        source=str(CALIBRATION_TXT),
        samples=4,
        seq_len=24,
        cache=False,
        out=tmp_path / "pruned",
        progress=False,
    )  # fmt: skip  (the cut alone: on a random tiny model a repaired cut can beat the dense model's perplexity)
    args = ["heal", "--model", str(tmp_path / "pruned"), "--out", str(tmp_path / "healed"), *calib]
    args += ["--tokens", "96", "--seq-len", "24", "--batch-size", "2", "--teacher-topk", "16", "--eval"]
    assert main([*args, "--eval-text", str(CALIBRATION_TXT), "--eval-seq-len", "24", "-q"]) == 0
    healed = json.loads((tmp_path / "healed" / "miprun.json").read_text())["heal"]
    assert healed["config"]["teacher_topk"] == 16 and healed["steps"] == 2
    assert healed["teacher"] == str(dense)
    ev = healed["evaluation"]
    assert ev["dense_ppl"] < ev["pruned_ppl"] and ev["healed_ppl"] > 0
    assert not list(tmp_path.glob(".*.heal-work"))  # checkpoints and cached targets removed after the save
