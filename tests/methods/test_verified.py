"""mi-verified: candidates from span MI, measured by the model from cached dense states; the best wins."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import CALIBRATION_TXT
from tiny_models import tiny_model

import miprun
from miprun.capture.replay import BoundaryCache, layers_run, logits_from
from miprun.methods.candidates import k_best_sets, propose, shifted
from miprun.methods.ledger import Ledger
from miprun.methods.search import brute_force_select, set_loss
from miprun.methods.targets import coarse_kl
from miprun.methods.verified import Verifier, auto_stride
from miprun.model.layouts import decoder_layers
from miprun.model.loading import LoadedModel
from miprun.model.surgery import remove_blocks
from miprun.options import CalibrationConfig

WINDOWS = torch.randint(3, 120, (6, 16), generator=torch.Generator().manual_seed(0))
CAL = CalibrationConfig(source=str(CALIBRATION_TXT), samples=6, seq_len=24, batch_size=2)


def span_nmi_table(total: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    table = {(a, b): float(torch.rand(1, generator=gen)) for a in range(total) for b in range(a, total)}
    return lambda a, b: table[(a, b)]


@pytest.mark.parametrize(("total", "n", "k"), [(6, 2, 5), (7, 3, 10), (8, 4, 12)])
def test_k_best_sets_are_the_k_best_by_brute_force(total, n, k):
    nmi = span_nmi_table(total, seed=total)
    everything = sorted((set_loss(c, nmi), list(c)) for c in itertools.combinations(range(total), n))
    got = k_best_sets(total, n, nmi, k)
    assert [s for _, s in got] == [s for _, s in everything[:k]]
    assert all(abs(a - b) < 1e-12 for (a, _), (b, _) in zip(got, everything[:k], strict=True))
    assert got[0][1] == brute_force_select(total, n, nmi).removed


def test_proposals_are_the_seeds_all_k_best_and_the_neighbours_of_the_best_few():
    nmi = span_nmi_table(10, seed=3)
    seeds = [[0, 5, 9], [1, 2, 3], [4, 6, 8], [0, 1, 2]]
    sets = propose(10, 3, nmi, 8, seeds=seeds)
    best = [s for _, s in k_best_sets(10, 3, nmi, 8)]
    near = {tuple(m) for s in best[:2] for m in shifted(s, 10)}  # 8 // 4 = 2 best sets' neighbours
    assert sets[:4] == seeds  # every seed, first
    assert all(s in sets for s in best)  # none of the 8 best is dropped for the seeds
    assert {tuple(s) for s in sets} == {tuple(s) for s in [*seeds, *best]} | near  # neighbours kept
    assert len({tuple(s) for s in sets}) == len(sets) and all(len(s) == 3 for s in sets)
    assert shifted([2, 3, 7], 10) == [[1, 2, 7], [3, 4, 7], [2, 3, 6], [2, 3, 8]]


def test_a_nan_or_infinite_measurement_never_wins():
    from miprun.errors import NonFiniteError
    from miprun.methods.verified import winner

    assert winner([math.nan, 2.0, 1.0], [0.0, 0.0, 0.0], "sets") == 2
    assert winner([math.inf, 3.0], [0.0, 1.0], "sets") == 1
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        winner([math.nan, math.inf], [0.0, 0.0], "sets")
    from miprun.methods.similarity import lowest

    assert lowest([math.nan, 1.0, 2.0], 2) == [1, 2]  # the one-pass rankings too


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("budget", [1 << 30, 1])  # every boundary cached, or one checkpoint only
def test_replaying_from_cached_states_equals_a_full_pass_of_the_pruned_model(arch, budget):
    model, _ = tiny_model(arch)
    cache = BoundaryCache(model, WINDOWS, budget, batch_size=4)
    assert len(cache.checkpoints) == (5 if budget > 1 else 1)
    for removed in ([3, 4], [1], [2, 5], [0, 3]):
        pruned = remove_blocks(copy.deepcopy(model), removed)
        with torch.no_grad():
            expected = pruned(input_ids=WINDOWS).logits
        got = torch.cat(list(logits_from(model, cache, removed, min(removed))))
        assert torch.allclose(got, expected, atol=1e-5), removed
        at = torch.tensor([2, 7, 15])  # the output layer on a few positions only
        some = torch.cat(list(logits_from(model, cache, removed, min(removed), positions=at)))
        assert torch.allclose(some, expected[:, at], atol=1e-5), removed
    with torch.no_grad():  # and the model itself is untouched
        assert torch.allclose(model(input_ids=WINDOWS).logits, tiny_model(arch)[0](input_ids=WINDOWS).logits)


def test_coarse_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 40, generator=gen), torch.randn(2, 5, 40, generator=gen)
    logp, logq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1).mean()
    for k in (40, 10):
        top = logp.topk(k, dim=-1)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
        value = coarse_kl(q_logits, top.values, top.indices, tail)
        assert value <= exact + 1e-5 and (k < 40 or abs(value - exact) < 1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("stride", [1, 3])  # every position, or the output layer on every third
@pytest.mark.parametrize("objective", ["kl", "nll"])
def test_the_verifier_measures_what_a_full_pass_of_the_pruned_model_gives(objective, stride):
    model, _ = tiny_model("qwen2")
    verifier = Verifier(
        model, WINDOWS, objective=objective, kl_topk=128, budget_bytes=1, batch_size=4, stride=stride
    )
    at = torch.arange(WINDOWS.shape[1] - 1, -1, -stride).flip(0)  # ends at the last position
    sets = [[4, 5], [1, 2], [0, 3]]
    measured = verifier.measure(sets)
    with torch.no_grad():
        dense = model(input_ids=WINDOWS).logits
        for removed, value in zip(sets, measured, strict=True):
            logits = remove_blocks(copy.deepcopy(model), removed)(input_ids=WINDOWS).logits
            if objective == "kl":
                logp, logq = dense[:, at].log_softmax(-1), logits[:, at].log_softmax(-1)
                direct = float((logp.exp() * (logp - logq)).sum(-1).mean())  # kl_topk = the vocabulary
            else:
                labelled = at[at < WINDOWS.shape[1] - 1]
                direct = float(
                    torch.nn.functional.cross_entropy(
                        logits[:, labelled].flatten(0, 1), WINDOWS[:, labelled + 1].flatten()
                    )
                )
            assert value == pytest.approx(direct, rel=1e-4, abs=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_cost_counts_the_output_layer_on_the_positions_it_scores(arch):
    from miprun.capture.replay import head_layers, layers_run

    model, _ = tiny_model(arch)
    head = head_layers(model)
    params = sum(p.numel() for p in decoder_layers(model).parameters()) / len(decoder_layers(model))
    assert head == pytest.approx(model.get_output_embeddings().weight.numel() / params)
    for stride, scored in ((1, 16), (4, 4)):
        verifier = Verifier(model, WINDOWS, kl_topk=8, budget_bytes=1 << 30, batch_size=4, stride=stride)
        verifier.measure([[1]])  # the cache pass first (body only), then the dense targets and one set
        before = verifier.layer_runs
        verifier.measure([[2, 3]])
        assert verifier.layer_runs - before == pytest.approx(layers_run(6, [2, 3], 2) + head * scored / 16)


@pytest.mark.integration
@pytest.mark.parametrize("repair", ["none", "linear"])
def test_mi_verified_picks_the_candidate_with_the_best_measured_objective(repair, tiny_tokenizer):
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="mi-verified",
        method_params={"candidates": 6, "tokens": 96},
        repair=repair,
        repair_params={"tokens": 0} if repair == "linear" else {},
        calibration=CAL,
        cache=False,
        progress=False,
    )
    record = result.plan.search.params
    candidates = record["candidates"]
    assert len(candidates) >= 6 and record["verification_tokens"] == 96
    best = min(candidates, key=lambda c: (c["measured"], c["mi_set_loss"]))
    assert result.plan.removed == best["removed"]
    assert record["fast_block_select"] == candidates[0]["removed"]  # Fast-Block-Select's set is measured too
    # and so are the one-pass baselines' choices, from the same capture pass
    assert set(record["proposed_by"]) == {"fast-block-select", "shortgpt", "angular", "angular-mean"}
    measured = [c["removed"] for c in candidates]
    assert all(s in measured for s in record["proposed_by"].values())
    assert sorted(c["mi_rank"] for c in candidates)[0] == 1
    assert record["verification_layer_passes"] > 0 and result.plan.search.num_evaluations == 6


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("budget", [1 << 30, 1])  # every boundary cached, or one checkpoint only
@pytest.mark.parametrize("copied", [False, True])  # its own dense pass, or the states of a boundary cache
def test_a_cut_cache_replays_the_cut_model_one_block_more_like_a_full_pass(arch, budget, copied):
    from miprun.capture.replay import CutCache

    model, _ = tiny_model(arch)
    dense = BoundaryCache(model, WINDOWS, budget, batch_size=4) if copied else None
    cut = CutCache(model, WINDOWS, budget, batch_size=4, dense=dense)
    assert cut.ran_dense is not copied
    for block in (3, 1, 2):  # ends with a run [1..3], so states enter removed blocks too
        for extra in (0, 4, 5):
            if extra in cut.removed or extra == block:
                continue
            removed = sorted({*cut.removed, extra})
            with torch.no_grad():
                expected = remove_blocks(copy.deepcopy(model), removed)(input_ids=WINDOWS).logits
            got = torch.cat(list(logits_from(model, cut, removed, extra)))
            assert torch.allclose(got, expected, atol=1e-5), (cut.removed, extra)
        cut.advance(model, block)
    assert cut.removed == [1, 2, 3]


@pytest.mark.integration
@pytest.mark.parametrize("repair", ["none", "linear"])
def test_mi_search_greedy_matches_a_plain_greedy_and_the_best_finalist_wins(repair, tiny_tokenizer):
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="mi-search",
        method_params={"candidates": 4, "tokens": 96, "width": 8},  # width >= kept blocks: an exact greedy
        repair=repair,
        repair_params={"tokens": 0} if repair == "linear" else {},
        calibration=CAL,
        cache=False,
        progress=False,
    )
    record = result.plan.search.params
    # the greedy, re-measuring every kept block at every step, is SLEB's greedy on the KL objective
    dense = tiny_model("llama")[0]  # prune cut lm.model in place
    verifier = Verifier(dense, _verification_windows(lm, 96), kl_topk=256, batch_size=CAL.batch_size)
    total = len(decoder_layers(dense))
    first = verifier.measure([[b] for b in range(total)], repaired=False)
    b1 = min(range(total), key=lambda b: (first[b], b))
    rest = [b for b in range(total) if b != b1]
    second = verifier.measure([sorted([b1, b]) for b in rest], repaired=False)
    b2 = rest[min(range(len(rest)), key=lambda i: (second[i], rest[i]))]
    assert [step["block"] for step in record["greedy"]] == [b1, b2]
    assert record["greedy"][1]["measured"] == pytest.approx(min(second), rel=1e-5)
    finalists = record["finalists"]
    assert any(f["greedy"] and f["removed"] == sorted([b1, b2]) for f in finalists)
    best = min(finalists, key=lambda f: f["measured"])
    assert result.plan.removed == best["removed"]
    if repair == "none":
        assert all(f["measured"] == f["cut"] for f in finalists)
    assert (
        record["greedy_layer_passes"] > 0
        and record["verification_layer_passes"] > record["greedy_layer_passes"]
    )
    # the cost by stage, counted from what each stage ran: the dense states (every layer) and targets (the last
    # block again, from its cached input, and the output layer), then each shortlist set from its first removed
    # block (every boundary is cached here)
    stages = record["passes_by_stage"]
    assert list(stages) == ["dense states and targets", "shortlist", "greedy", "swaps", "finalists"]
    assert sum(stages.values()) == pytest.approx(record["verification_layer_passes"])
    head = Verifier(dense, _verification_windows(lm, 96), stride=auto_stride(dense)).head_share
    assert stages["dense states and targets"] == pytest.approx((total + 1 + head) / total)
    shortlist = [c["removed"] for c in record["candidates"]]
    assert stages["shortlist"] == pytest.approx(
        sum(layers_run(total, s, min(s)) + head for s in shortlist) / total
    )
    # without a repair and without a screen the finalists keep the values they have: nothing to measure
    assert (stages["finalists"] == 0) == (repair == "none")


def _verification_windows(lm, tokens):
    from miprun.pipeline.scoring import calibration_windows

    _, windows = calibration_windows(lm, CAL)
    return windows[: max(1, math.ceil(tokens / windows.shape[1]))]


@pytest.mark.integration
def test_mi_search_continues_its_greedy_path_for_a_larger_n_and_reports_the_whole_paths_cost(tiny_tokenizer):
    from miprun.methods.searched import MiSearch

    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    windows = _verification_windows(lm, 96)
    alone = {}
    for n in (2, 3):  # each N on a verifier of its own: the reference
        verifier = Verifier(lm.model, windows, kl_topk=256, batch_size=CAL.batch_size)
        alone[n] = MiSearch(candidates=3, tokens=96).greedy(verifier, verifier, 6, n)
    shared = Verifier(lm.model, windows, kl_topk=256, batch_size=CAL.batch_size)
    method = MiSearch(candidates=3, tokens=96)
    two = method.greedy(shared, shared, 6, 2)
    runs_after_two = shared.layer_runs
    three = method.greedy(shared, shared, 6, 3)
    assert two == alone[2] and three[0] == alone[3][0] and three[1] == alone[3][1]
    assert three[2] == pytest.approx(alone[3][2])  # the whole path's cost, not the increment
    assert (shared.layer_runs - runs_after_two) / 6 < three[2] - two[2] + 1e-9  # only the increment ran


@pytest.mark.integration
def test_mi_search_swaps_are_measured_like_any_set_and_only_kept_while_they_help(tiny_tokenizer):
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="mi-search",
        method_params={"candidates": 2, "tokens": 96, "swap_rounds": 2, "budget": 0},
        calibration=CAL,
        cache=False,
        progress=False,
    )
    record = result.plan.search.params
    dense = tiny_model("llama")[0]
    verifier = Verifier(dense, _verification_windows(lm, 96), kl_topk=256, batch_size=CAL.batch_size)
    for i, swap in enumerate(record["swaps"]):
        assert swap["measured"] == pytest.approx(
            verifier.measure([swap["best"]], repaired=False)[0], rel=1e-5
        )
        if i + 1 < len(record["swaps"]):  # a round is followed by another only if its swap was taken
            assert record["swaps"][i + 1]["from"] == swap["best"]
    best_cut = min(f["cut"] for f in record["finalists"])
    assert all(swap["measured"] >= best_cut - 1e-12 for swap in record["swaps"])  # the best made the final


@pytest.mark.integration
def test_mi_search_ranks_its_swaps_on_the_probe_and_measures_only_the_best_few_on_the_screen(tiny_tokenizer):
    params = {
        "candidates": 2,
        "tokens": 96,
        "screen_tokens": 96,
        "probe_tokens": 24,
        "finalists": 1,
        "budget": 0,
    }
    lm = lm_of(tiny_tokenizer)
    record = search_record(lm, params)
    dense = tiny_model("llama")[0]
    screen = Verifier(dense, _verification_windows(lm, 96), kl_topk=256, batch_size=CAL.batch_size)
    assert record["swaps"]
    for swap in record["swaps"]:
        assert swap["probed"] >= 1 and swap["tried"] <= 1  # the probe's best trial alone reaches the screen
        assert swap["measured"] == pytest.approx(screen.measure([swap["best"]], repaired=False)[0], rel=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("objective", ["kl", "nll"])
def test_a_verifier_on_the_first_windows_of_another_reuses_its_dense_states_and_measures_the_same(objective):
    """A prefix verifier (mi-search's screen and probe) slices its parent's states and targets: no dense pass
    of its own, and every measurement equals that of a verifier built on those windows alone."""
    model, _ = tiny_model("qwen2")
    parent = Verifier(model, WINDOWS, objective=objective, kl_topk=64, batch_size=4, stride=2)
    sets = [[4, 5], [1, 2], [0, 3], [2]]
    for rows in (1, 3, 4):  # inside the first batch, across a batch boundary, on it
        alone = Verifier(model, WINDOWS[:rows], objective=objective, kl_topk=64, batch_size=4, stride=2)
        part = Verifier(
            model, WINDOWS[:rows], objective=objective, kl_topk=64, batch_size=4, stride=2, parent=parent
        )
        assert part.measure(sets) == pytest.approx(alone.measure(sets), rel=1e-6, abs=1e-9)
        assert part.setup_runs == 0 and alone.setup_runs > 0
        assert part.layer_runs == pytest.approx(alone.layer_runs - alone.setup_runs)
    assert parent.setup_runs > 0  # prepared once, by the first prefix


@pytest.mark.integration
def test_a_choice_reusing_the_verifiers_dense_states_still_counts_them_in_its_cost():
    """Every N of a compare reuses one verifier: each N's cost is what it would cost alone."""
    model, _ = tiny_model("llama")
    verifier = Verifier(model, WINDOWS, batch_size=4)
    first = Ledger([verifier], 6)
    with first.stage("measure"):
        verifier.measure([[1, 2], [3]], repaired=False)
    assert verifier.setup_runs > 0 and first.passes() == pytest.approx(verifier.layer_runs / 6)
    again = Ledger([verifier], 6)
    with again.stage("measure"):
        verifier.measure([[1, 2], [3]], repaired=False)
    assert again.by_stage() == pytest.approx(first.by_stage())


@pytest.mark.integration
def test_a_verifiers_planned_cost_is_what_measuring_then_costs():
    """What a budget weighs before it spends: the layer runs measuring sets adds, the dense states and targets
    included the first time (and a prefix at another stride paying its own targets)."""
    model, _ = tiny_model("llama")
    parent = Verifier(model, WINDOWS, batch_size=4, stride=2)
    finals = replace(parent, windows=WINDOWS[:3], stride=1, parent=parent)
    for verifier, sets in ((parent, [[1, 2], [3]]), (parent, [[0], [4, 5]]), (finals, [[2, 3]])):
        planned, before = verifier.planned_runs(sets), verifier.layer_runs
        verifier.measure(sets, repaired=False)
        assert verifier.layer_runs - before == pytest.approx(planned)
    assert finals.setup_runs > 0  # its own targets, planned


@pytest.mark.integration
def test_a_ledger_counts_the_stage_still_running():
    """A budget weighed inside a stage (the swaps' second round) sees what that stage spent so far: the passes
    grow with each measurement inside it, and closing it changes nothing (it was left out before, so a second
    round could overspend the budget)."""
    model, _ = tiny_model("llama")
    parent = Verifier(model, WINDOWS, batch_size=4)
    probe = replace(parent, windows=WINDOWS[:2], parent=parent)
    ledger = Ledger([parent, probe], num_blocks=6)
    with ledger.stage("swaps"):
        probe.measure([[1, 2]], repaired=False)
        first = ledger.passes()
        assert ledger.by_stage()["swaps"] > 0
        probe.measure([[3, 4]], repaired=False)
        second = ledger.passes()
        assert second > first
    assert ledger.passes() == pytest.approx(second)
    planned = ledger.planned(parent, [[0, 5]])
    with ledger.stage("swaps"):  # a stage entered again adds to itself
        parent.measure([[0, 5]], repaired=False)
        assert ledger.passes() == pytest.approx(second + planned)
    assert ledger.by_stage()["swaps"] == pytest.approx(
        second + planned - ledger.by_stage()["dense states and targets"]
    )


@pytest.mark.integration
def test_mi_search_screens_on_a_prefix_of_its_tokens_and_judges_its_finalists_on_all(tiny_tokenizer):
    """The shortlist, greedy and swaps run on the first ``screen_tokens``; the finalists are measured on
    every verification token, and the cost counts the screen's work at its share of the tokens."""
    lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
    params = {"candidates": 3, "tokens": 120, "screen_tokens": 48, "width": 8, "swap_rounds": 1, "budget": 0}
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="mi-search",
        method_params=params,
        repair="none",  # finalists measured on the cut, comparable with a plain verifier's measurement
        calibration=CAL,
        cache=False,
        progress=False,
    )
    record = result.plan.search.params
    assert record["screen_tokens"] == 48 and record["verification_tokens"] == 120
    assert record["final_tokens"] == 120
    dense = tiny_model("llama")[0]
    full = Verifier(dense, _verification_windows(lm, 120), kl_topk=256, batch_size=CAL.batch_size)
    screen = Verifier(dense, _verification_windows(lm, 48), kl_topk=256, batch_size=CAL.batch_size)
    # the greedy ran on the screen: its first step's values are the screen's
    step = record["greedy"][0]
    assert step["measured"] == pytest.approx(
        min(screen.measure([[b] for b in range(6)], repaired=False)), rel=1e-5
    )
    for finalist in record["finalists"]:
        assert finalist["cut"] == pytest.approx(
            screen.measure([finalist["removed"]], repaired=False)[0], rel=1e-5
        )
        assert finalist["measured"] == pytest.approx(
            full.measure([finalist["removed"]], repaired=False)[0], rel=1e-5
        )
    assert result.plan.removed == min(record["finalists"], key=lambda f: f["measured"])["removed"]
    # cost: the full verifier's setup and finalists, plus the screen's work at 48/120 of the tokens
    assert record["verification_layer_passes"] > 0
    alone = miprun.prune(
        LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None),
        num_blocks=2,
        method="mi-search",
        method_params={**params, "screen_tokens": 120},
        repair="none",
        calibration=CAL,
        cache=False,
        progress=False,
    )
    assert alone.plan.search.params["screen_tokens"] == 120
    assert record["verification_layer_passes"] < alone.plan.search.params["verification_layer_passes"]


