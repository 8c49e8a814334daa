"""Benchmark: the greedy decode loop is real generation, the report has every figure, and the CLI runs it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_model

from miprun.cli import main
from miprun.errors import InvalidOptionError, InvalidTypeError
from miprun.evaluation.bench import BenchConfig, bench, cache_bytes, greedy_decode, weight_bytes
from miprun.model.loading import LoadedModel
from miprun.model.surgery import remove_blocks

SMALL = BenchConfig(prompt_len=12, new_tokens=4, batch_sizes=[1, 3], warmup=1, repeats=3)


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.integration
def test_greedy_decode_matches_generate(arch):
    model, _ = tiny_model(arch)
    prompt = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens, cache = greedy_decode(model, prompt, 6)
    with torch.no_grad():
        expected = model.generate(
            prompt, max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(tokens, expected[:, 9:])
    assert cache_bytes(cache) > 0


@pytest.mark.integration
def test_cache_and_weight_bytes_known_answers():
    model, _ = tiny_model("llama")  # 6 layers, 2 kv heads of 16 dims, fp32
    _, cache = greedy_decode(model, torch.randint(3, 128, (3, 10)), 5)
    # keys and values, 6 layers, batch 3, 2 heads, 14 positions (10 prompt + 4 fed back), 16 dims, 4 bytes
    assert cache_bytes(cache) == 2 * 6 * 3 * 2 * 14 * 16 * 4
    expected = sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert weight_bytes(model) == expected
    assert cache_bytes(object()) is None


@pytest.mark.integration
def test_bench_pruned_against_dense(tiny_tokenizer):
    dense = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "dense", None)
    pruned_model = remove_blocks(tiny_model("llama")[0], [2])
    pruned = LoadedModel(pruned_model, tiny_tokenizer, "pruned", None)
    result = bench(pruned, against=dense, config=SMALL)
    assert result["device"] == "cpu" and result["config"]["batch_sizes"] == [1, 3]
    for run, blocks in ((result["model"], 5), (result["dense"], 6)):
        assert run["num_blocks"] == blocks
        assert _positive(run["prefill_ms"]) and _positive(run["prefill_tokens_per_s"])
        assert set(run["decode_tokens_per_s"]) == {"1", "3"}
        assert all(_positive(v) for v in run["decode_tokens_per_s"].values())
        assert all(len(v) == SMALL.repeats for v in run["times_s"].values())  # warm-up rounds not kept
    ratios = result["ratios"]
    assert ratios["ideal_layer_ratio"] == pytest.approx(6 / 5)
    assert 0 < ratios["parameter_ratio"] < 1 and 0 < ratios["weights_bytes_ratio"] < 1
    assert _positive(ratios["prefill_speedup"]) and all(
        _positive(v) for v in ratios["decode_speedup"].values()
    )
    # the KV cache of 5 layers is exactly 5/6 of the one of 6 layers
    for b in ("1", "3"):
        kv_pruned = result["model"]["memory"]["kv_cache_bytes"][b]
        assert kv_pruned * 6 == result["dense"]["memory"]["kv_cache_bytes"][b] * 5
    assert json.loads(json.dumps(result)) == result  # JSON-able as is


@pytest.mark.integration
def test_bench_rejects_a_bad_config_before_running(tiny_tokenizer, monkeypatch):
    import miprun.evaluation.bench as bench_module

    with pytest.raises(InvalidOptionError, match=r"new_tokens \(--new-tokens\) must be at least 1, got 0"):
        BenchConfig(new_tokens=0)
    with pytest.raises(
        InvalidOptionError, match=r"batch_sizes \(--batch-sizes\) must be positive integers, got \[1, 0\]"
    ):
        BenchConfig(batch_sizes=[1, 0])
    with pytest.raises(InvalidOptionError, match="must be positive integers, got \\[\\]"):
        BenchConfig(batch_sizes=[])
    with pytest.raises(InvalidTypeError, match=r"batch_sizes \(--batch-sizes\) must be list"):
        BenchConfig(batch_sizes=(1, 3))
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "m", None)
    monkeypatch.setattr(bench_module, "_Runner", lambda *a, **k: pytest.fail("measured despite a bad option"))
    with pytest.raises(InvalidOptionError, match=r"repeats \(--repeats\) must be at least 1, got 0"):
        bench(lm, repeats=0)  # flat names reach the config group
    with pytest.raises(
        InvalidOptionError, match=r"unknown option 'repeat' for BenchOptions\. Did you mean 'repeats'"
    ):
        bench(lm, repeat=2)


@pytest.mark.integration
def test_bench_refuses_a_prompt_and_decode_beyond_the_positions(tiny_tokenizer, monkeypatch):
    """`--prompt-len 100000` hung, `--new-tokens` past the positions was accepted (issue #19)."""
    import miprun.evaluation.bench as bench_module

    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "m", None)  # 128 positions
    monkeypatch.setattr(bench_module, "_Runner", lambda *a, **k: pytest.fail("measured beyond the positions"))
    with pytest.raises(
        InvalidOptionError, match=r"--prompt-len 100000 plus --new-tokens 32 is 100032 positions"
    ):
        bench(lm, prompt_len=100000)
    with pytest.raises(InvalidOptionError, match=r"more than the 128 positions m was built for"):
        bench(lm, prompt_len=100, new_tokens=29)


