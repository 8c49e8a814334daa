"""The model card: written to README.md, read back with huggingface_hub's own parser."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from miprun.output.card import (
    Calibration,
    CardFacts,
    OutputFile,
    Result,
    hub_id,
    model_card,
    source_license,
    write_model_card,
)


def _facts(**changes: object) -> CardFacts:
    facts = dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        layers_before=30,
        removed=[17, 12, 14],
        method="mi-fast-block-select",
        estimator="knn",
        estimator_params={"k": 5},
        license="apache-2.0",
        calibration=Calibration(source="calibration.txt", windows=32, seq_len=256, tokens=8192),
        results=(
            Result("held-out text", "perplexity", pruned=31.2, dense=22.5, lower_is_better=True),
            Result("hellaswag", "acc_norm", pruned=0.38, dense=0.42),
        ),
        files=(OutputFile("model.safetensors"),),
    )
    facts.update(changes)
    return CardFacts(**facts)  # type: ignore[arg-type]


def test_card_round_trips_through_huggingface_hub(tmp_path: Path) -> None:
    path = write_model_card(tmp_path, _facts())

    card = ModelCard.load(path)
    assert path == tmp_path / "README.md"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["pruned", "miprun", "depth-pruning"]
    assert "Removed blocks** (0-based, original numbering): 12, 14, 17" in card.text
    assert "30 -> 27" in card.text
    assert "`knn` (k=5)" in card.text
    assert "32 windows x 256 tokens (8,192 tokens)" in card.text
    assert "| held-out text | perplexity (lower is better) | 22.5 | 31.2 | +38.7% |" in card.text
    assert "| hellaswag | acc_norm | 0.42 | 0.38 | -9.5% |" in card.text
    assert "hf upload ORG/NAME ." in card.text
    assert "llama-cli" not in card.text
    assert not [p for p in tmp_path.iterdir() if p.name != "README.md"]  # no temporary file left behind


def test_gguf_output_adds_the_tag_its_types_and_a_llama_cpp_snippet(tmp_path: Path) -> None:
    files = (OutputFile("model.gguf", {"Q4_1": 189, "F32": 55, "Q8_0": 1}),)
    card = ModelCard.load(write_model_card(tmp_path, _facts(files=files, results=())))

    assert card.data.tags == ["pruned", "miprun", "depth-pruning", "gguf"]
    assert "`model.gguf`: tensor types Q4_1 x189, F32 x55, Q8_0 x1" in card.text
    assert "llama-cli -m model.gguf" in card.text
    assert 'from_pretrained("ORG/NAME", gguf_file="model.gguf")' in card.text
    assert "## Results" not in card.text


def test_local_or_embedded_base_model_sets_no_base_model(tmp_path: Path) -> None:
    (tmp_path / "org").mkdir()
    for base in (str(tmp_path), "smollm2-135m", "org"):
        card = model_card(_facts(base_model=base))
        assert card.data.base_model is None, base
        assert f"`{base}`" in card.text
    assert hub_id("org/name") == "org/name"
    assert hub_id("../org/name") is None


def test_license_is_carried_over_from_the_source_readme(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    assert source_license(source) is None
    ModelCard(f"---\n{ModelCardData(license='llama3.2').to_yaml()}\n---\n\n# Base\n").save(
        source / "README.md"
    )

    license = source_license(source)
    card = ModelCard.load(write_model_card(tmp_path, _facts(base_model=str(source), license=license)))

    assert license == "llama3.2"
    assert card.data.license == "llama3.2"
    assert card.data.base_model is None


def test_card_without_estimator_repair_or_calibration_says_so(tmp_path: Path) -> None:
    card = model_card(_facts(estimator=None, calibration=None, license=None, results=()))
    assert "reads no estimator" in card.text
    assert "reads no calibration text" in card.text
    assert "Repair**: none" in card.text
    assert card.data.license is None

    repaired = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(10)]
    card = model_card(_facts(repair="least-squares", repaired=repaired))
    assert "`least-squares`, which changed `model.layers.0.mlp.down_proj.weight`" in card.text
    assert "and 2 more" in card.text


def test_results_become_the_hubs_model_index_without_intermediate_ones(tmp_path: Path) -> None:
    results = (
        Result("held-out text (heldout.txt, 16 x 256 tokens)", "perplexity", 31.2, 22.5, True),
        Result(
            "held-out text (heldout.txt, 16 x 256 tokens), cut before repair",
            "perplexity",
            40.0,
            22.5,
            True,
            False,
        ),
    )
    card = ModelCard.load(write_model_card(tmp_path, _facts(results=results)))
    (only,) = card.data.eval_results
    assert (only.metric_type, only.metric_value, only.task_type) == ("perplexity", 31.2, "text-generation")
    assert only.dataset_name == "held-out text (heldout.txt, 16 x 256 tokens)"
    assert card.data.model_name == "SmolLM2-135M-Instruct pruned to 27 blocks"
    assert "cut before repair" in card.text  # still in the readable table
    assert ModelCard.load(write_model_card(tmp_path, _facts(results=()))).data.eval_results is None


def test_base_model_is_named_for_embedded_models_and_configs_that_name_one(
    tmp_path: Path, monkeypatch
) -> None:
    import json

    from miprun.assets import cache_dir
    from miprun.model.loading import LoadedModel
    from miprun.output.save import base_model_id

    monkeypatch.setenv("MIPRUN_CACHE", str(tmp_path / "cache"))

    def loaded(name: str, path: Path | None = None) -> LoadedModel:
        return LoadedModel(model=None, tokenizer=None, name=name, path=None if path is None else str(path))

    embedded_folder = cache_dir() / "models" / "gemma3-270m"
    embedded_folder.mkdir(parents=True)
    assert base_model_id(loaded("smollm2-135m", cache_dir() / "models" / "smollm2-135m")) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert base_model_id(loaded(str(embedded_folder), embedded_folder)) == "google/gemma-3-270m"
    assert base_model_id(loaded("Qwen/Qwen2.5-0.5B")) == "Qwen/Qwen2.5-0.5B"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert base_model_id(loaded(str(folder), folder)) == "meta-llama/Llama-3.2-1B"
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/llama"}))
    assert base_model_id(loaded(str(folder), folder)) is None
    card = model_card(_facts(base_model=str(folder), base_model_id="meta-llama/Llama-3.2-1B"))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