@pytest.mark.integration
def test_mi_search_ranks_its_widest_sweeps_on_the_probe_and_counts_them_at_its_share(tiny_tokenizer):
    """The shortlist and the greedy's first step (every block alone) run on the first ``probe_tokens``; the
    shortlist's best ``finalists`` and every later step run on the screen; the cost falls accordingly."""
    params = {"candidates": 6, "tokens": 144, "screen_tokens": 72, "probe_tokens": 24, "finalists": 1}

    def search(**override):
        lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
        return miprun.prune(
            lm,
            num_blocks=2,
            method="mi-search",
            method_params={**params, **override},
            repair="none",
            calibration=CAL,
            cache=False,
            progress=False,
        ).plan.search.params

    record = search()
    assert (record["probe_tokens"], record["screen_tokens"]) == (24, 72)
    dense = tiny_model("llama")[0]
    probe = Verifier(dense, _verification_windows(lm_of(tiny_tokenizer), 24), batch_size=CAL.batch_size)
    screen = Verifier(dense, _verification_windows(lm_of(tiny_tokenizer), 72), batch_size=CAL.batch_size)
    singles = probe.measure([[b] for b in range(6)], repaired=False)
    first, second = record["greedy"]
    assert first["block"] == min(range(6), key=lambda b: (singles[b], b))
    assert first["measured"] == pytest.approx(min(singles), rel=1e-5)
    assert second["measured"] == pytest.approx(
        screen.measure([sorted([first["block"], second["block"]])], repaired=False)[0], rel=1e-5
    )
    for candidate in record["candidates"]:  # the shortlist as the probe measured it
        assert candidate["measured"] == pytest.approx(
            probe.measure([candidate["removed"]], repaired=False)[0], rel=1e-5
        )
    mi_best = min(record["candidates"], key=lambda c: (c["mi_set_loss"], c["removed"]))["removed"]
    assert mi_best in [
        f["removed"] for f in record["finalists"]
    ]  # screened even where the probe ranks it low
    for finalist in record["finalists"]:  # every finalist's cut value is the screen's
        assert finalist["cut"] == pytest.approx(
            screen.measure([finalist["removed"]], repaired=False)[0], rel=1e-5
        )
    wide = search(probe_tokens=0)  # every sweep on the screen
    assert wide["probe_tokens"] == 72
    assert record["verification_layer_passes"] < wide["verification_layer_passes"]


