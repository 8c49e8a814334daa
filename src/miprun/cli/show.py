"""How the command line shows results: rich tables on stdout, one function per command."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()


def block_scores(result: Any) -> None:
    """``miprun score``: per-block MI and NMI, then whatever each method's evidence shows of itself: per-block
    columns (``columns(key)``) and lines below the table (``notes(key)``)."""
    ev = result.evidence
    est = result.estimator.name if result.estimator is not None else "no"
    table = Table(title=f"{result.model.name}: scores per block ({est} MI)")
    columns: dict[str, list[float]] = {}
    for key, evidence in ev.items():
        for title, values in (evidence.columns(key) if hasattr(evidence, "columns") else {}).items():
            columns.setdefault(title, values)
    for name in ("block", "MI (nats)", "NMI", *columns):
        table.add_column(name, justify="right")
    mi = result.table.block_mi() if result.table is not None else [None] * result.num_blocks
    nmi = result.table.block_nmi() if result.table is not None else [None] * result.num_blocks
    for i, (m, n) in enumerate(zip(mi, nmi, strict=True)):
        table.add_row(str(i), _num(m), _num(n), *(_num(values[i]) for values in columns.values()))
    out.print(table)
    for key, evidence in ev.items():
        for line in evidence.notes(key) if hasattr(evidence, "notes") else []:
            out.print(line)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def prune_summary(result: Any) -> None:
    """``miprun prune``: what was removed, how, the evaluation and the time of each phase."""
    plan_summary(result.plan, result.out)


def plan_summary(plan: Any, folder: Any = None) -> None:
    """A pruning plan as ``prune`` shows it: the table, the search's record, and where its files are."""
    s = plan.search
    table = Table(title=f"{plan.model.name}: {plan.num_blocks_before} -> {plan.num_blocks_after} blocks")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("removed blocks (0-based)", str(plan.removed))
    estimator = plan.estimator["name"] if plan.estimator else "-"
    table.add_row("method / estimator / repair", f"{s.method} / {estimator} / {plan.repair.name}")
    cal = plan.calibration
    table.add_row("calibration", f"{cal.source}, {cal.num_windows}x{cal.seq_len} tok (seed {cal.seed})")
    if s.loss is not None and s.optimal_loss is not None and s.gap is not None:
        table.add_row("set loss / optimum / gap", f"{s.loss:.4f} / {s.optimal_loss:.4f} / {s.gap:.4f}")
    table.add_row("iterations / evaluations (MI, scores or passes)", f"{s.iterations} / {s.num_evaluations}")
    ev = plan.evaluation
    if ev is not None:
        steps = [f"{ev.dense_ppl:.2f}"]
        if ev.cut_ppl is not None:
            steps.append(f"{ev.cut_ppl:.2f} (cut)")
        steps.append(f"{ev.pruned_ppl:.2f}")
        table.add_row(f"held-out perplexity ({ev.windows}x{ev.seq_len} tok)", " -> ".join(steps))
    for phase, seconds in plan.timings.items():
        table.add_row(f"time: {phase}", f"{seconds:.2f} s")
    out.print(table)
    if "candidates" in s.params:
        verified_candidates(s.params, plan.removed)
    if folder is not None:
        out.print(f"pruned model: {folder}")
        out.print(f"manifest:     {folder / 'miprun.json'}")
        out.print(f"report:       {folder / 'report.md'}  {folder / 'report.png'}")


def verified_candidates(record: dict[str, Any], chosen: list[int]) -> None:
    """``mi-verified``: every candidate with its MI rank and the measured objective; the chosen one marked."""
    rank = f"; the choice is MI's #{record['chosen_mi_rank']}" if "chosen_mi_rank" in record else ""
    searched = " (on the cut; the greedy and the finalists below)" if "greedy" in record else ""
    tokens = record.get("probe_tokens", record["verification_tokens"])  # mi-search ranks them on its probe
    of_all = f" of {record['verification_tokens']}" if tokens != record["verification_tokens"] else ""
    table = Table(
        title=(
            f"{len(record['candidates'])} MI candidates measured{searched} ({record['objective']} on "
            f"{tokens}{of_all} tokens; {record['verification_layer_passes']:.2f} forward passes in all){rank}"
        )
    )
    for name in ("removed", "MI rank", "MI set loss", f"measured {record['objective']}", "proposed by"):
        table.add_column(name, justify="left" if name in ("removed", "proposed by") else "right")
    by: dict[tuple[int, ...], list[str]] = {}
    for name, removed in record.get("proposed_by", {}).items():
        by.setdefault(tuple(sorted(removed)), []).append(name)
    for c in sorted(record["candidates"], key=lambda c: c["measured"]):
        mark = " (chosen)" if sorted(c["removed"]) == sorted(chosen) else ""
        table.add_row(
            f"{c['removed']}{mark}",
            str(c["mi_rank"]),
            f"{c['mi_set_loss']:.4f}",
            f"{c['measured']:.4f}",
            ", ".join(by.get(tuple(sorted(c["removed"])), ["MI"])),
        )
    out.print(table)
    if "finalists" in record:
        searched_finalists(record, chosen)