@pytest.mark.integration
def test_bench_refuses_batch_sizes_whose_kv_cache_cannot_fit(tiny_tokenizer, monkeypatch):
    """`--batch-sizes 100000` was accepted (issue #19), then swapped or crashed."""
    import miprun.evaluation.bench as bench_module

    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "m", None)
    monkeypatch.setattr(bench_module, "free_memory", lambda device: 2**30, raising=False)
    monkeypatch.setattr(
        bench_module, "_Runner", lambda *a, **k: pytest.fail("measured a batch that cannot fit")
    )
    with pytest.raises(
        InvalidOptionError, match=r"--batch-sizes 100000 needs about 1.4 GiB for the KV cache of m"
    ):
        bench(lm, prompt_len=8, new_tokens=2, batch_sizes=[1, 100000])
    # 6 layers x 2 KV heads x 16 dims x 2 (K, V) x 4 bytes = 1536 bytes per position
    assert bench_module.kv_cache_estimate(lm.model, 10, 100) == 1536 * 1000


@pytest.mark.integration
def test_bench_flat_overrides_reach_the_config(tiny_tokenizer):
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "m", None)
    result = bench(lm, prompt_len=6, new_tokens=2, batch_sizes=[2], warmup=0, repeats=1)
    assert result["config"] == {
        "prompt_len": 6,
        "new_tokens": 2,
        "batch_sizes": [2],
        "warmup": 0,
        "repeats": 1,
        "seed": 0,
    }
    assert set(result["model"]["decode_tokens_per_s"]) == {"2"} and "dense" not in result
    assert [len(v) for v in result["model"]["times_s"].values()] == [1, 1]


@pytest.mark.integration
def test_bench_through_the_cli(tiny_tokenizer, tmp_path, capsys):
    folders = {}
    for name, removed in (("dense", []), ("pruned", [1, 4])):
        model, _ = tiny_model("llama")
        if removed:
            remove_blocks(model, removed)
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tiny_tokenizer.save_pretrained(folders[name])
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--model",
        str(folders["pruned"]),
        "--against",
        str(folders["dense"]),
        "--prompt-len",
        "8",
    ]
    args += ["--new-tokens", "3", "--batch-sizes", "1,2", "--repeats", "2", "--json", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ideal layer ratio" in printed and "decode batch 2" in printed
    data = json.loads(out.read_text())
    assert data["ratios"]["ideal_layer_ratio"] == pytest.approx(1.5)
    assert data["model"]["path"] == str(folders["pruned"]) and data["dense"]["num_blocks"] == 6
    capsys.readouterr()
    for flags, message in (
        (["--batch-sizes", "1,x"], "expected whole numbers like 3,6,9, got 'x'"),
        (["--batch-sizes", "0"], "batch_sizes (--batch-sizes) must be positive integers, got [0]"),
        (["--repeats", "0"], "'--repeats'"),
    ):
        # a bad value on the command line is a usage error (exit 2) naming it, before any model is loaded
        assert main(["bench", "--model", str(tmp_path / "not-there"), *flags, "-q"]) == 2, flags
        assert message in capsys.readouterr().err