@pytest.mark.integration
def test_mi_search_screens_mis_best_set_even_where_the_probe_ranks_it_low(tiny_tokenizer):
    """MI's best set is always a finalist, so it must reach the screen (a KeyError in `make demo` before)."""
    lm = LoadedModel(tiny_model("mixtral")[0], tiny_tokenizer, "tiny-mixtral", None)
    params = {
        "candidates": 6,
        "tokens": 144,
        "screen_tokens": 72,
        "probe_tokens": 24,
        "finalists": 1,
        "swap_rounds": 0,
        "width": 1,
    }
    record = search_record(lm, params)
    candidates = record["candidates"]
    mi_best = min(candidates, key=lambda c: (c["mi_set_loss"], c["removed"]))
    assert sorted(c["measured"] for c in candidates).index(mi_best["measured"]) > 0  # not the probe's best
    finalist = next(f for f in record["finalists"] if f["removed"] == mi_best["removed"])
    screen = Verifier(
        tiny_model("mixtral")[0], _verification_windows(lm_of(tiny_tokenizer), 72), batch_size=CAL.batch_size
    )
    assert finalist["cut"] == pytest.approx(screen.measure([mi_best["removed"]], repaired=False)[0], rel=1e-5)


@pytest.mark.integration
def test_mi_search_keeps_within_its_budget_by_giving_up_swap_rounds(tiny_tokenizer):
    """A budget under what the swaps would take stops them before they spend it, and the whole search stays
    within it; a budget above changes nothing."""
    params = {"candidates": 3, "tokens": 96, "probe_tokens": 24, "swap_rounds": 2}
    free = search_record(lm_of(tiny_tokenizer), {**params, "budget": 0})
    swaps, total = free["passes_by_stage"]["swaps"], free["verification_layer_passes"]
    assert swaps > 0 and free["budget_passes"] is None and "stopped" not in json.dumps(free["swaps"])
    sleb = search_record(lm_of(tiny_tokenizer), {**params, "budget": 1.0})["budget_passes"]
    tight = search_record(lm_of(tiny_tokenizer), {**params, "budget": (total - swaps / 2) / sleb})
    assert tight["swaps"][-1] == {"from": tight["swaps"][-1]["from"], "stopped": "budget"}
    assert tight["passes_by_stage"]["swaps"] < swaps
    assert tight["verification_layer_passes"] <= tight["budget_passes"] + 1e-9
    roomy = search_record(lm_of(tiny_tokenizer), {**params, "budget": 2 * total / sleb})
    assert roomy["swaps"] == free["swaps"] and roomy["finalists"] == free["finalists"]
    assert roomy["verification_layer_passes"] == pytest.approx(total)