def searched_finalists(record: dict[str, Any], chosen: list[int]) -> None:
    """``mi-search``: the greedy's removals in order, and the finalists measured on the cut and at the end."""
    path = ", ".join(f"{step['block']} ({step['measured']:.4f})" for step in record["greedy"])
    out.print(f"greedy removals ({record['greedy_layer_passes']:.2f} forward passes): {path}")
    if "passes_by_stage" in record:
        stages = ", ".join(f"{name} {passes:.2f}" for name, passes in record["passes_by_stage"].items())
        out.print(f"forward passes by stage: {stages}")
    if record.get("budget_passes") is not None:
        gave_way = record.get("budget_gave_way", [])
        out.print(
            f"budget: {record['budget_passes']:.2f} forward passes"
            + (f" ({', '.join(gave_way)} gave way)" if gave_way else "")
        )
    finalists = [f["removed"] for f in record["finalists"]]
    if record.get("repaired_probe"):
        table = Table(title=f"the best cuts measured after the repair on {record['probe_tokens']} tokens")
        table.add_column("removed")
        table.add_column("measured after the repair", justify="right")
        for r in sorted(record["repaired_probe"], key=lambda r: r["measured"]):
            table.add_row(
                f"{r['removed']}{' (finalist)' if r['removed'] in finalists else ''}", f"{r['measured']:.4f}"
            )
        out.print(table)
    tokens = record.get("final_tokens")  # recorded since the finalists may take more tokens than the screen
    table = Table(title="finalists" + (f" (measured at the end on {tokens} tokens)" if tokens else ""))
    for name in ("removed", "measured on the cut", "measured at the end", "the greedy's own set"):
        table.add_column(name, justify="left" if name == "removed" else "right")
    for f in sorted(record["finalists"], key=lambda f: f["measured"]):
        mark = " (chosen)" if sorted(f["removed"]) == sorted(chosen) else ""
        table.add_row(
            f"{f['removed']}{mark}",
            f"{f['cut']:.4f}",
            f"{f['measured']:.4f}",
            "yes" if f["greedy"] else "",
        )
    out.print(table)


def heal_summary(result: Any) -> None:
    """``miprun heal``: how long, how far the loss fell, and the perplexities when measured."""
    heal_record(result.plan)
    out.print(f"healed model: {result.out}")


