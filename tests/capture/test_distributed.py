"""Data-parallel calibration: two gloo ranks on the CPU end with one process's statistics and blocks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import CALIBRATION_TXT
from helpers import assert_same_stats
from tiny_models import tiny_model

from miprun.capture.batches import share_range
from miprun.capture.distributed import merge_stats
from miprun.capture.engine import capture
from miprun.capture.statistic import CapturedStats, Tap
from miprun.capture.statistics import CoordinateMoments, CosineSums, LinearFitSums, Moments, TokenSample
from miprun.capture.statistics.moments import recentre
from miprun.options import CalibrationConfig

WINDOWS = torch.randint(3, 128, (7, 12), generator=torch.Generator().manual_seed(0))
SPEC = [
    Moments(proj_dim=16),
    TokenSample(capacity=40),
    CosineSums(),
    CoordinateMoments(),
    LinearFitSums(Tap(block=2, role="mlp"), base=3, target=5),
]
CAL = CalibrationConfig(batch_size=2, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_shares_cover_the_windows_once_in_order():
    for n, p in [(7, 2), (8, 3), (5, 5), (100, 7)]:
        ranges = [share_range(n, (r, p)) for r in range(p)]
        assert [i for r in ranges for i in r] == list(range(n))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="outside"):
        share_range(4, (2, 2))


@pytest.mark.parametrize("ndim", [1, 2])
def test_recentring_is_exact(ndim):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, *([3, 4] if ndim == 2 else [6]), generator=gen, dtype=torch.float64) + 5.0
    old, new = z[:10].mean(0), z[10:20].mean(0)

    def sums(shift):
        zc = z - shift
        pair = zc.unsqueeze(2) * zc.unsqueeze(1)  # (n, D, D) outer, or (n, S, S, d) per coordinate
        return zc.sum(0), pair.sum(0)

    total, second = sums(old)
    want_total, want_second = sums(new)
    got_total, got_second = recentre(len(z), total, second, old, new)
    assert torch.allclose(got_total, want_total, atol=1e-10)
    assert torch.allclose(got_second, want_second, atol=1e-9)


def test_merge_is_a_no_op_in_one_process():
    stats = CapturedStats(num_blocks=1, hidden_size=2, statistics=[Moments(2)])
    assert merge_stats(stats) is stats


def _prune_args(model: Path, out: Path) -> list[str]:
    args = ["prune", "--model", str(model), "--calib", str(CALIBRATION_TXT), "-n", "2", "--out", str(out)]
    args += [
        "--samples",
        "6",
        "--seq-len",
        "24",
        "--batch-size",
        "2",
        "--estimator",
        "gaussian",
        "--est-opt",
        "proj_dim=16",
    ]
    return [*args, "--method", "mi-optimal", "--no-cache", "--quiet", "--device", "cpu"]


def _rank_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One rank, as torchrun would start it: merge captured shares, then run `miprun prune` as a rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(HF_HUB_OFFLINE="1", MIPRUN_CACHE=str(Path(folder) / "cache"))
    torch.set_num_threads(1)
    from accelerate import PartialState

    from miprun.capture import distributed
    from miprun.cli import main

    PartialState._reset_state()  # forked from a process that may have made its own single-process state
    assert distributed.is_distributed() and distributed.share(len(WINDOWS)) == (rank, world)
    model, _ = tiny_model("qwen2")
    share = distributed.share(len(WINDOWS))
    stats = capture(model, WINDOWS, SPEC, CAL, share=share, progress=False)
    torch.save(merge_stats(stats), Path(folder) / f"rank{rank}.pt")
    code = main(_prune_args(Path(folder) / "model", Path(folder) / "dp"))
    (Path(folder) / f"rank{rank}.rc").write_text(str(code))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run two gloo ranks once (a few seconds of process start-up) for the tests below."""
    from conftest import train_tiny_tokenizer

    folder = tmp_path_factory.mktemp("dp")
    tiny_model("llama")[0].save_pretrained(folder / "model")
    train_tiny_tokenizer().save_pretrained(folder / "model")
    # fork: the ranks start with torch and transformers already imported (spawning re-imports them: slow)
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(folder)), nprocs=2, start_method="fork")
    return folder


@pytest.mark.integration
def test_two_ranks_merge_to_the_single_process_statistics(two_ranks):
    a, b = (torch.load(two_ranks / f"rank{r}.pt", weights_only=False) for r in range(2))
    single = capture(tiny_model("qwen2")[0], WINDOWS, SPEC, CAL, progress=False)
    assert a.num_tokens == b.num_tokens == single.num_tokens == WINDOWS.numel()
    assert_same_stats(a, b, exact=True)  # every rank holds bit-identical merged statistics
    # ... equal to one process's up to the float32 rounding of each batch's products (other shifts)
    moments = [x.get(Moments(proj_dim=16)) for x in (a, single)]
    for s, t in [(0, 1), (2, 6), (0, 6)]:
        assert torch.allclose(moments[0].covariance(s, t), moments[1].covariance(s, t), rtol=1e-5, atol=1e-5)
    coords = [x.get(CoordinateMoments()) for x in (a, single)]
    for got, want in zip(coords[0].moments(1, 4), coords[1].moments(1, 4), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    cosines = [x.get(CosineSums()) for x in (a, single)]
    assert cosines[0].count == cosines[1].count
    assert torch.allclose(cosines[0].cos, cosines[1].cos, rtol=1e-9, atol=1e-9)
    assert torch.allclose(cosines[0].angle, cosines[1].angle, rtol=1e-9, atol=1e-9)
    fits = [x.get(SPEC[-1]) for x in (a, single)]
    assert fits[0].count == fits[1].count == WINDOWS.numel()
    assert torch.allclose(fits[0].xtx, fits[1].xtx, rtol=1e-9) and torch.allclose(
        fits[0].xtd, fits[1].xtd, rtol=1e-9
    )
    # the global seeded token sample, in the single-process order
    samples = [x.get(TokenSample(capacity=40)) for x in (a, single)]
    assert samples[0].count == samples[1].count == 40
    for s in range(single.num_states):
        assert torch.allclose(samples[0].state(s), samples[1].state(s), atol=1e-6)


@pytest.mark.integration
def test_data_parallel_prune_selects_the_blocks_of_one_process(two_ranks, tmp_path):
    from miprun.cli import main

    assert [(two_ranks / f"rank{r}.rc").read_text() for r in range(2)] == ["0", "0"]  # no clash on --out
    assert main(_prune_args(two_ranks / "model", tmp_path / "single")) == 0
    one = json.loads((tmp_path / "single" / "miprun.json").read_text())
    two = json.loads((two_ranks / "dp" / "miprun.json").read_text())
    assert two["removed"] == one["removed"]
    assert two["calibration"]["tokens"] == one["calibration"]["tokens"] == 6 * 24
    spans = {(s["first"], s["last"]): s for s in one["scores"]["spans"]}
    assert len(two["scores"]["spans"]) == len(spans) == 21
    for s in two["scores"]["spans"]:
        ref = spans[(s["first"], s["last"])]
        assert s["nmi"] == pytest.approx(ref["nmi"], rel=1e-5, abs=1e-7)
        assert s["mi"] == pytest.approx(ref["mi"], rel=1e-5, abs=1e-7)