@pytest.mark.integration
def test_mi_search_measures_its_finalists_on_the_screens_tokens_where_the_rest_would_overspend(
    tiny_tokenizer,
):
    """The tokens after the screen's are the finalists' only, their dense states and targets computed only
    where the finalists are measured on them: a budget that cannot pay for them keeps the finalists on the
    screen's tokens (the whole search within it); one that can measures them on all."""
    params = {"candidates": 3, "tokens": 120, "screen_tokens": 48, "probe_tokens": 24, "swap_rounds": 0}
    free = search_record(lm_of(tiny_tokenizer), {**params, "budget": 0})
    total = free["verification_layer_passes"]
    assert free["final_tokens"] == 120 and free["passes_by_stage"]["finalists"] > 0
    sleb = search_record(lm_of(tiny_tokenizer), {**params, "budget": 1.0})["budget_passes"]
    tight = search_record(lm_of(tiny_tokenizer), {**params, "budget": 0.999 * total / sleb})
    assert tight["final_tokens"] == 48 and tight["budget_gave_way"] == ["finalists' tokens"]
    assert tight["passes_by_stage"]["finalists"] == 0  # on the cut, on the screen: the values it measured
    assert [f["measured"] for f in tight["finalists"]] == [f["cut"] for f in tight["finalists"]]
    assert tight["verification_layer_passes"] <= tight["budget_passes"] + 1e-9
    assert (
        tight["passes_by_stage"]["dense states and targets"]
        < free["passes_by_stage"]["dense states and targets"]
    )
    roomy = search_record(lm_of(tiny_tokenizer), {**params, "budget": 1.001 * total / sleb})
    assert roomy["final_tokens"] == 120 and roomy["finalists"] == free["finalists"]
    assert roomy["verification_layer_passes"] == pytest.approx(total)