def heal_record(plan: Any) -> None:
    """The heal a plan records, as a table."""
    healed = plan.heal
    report = healed.report
    table = Table(title=f"{plan.model.name}: healed toward {healed.teacher}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("steps / tokens", f"{report.steps} / {report.tokens}")
    table.add_row(
        "KL to the dense model (first -> last batch)", f"{report.loss_start:.4f} -> {report.loss_end:.4f}"
    )
    table.add_row("resumed", f"at step {report.resumed_at_step}" if report.resumed else "no")
    ev = healed.evaluation
    if ev is not None and ev.healed_ppl is not None:
        table.add_row(
            f"held-out perplexity ({ev.windows}x{ev.seq_len} tok): dense / pruned / healed",
            f"{ev.dense_ppl:.2f} / {ev.pruned_ppl:.2f} / {ev.healed_ppl:.2f}",
        )
    table.add_row("time: heal (wall / CPU)", f"{report.seconds:.0f} s / {report.cpu_seconds:.0f} s")
    out.print(table)


def evaluation(result: dict[str, Any]) -> None:
    """``miprun eval``: perplexities and task accuracies."""
    info = result["model"]
    table = Table(
        title=f"{info['name']}: {info['num_blocks']} blocks, {info['parameters'] / 1e6:.1f} M parameters"
    )
    for name in ("measure", "value", "detail"):
        table.add_column(name, justify="left" if name != "value" else "right")
    for source, p in result["perplexity"].items():
        table.add_row(f"perplexity {source}", f"{p['ppl']:.3f}", f"{p['windows']} x {p['seq_len']} tokens")
    for task, t in result["tasks"].items():
        chance = f", chance {t['chance']:.2f}" if "chance" in t else ""
        for metric in ("acc", "acc_norm"):
            stderr = f" ± {t[metric + '_stderr']:.3f}" if t.get(metric + "_stderr") is not None else ""
            value = f"{t[metric]:.4f}" if t.get(metric) is not None else "-"
            table.add_row(f"{task} {metric}", value + stderr, f"{t['examples']} examples{chance}")
    out.print(table)


def bench(result: dict[str, Any], config: Any) -> None:
    """``miprun bench``: medians per model and, with a dense reference, the ratios."""
    runs = [result["model"]] + ([result["dense"]] if "dense" in result else [])
    table = Table(title=f"bench on {result['device']} ({result['dtype']}), medians of {config.repeats}")
    table.add_column("measure")
    for run in runs:
        table.add_column(f"{run['name']} ({run['num_blocks']} blocks)", justify="right")
    ratios = result.get("ratios", {})
    if ratios:
        table.add_column("speed-up or size ratio", justify="right")

    def row(label: str, values: list[str], ratio: float | None = None) -> None:
        table.add_row(label, *values, *([f"{ratio:.3f}x" if ratio is not None else "-"] if ratios else []))

    row("parameters (M)", [f"{r['parameters'] / 1e6:.2f}" for r in runs], ratios.get("parameter_ratio"))
    row(
        f"prefill {config.prompt_len} tok (ms)",
        [f"{r['prefill_ms']:.1f}" for r in runs],
        ratios.get("prefill_speedup"),
    )
    for b in config.batch_sizes:
        row(
            f"decode batch {b} (tok/s)",
            [f"{r['decode_tokens_per_s'][str(b)]:.1f}" for r in runs],
            ratios.get("decode_speedup", {}).get(str(b)),
        )
    row(
        "weights (MB)",
        [f"{r['memory']['weights_bytes'] / 2**20:.1f}" for r in runs],
        ratios.get("weights_bytes_ratio"),
    )
    if ratios:
        table.add_row("ideal layer ratio T/(T-N)", *["" for _ in runs], f"{ratios['ideal_layer_ratio']:.3f}x")
    out.print(table)
    out.print(f"memory: {result['memory_kind']}")


def registry(what: str) -> None:
    """``miprun list``: every name of one registry, with its summary and parameters (type = default)."""
    from miprun import estimators, methods, repair
    from miprun.data import BUILTIN_SOURCES
    from miprun.evaluation.tasks import OFFLINE_TASKS
    from miprun.registry import Registry

    texts = {name: f"{t.about}; from {t.archive.requirement}" for name, t in BUILTIN_SOURCES.items()}
    registries: dict[str, Any] = {  # registries, and the texts as a plain mapping
        "methods": methods.REGISTRY,
        "estimators": estimators.REGISTRY,
        "repairs": repair.REGISTRY,
        "tasks": OFFLINE_TASKS,
        "texts": texts,
    }
    chosen = Registry[Any]("list")
    for name, reg in registries.items():
        chosen.add(name, reg)
    reg = chosen.get(what)
    table = Table(title=f"miprun {what}")
    for name in ("name", "what it does", "parameters (type = default)"):
        table.add_column(name)
    for name, entry in reg.items():
        summary = (
            entry
            if isinstance(entry, str)
            else getattr(entry, "summary", None) or getattr(entry, "description", None) or _first_line(entry)
        )
        table.add_row(name, summary, _parameters(entry))
    out.print(table)


def _first_line(entry: Any) -> str:
    doc = (getattr(entry, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _parameters(entry: Any) -> str:
    if not (isinstance(entry, type) and dataclasses.is_dataclass(entry)):
        return ""
    hints = typing.get_type_hints(entry)
    return ", ".join(
        f"{f.name}: {getattr(hints[f.name], '__name__', str(hints[f.name]))} = {f.default!r}"
        for f in dataclasses.fields(entry)
        if f.init
    )