@pytest.mark.integration
def test_mi_search_with_a_repair_keeps_room_within_its_budget_for_the_repaired_probe_and_the_finalists(
    tiny_tokenizer,
):
    """With a repair the sets measured after the swaps (the repaired probe, the finalists at their own stride)
    are costed before a round runs, so stopping the swaps keeps the whole search within the budget."""
    params = {
        "candidates": 3,
        "tokens": 96,
        "probe_tokens": 24,
        "stride": 2,
        "final_stride": 1,
        "finalists": 1,
    }

    def record(budget):
        return miprun.prune(
            lm_of(tiny_tokenizer),
            num_blocks=2,
            method="mi-search",
            method_params={**params, "budget": budget},
            repair="linear",
            repair_params={"tokens": 0},
            calibration=CAL,
            cache=False,
            progress=False,
        ).plan.search.params

    free = record(0)
    stages, total = free["passes_by_stage"], free["verification_layer_passes"]
    assert stages["swaps"] > 0 and stages["repaired probe"] > 0 and free["budget_gave_way"] == []
    sleb = record(1.0)["budget_passes"]
    tight = record((total - stages["swaps"] / 2) / sleb)
    assert tight["budget_gave_way"][0] == "swaps" and "budget" in json.dumps(tight["swaps"])
    assert tight["verification_layer_passes"] <= tight["budget_passes"] + 1e-9
    # less room than the swaps gave back: the repaired probe measures fewer sets, still MI's best among them
    tighter = record((total - stages["swaps"] - stages["repaired probe"] / 2) / sleb)
    assert tighter["budget_gave_way"] == ["swaps", "repaired probe"]
    assert 1 <= len(tighter["repaired_probe"]) < len(free["repaired_probe"])
    mi_best = min(tighter["candidates"], key=lambda c: (c["mi_set_loss"], c["removed"]))["removed"]
    assert mi_best in [r["removed"] for r in tighter["repaired_probe"]]
    assert tighter["verification_layer_passes"] <= tighter["budget_passes"] + 1e-9


@pytest.mark.integration
def test_mi_search_does_not_rank_swaps_that_no_round_within_its_budget_could_follow(tiny_tokenizer):
    """From three blocks a round first ranks which block goes back; where no round that ranking could lead to
    fits the budget, the ranking is not paid for either."""
    params = {"candidates": 3, "tokens": 96, "probe_tokens": 24, "swap_rounds": 1}
    free = search_record(lm_of(tiny_tokenizer), {**params, "budget": 0}, num_blocks=3)
    swaps, total = free["passes_by_stage"]["swaps"], free["verification_layer_passes"]
    assert swaps > 0 and "probed" in free["swaps"][0]
    sleb = search_record(lm_of(tiny_tokenizer), {**params, "budget": 1.0}, num_blocks=3)["budget_passes"]
    tight = search_record(
        lm_of(tiny_tokenizer), {**params, "budget": (total - swaps + 1e-9) / sleb}, num_blocks=3
    )
    assert tight["swaps"] == [{"from": free["swaps"][0]["from"], "stopped": "budget"}]
    assert tight["passes_by_stage"]["swaps"] == 0


def search_record(lm, params, num_blocks=2):
    """What mi-search records choosing ``num_blocks`` blocks of ``lm`` with ``params``, cut only."""
    return miprun.prune(
        lm,
        num_blocks=num_blocks,
        method="mi-search",
        method_params=params,
        repair="none",
        calibration=CAL,
        cache=False,
        progress=False,
    ).plan.search.params


def lm_of(tokenizer):
    return LoadedModel(tiny_model("llama")[0], tokenizer, "tiny-llama", None)


@pytest.mark.integration
def test_the_chosen_sets_repair_reuses_the_statistics_its_verification_captured(tiny_tokenizer, monkeypatch):
    """mi-verified + linear fits its candidates' repairs from one pass; the chosen set's repair comes from
    the same statistics (no second pass) and equals a repair of that set fitted on its own."""

    def pruned(**how):
        lm = LoadedModel(tiny_model("llama")[0], tiny_tokenizer, "tiny-llama", None)
        return miprun.prune(
            lm,
            repair="linear",
            repair_params={"tokens": 0},
            calibration=CAL,
            cache=False,
            progress=False,
            **how,
        )

    from miprun.pipeline import repairing

    own_passes = []  # the repair's own calibration pass, counted around the real function
    real = repairing.fit_repair
    monkeypatch.setattr(repairing, "fit_repair", lambda *a, **k: own_passes.append(1) or real(*a, **k))
    verified = pruned(num_blocks=2, method="mi-verified", method_params={"candidates": 4, "tokens": 96})
    assert not own_passes  # the verification's statistics served the chosen set
    alone = pruned(blocks=verified.plan.removed)
    assert own_passes == [1]
    assert verified.plan.repair.changed and verified.plan.repair.changed == alone.plan.repair.changed
    got, want = verified.model.state_dict(), alone.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.integration
def test_mi_search_later_greedy_steps_rank_on_the_probe_and_measure_its_best_on_the_screen(tiny_tokenizer):
    """With ``step_screen`` = 1 each later step takes the block the probe ranks best (measured from the cut
    model's states on the probe's windows), and records the screen's measurement of it."""
    params = {"candidates": 2, "tokens": 96, "screen_tokens": 96, "probe_tokens": 24, "width": 8}
    lm = lm_of(tiny_tokenizer)
    record = search_record(lm, {**params, "step_screen": 1})
    dense = tiny_model("llama")[0]
    probe = Verifier(dense, _verification_windows(lm, 24), kl_topk=256, batch_size=CAL.batch_size)
    screen = Verifier(dense, _verification_windows(lm, 96), kl_topk=256, batch_size=CAL.batch_size)
    first, second = record["greedy"]
    rest = [b for b in range(6) if b != first["block"]]
    assert sorted(second["probed"]) == rest and len(second["remeasured"]) == 1
    ranks = probe.measure([sorted([first["block"], b]) for b in rest], repaired=False)
    assert second["block"] == rest[min(range(len(rest)), key=lambda i: (ranks[i], rest[i]))]
    chosen = sorted([first["block"], second["block"]])
    assert second["measured"] == pytest.approx(screen.measure([chosen], repaired=False)[0], rel=1e-5)


@pytest.mark.integration
def test_mi_search_ranks_its_best_cuts_after_the_repair_on_the_probe_and_keeps_the_best(
    tiny_tokenizer, monkeypatch
):
    """With a repair, the best sets by the cut (and MI's best) are measured after their repair on the probe;
    its best goes on to all the tokens, scored at every position, and wins. The chosen model, repaired and cut
    for real, measures on the probe's windows (every 2nd position, as the search scores) and on all the
    verification windows (every position) what the search recorded, from one repair capture."""
    from miprun.methods.targets import coarse_kl, top_k_with_tail
    from miprun.pipeline import repairing
    from miprun.repair.linear import LinearRepair

    captures, guards = (
        [],
        [],
    )  # the repair's calibration passes and guard checks, counted around the real ones
    real, real_guard = repairing.capture_pass, LinearRepair._guarded
    monkeypatch.setattr(repairing, "capture_pass", lambda *a, **k: captures.append(1) or real(*a, **k))
    monkeypatch.setattr(LinearRepair, "_guarded", lambda *a, **k: guards.append(1) or real_guard(*a, **k))
    lm = lm_of(tiny_tokenizer)
    params = {
        "candidates": 4,
        "tokens": 96,
        "probe_tokens": 24,
        "repaired_probe": 3,
        "finalists": 1,
        "budget": 0,
    }
    result = miprun.prune(
        lm,
        num_blocks=2,
        method="mi-search",
        method_params={**params, "stride": 2},
        repair="linear",
        # the search measures every set with the dense fit; with activations=repaired (the default) the chosen
        # set's later runs would be refitted on the cut model, and the saved model is no longer what it measured
        repair_params={"tokens": 0, "activations": "dense"},
        calibration=CAL,
        cache=False,
        progress=False,
    )
    record = result.plan.search.params
    assert captures == [1]  # the probe, the finalists and the chosen set's repair share one capture
    assert guards == [1]  # the chosen set's repair is guarded; the sets measured are not (no extra passes)
    assert "reverted" not in json.dumps(result.plan.repair.runs)  # so the measured repair is the saved one
    rehearsed = record["repaired_probe"]
    mi_best = min(record["candidates"], key=lambda c: (c["mi_set_loss"], c["removed"]))
    assert 3 <= len(rehearsed) <= 4 and mi_best["removed"] in [r["removed"] for r in rehearsed]
    best = min(rehearsed, key=lambda r: (r["measured"], r["removed"]))
    assert [f["removed"] for f in record["finalists"]] == [best["removed"]] == [result.plan.removed]
    dense = tiny_model("llama")[0]

    def kl(rows: int, stride: int = 1) -> float:
        windows = _verification_windows(lm, 96)[:rows]
        at = torch.arange(windows.shape[1] - 1, -1, -stride).flip(0)  # ending at the last position
        with torch.no_grad():
            logits = dense(input_ids=windows).logits[:, at]
            values, indices, tail = top_k_with_tail(logits, min(256, logits.shape[-1]))
            return float(coarse_kl(result.model(input_ids=windows).logits[:, at], values, indices, tail))

    assert best["measured"] == pytest.approx(kl(1, stride=2), rel=1e-4)
    assert record["finalists"][0]["measured"] == pytest.approx(kl(4), rel=1e-4)
    assert kl(4) != pytest.approx(kl(4, stride=2), rel=1e-4)  # the stride matters here


@pytest.mark.integration
def test_a_verifier_at_another_stride_on_its_parents_windows_measures_like_its_own_and_pays_the_head_only():

    model, _ = tiny_model("llama")
    parent = Verifier(model, WINDOWS, stride=3, batch_size=4)
    parent.measure([[1]], repaired=False)
    child = replace(parent, stride=1, parent=parent)
    alone = Verifier(model, WINDOWS, stride=1, batch_size=4)
    sets = [[1], [2, 3], [5]]
    assert child.measure(sets, repaired=False) == pytest.approx(alone.measure(sets, repaired=False), rel=1e-5)
    assert child.measure(sets, repaired=False) != pytest.approx(
        parent.measure(sets, repaired=False), rel=1e-3
    )
    assert 0 < child.setup_runs < alone.setup_runs  # the output layer on the parent's last states only
