"""The linear repair (ReplaceMe, arXiv 2505.02819): per removed run, a least-squares map folded into the
block before it, so the cut model keeps its parameter count and stays a stock checkpoint.

For a run ``[a..b]`` the dense model passed ``Y`` (state ``b + 1``) on; the cut model passes the output of
block ``a - 1``, which is ``B = (its residual) + X`` with ``X`` that block's MLP output. Replacing ``X`` by
``X T`` with ``T = argmin ||X T - (Y - B + X)||^2 + ridge`` restores the part of ``Y`` a linear map of
``X`` can explain, and ``T`` folds into the MLP output projection. Where the MLP output passes through a
norm before the add (Gemma 2/3's post-feedforward norm) a full map does not fold, but a scaled rotation
does, exactly: the rotation into the MLP output projection, the scale into the norm's weight
(:mod:`miprun.repair.rotation`); a run that starts at block 0 folds into an untied embedding, and is left unrepaired (and says
so) when the embedding is tied to the LM head.

The fit minimises squared error, not the model's loss, and on Gemma a per-coordinate map can raise the
loss (docs/repair.md). So each run's fold is kept only if it lowers the cut model's next-token loss on
``guard`` calibration windows left out of the fit; a run whose fold does not is left unrepaired, and the
record says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.capture.statistic import Statistic, Tap
from miprun.capture.statistics import LinearFitSums
from miprun.errors import InvalidOptionError, UnsupportedArchitectureError
from miprun.methods.search import runs
from miprun.model.edits import edited
from miprun.model.layouts import decoder_layers, layer_part, layout_for, mlp_adds_to_residual, model_config
from miprun.model.perplexity import mean_nll
from miprun.model.surgery import skip_blocks
from miprun.options import CalibrationConfig
from miprun.repair.base import REGISTRY, Repair, RepairContext, RepairRecord
from miprun.repair.fold import (
    embedding_fold_error,
    embeddings_tied,
    fold_into_embedding,
    fold_into_mlp_output,
    parameter_name,
)
from miprun.repair.rotation import as_map, fit_scaled_rotation
from miprun.repair.upstream import upstream_sums

EXACT = 1e-4  # relative error below which a fold counts as exact (float32 round-off is ~1e-7)

Fold = Literal["auto", "full", "diagonal", "rotation"]
FOLDS = ("auto", "full", "diagonal", "rotation")


def solve_map(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(X^T X + ridge * mean(diag X^T X) I)^-1 X^T Y`` in float64: the least-squares map ``(d, d)``."""
    d = xtx.shape[0]
    scale = float(xtx.diagonal().mean()) if d else 1.0
    gram = xtx + ridge * max(scale, 1e-12) * torch.eye(d, dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(gram, xty)


MAX_RIDGE = 1e6  # beyond this the map is zero to float precision: nothing left to fit
RANK_FLOOR = 1e-6  # the smallest ridge (relative) of a fit whose X^T X is rank-deficient


def effective_ridge(xtx: torch.Tensor, ridge: float) -> tuple[float, str | None]:
    """``ridge``, raised to :data:`RANK_FLOOR` when ``X^T X`` is numerically rank-deficient (the map would be
    arbitrary, and huge, in the directions the data never visits), with a note saying so."""
    if ridge >= RANK_FLOOR or xtx.shape[0] == 0:
        return ridge, None
    eig = torch.linalg.eigvalsh(xtx)
    top = float(eig[-1].clamp_min(1e-300))
    if float(eig[0]) > top * 1e-12:
        return ridge, None
    return RANK_FLOOR, (
        f"X^T X is rank-deficient (smallest/largest eigenvalue {float(eig[0]) / top:.2g}): ridge raised from "
        f"{ridge:g} to {RANK_FLOOR:g}"
    )


def solve_diagonal(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per-coordinate least squares ``t_j = (X_j . Y_j) / (X_j . X_j + ridge)``: the diagonal map ``(d,)``."""
    diag = xtx.diagonal()
    return xty.diagonal() / (diag + ridge * max(float(diag.mean()), 1e-12))


def residual_fraction(xtx: torch.Tensor, xtr: torch.Tensor, rtr: torch.Tensor, T: torch.Tensor) -> float:
    """``||X T - R||^2 / ||R||^2`` from the sums: the share of the target the map leaves unexplained."""
    err = rtr.sum() - 2.0 * (T * xtr).sum() + (T * (xtx @ T)).sum()
    return float(err / rtr.sum().clamp_min(1e-300))


@REGISTRY.register
@dataclass
class LinearRepair(Repair):
    """A least-squares map per removed run, fitted on calibration activations and folded into weights."""

    name: ClassVar[str] = "linear"
    summary: ClassVar[str] = (
        "least-squares map per removed run, folded into the MLP output projection of the block before it "
        "(per-coordinate into the post-MLP norm on Gemma 2/3)"
    )

    tokens: int = 32768  # calibration tokens of the fit: where the measured curve flattens (docs/repair.md)
    ridge: float = 1e-4  # relative to the mean diagonal of X^T X
    fold: Fold = "auto"  # auto: a full map where the MLP output is added as is, a scaled rotation where it
    # passes a post-MLP norm first; diagonal: a per-coordinate map everywhere (into the post-MLP norm where
    # there is one); rotation: an orthogonal map and a per-coordinate scale (:mod:`miprun.repair.rotation`)
    weighting: Literal["none", "relative"] = "none"  # relative: each token's error relative to its scale
    guard: int = 8  # calibration windows, left out of the fit, on which each run's fold must lower the cut
    # model's loss or be undone (0: keep every fold unchecked)
    # repaired: each run after the first fitted on the model already cut and repaired upstream, as it will run
    # (two partial passes per later run; a method's measurements after the repair keep the dense fit); dense:
    # every run on the dense model's activations, from the one pass (:mod:`miprun.repair.upstream`; measured
    # 0.6-6.7 % better on every multi-run set tried, docs/repair.md)
    activations: Literal["dense", "repaired"] = "repaired"

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise InvalidOptionError(f"tokens must be at least 0 (0: the scoring windows), got {self.tokens}")
        if not (math.isfinite(self.ridge) and 0 <= self.ridge <= MAX_RIDGE):
            raise InvalidOptionError(
                f"ridge must be a number from 0 to {MAX_RIDGE:g} (relative to the mean diagonal of X^T X; "
                f"default 1e-4), got {self.ridge}"
            )
        if self.fold not in FOLDS:
            raise InvalidOptionError(f"fold must be one of {', '.join(FOLDS)}, got {self.fold!r}")
        if self.weighting not in ("none", "relative"):
            raise InvalidOptionError(f"weighting must be 'none' or 'relative', got {self.weighting!r}")
        if self.guard < 0:
            raise InvalidOptionError(f"guard must be at least 0 (0: keep every fold), got {self.guard}")
        if self.activations not in ("dense", "repaired"):
            raise InvalidOptionError(f"activations must be 'dense' or 'repaired', got {self.activations!r}")

    def calibration(self, cal: CalibrationConfig) -> CalibrationConfig:
        """``tokens`` worth of windows of the scoring text (the same first windows, then more), and ``guard``
        windows more to check the fit on."""
        fit = cal.samples if self.tokens == 0 else max(1, math.ceil(self.tokens / cal.seq_len))
        return replace(cal, samples=fit + self.guard)

    def split(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last ``guard`` windows are left out of the fit: the guard checks each fold on them."""
        if not self.guard or windows.shape[0] <= self.guard:
            return windows, None
        return windows[: -self.guard], windows[-self.guard :]

    def unsupported(self, model: nn.Module) -> str | None:
        try:
            self._mode(model)
        except UnsupportedArchitectureError as err:
            return str(err)
        return super().unsupported(model)

    def _mode(self, model: nn.Module) -> Literal["full", "diagonal", "rotation"]:
        roles = layout_for(model_config(model)).roles
        if not mlp_adds_to_residual(model):
            raise UnsupportedArchitectureError(
                f"model_type {model_config(model).model_type!r} normalises after the residual add here, so a "
                "map folded into a block cannot restore a removed run; use --repair none"
            )
        if self.fold == "auto":  # measured on Gemma-3: docs/repair.md, benchmarks/repair.py
            return "rotation" if roles.post_mlp_norm is not None else "full"
        if self.fold == "full" and roles.post_mlp_norm is not None:
            raise UnsupportedArchitectureError(
                "this family normalises the MLP output before the residual add, so a full map does not fold "
                "into its weights; use fold=rotation (a scaled rotation, exact through the norm), "
                "fold=diagonal or fold=auto"
            )
        return self.fold

    def _source(self, model: nn.Module, a: int) -> Tap:
        """What the fold rescales for a run starting at ``a``: the normalised MLP output where there is a
        post-MLP norm, else the MLP output; the embedding (state 0) for ``a == 0``."""
        if a == 0:
            return Tap(state=0)
        roles = layout_for(model_config(model)).roles
        return Tap(block=a - 1, role="post_mlp_norm" if roles.post_mlp_norm is not None else "mlp")

    def statistics(self, model: nn.Module, removed: list[int]) -> list[Statistic]:
        self._mode(model)  # an unsupported family fails before the extra pass
        return [self._sums(model, a, b) for a, b in runs(removed)]

    def _sums(self, model: nn.Module, a: int, b: int) -> LinearFitSums:
        return LinearFitSums(
            self._source(model, a), base=a, target=b + 1, relative=self.weighting == "relative"
        )

    def fit(self, ctx: RepairContext) -> tuple[dict[str, torch.Tensor], RepairRecord]:
        assert ctx.stats is not None
        mode = self._mode(ctx.model)
        fitted: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        record = RepairRecord(self.name, self.params(), replay="refit", tokens=ctx.stats.num_tokens)
        upstream: list[int] = []  # blocks of the runs fitted so far
        for a, b in runs(ctx.removed):
            sums = ctx.stats.get(self._sums(ctx.model, a, b), "the linear repair")
            run: dict[str, Any] = {"first": a, "last": b}
            if upstream and self.activations == "repaired" and not ctx.measuring and ctx.windows is not None:
                sums = upstream_sums(
                    ctx.model, ctx.windows, sums, upstream, _merged(fitted), ctx.calibration, ctx.progress
                )
                run["activations"] = "cut and repaired upstream"
            upstream += range(a, b + 1)
            run_edits: dict[str, torch.Tensor] = {}
            if a == 0 and embeddings_tied(ctx.model):
                run["skipped"] = (
                    "the run starts at block 0 and the embedding is tied to the LM head: a map folded into it "
                    "would change the output layer too"
                )
            else:
                run.update(self._fit_run(ctx.model, a, sums, mode, run_edits))
            record.runs.append(run)
            fitted.append((run, run_edits))
        if (
            self.guard and ctx.check is None
        ):  # e.g. fit() called directly, or too few windows to leave some out
            for run, run_edits in fitted:
                if run_edits:
                    run["guard"] = "not run: no calibration windows were left out of the fit to check it on"
        edits = self._guarded(ctx, fitted) if self.guard and ctx.check is not None else _merged(fitted)
        record.changed = sorted(edits)
        return edits, record

    def _guarded(
        self, ctx: RepairContext, fitted: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]
    ) -> dict[str, torch.Tensor]:
        """The runs' edits that each lower the cut model's loss on the check windows, added in order."""
        assert ctx.check is not None
        windows = ctx.check

        def loss(edits: dict[str, torch.Tensor]) -> float:
            with edited(ctx.model, edits), skip_blocks(ctx.model, ctx.removed):
                return mean_nll(ctx.model, windows)[0]

        kept: dict[str, torch.Tensor] = {}
        trials = [(run, run_edits) for run, run_edits in fitted if run_edits]
        # one pass over the check windows for the cut model, then one per fitted run
        with tqdm(total=1 + len(trials), desc="repair guard", unit="pass", disable=not ctx.progress) as bar:
            best = loss(kept)
            bar.update()
            for run, run_edits in trials:
                trial = loss({**kept, **run_edits})
                bar.update()
                run["guard"] = {"windows": int(windows.shape[0]), "loss_without": best, "loss_with": trial}
                if trial < best:
                    kept.update(run_edits)
                    best = trial
                else:
                    run["reverted"] = (
                        f"the fitted map raised the cut model's loss on {windows.shape[0]} held-out calibration "
                        f"windows ({run['guard']['loss_without']:.4f} -> {trial:.4f} nats per token), so this "
                        "run is left unrepaired"
                    )
        return kept

    def _fit_run(
        self, model: nn.Module, a: int, sums: LinearFitSums, mode: str, edits: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """One run's fit, regularised where ``X^T X`` is rank-deficient and refused where it is not finite."""
        assert sums.xtx is not None
        ridge, note = effective_ridge(sums.xtx, self.ridge)
        run_edits: dict[str, torch.Tensor] = {}
        result = self._fit_with(model, a, sums, mode, run_edits, ridge)
        if note:
            result["regularised"] = note
        bad = sorted(name for name, value in run_edits.items() if not bool(torch.isfinite(value).all()))
        unexplained = result.get("unexplained", 0.0)
        if bad or not math.isfinite(unexplained):
            return {
                **{k: v for k, v in result.items() if k != "fold"},
                "skipped": f"the fitted map is not finite ({', '.join(bad) or 'its unexplained share'}); this run "
                "is left unrepaired (raise --repair-opt ridge)",
            }
        edits.update(run_edits)
        return result

    def _fit_with(
        self,
        model: nn.Module,
        a: int,
        sums: LinearFitSums,
        mode: str,
        edits: dict[str, torch.Tensor],
        ridge: float,
    ) -> dict[str, Any]:
        assert sums.xtx is not None and sums.xtd is not None and sums.dtd is not None
        xtr = sums.xtd + sums.xtx  # X^T (Y - B + X)
        rtr_diag = sums.dtd + 2 * sums.xtd.diagonal() + sums.xtx.diagonal()  # per-coordinate ||R||^2
        if a == 0:
            T = solve_map(sums.xtx, xtr, ridge)
            folded = fold_into_embedding(model, T)
            error = embedding_fold_error(model, folded, T)
            if error > EXACT:
                return {
                    "skipped": (
                        f"the run starts at block 0 and a map folded into this family's embeddings does not give "
                        f"(state 0) @ T (relative error {error:.2g}): something else enters that state"
                    )
                }
            edits.update(folded)
            fold = "embedding" + (" and position embedding" if len(folded) > 1 else "")
            return {"fold": fold, "unexplained": residual_fraction(sums.xtx, xtr, rtr_diag, T)}
        if mode == "rotation":
            return self._fit_rotation(model, a - 1, sums.xtx, xtr, rtr_diag, edits, ridge)
        if mode == "diagonal":
            t = solve_diagonal(sums.xtx, xtr, ridge)
            if layout_for(model_config(model)).roles.post_mlp_norm is not None:
                edits.update(self._fold_into_norm(model, a - 1, t))
                where = "post-mlp norm (per coordinate)"
            else:  # no norm to hold it: the diagonal map folds into the output projection like a full one
                edits.update(fold_into_mlp_output(model, a - 1, torch.diag(t)))
                where = "mlp output projection (per coordinate)"
            return {"fold": where, "unexplained": residual_fraction(sums.xtx, xtr, rtr_diag, torch.diag(t))}
        T = solve_map(sums.xtx, xtr, ridge)
        for name, value in fold_into_mlp_output(model, a - 1, T).items():
            edits[name] = value
        return {"fold": "mlp output projection", "unexplained": residual_fraction(sums.xtx, xtr, rtr_diag, T)}

    def _fit_rotation(
        self,
        model: nn.Module,
        block: int,
        xtx: torch.Tensor,
        xtr: torch.Tensor,
        rtr_diag: torch.Tensor,
        edits: dict[str, torch.Tensor],
        ridge: float,
    ) -> dict[str, Any]:
        """A scaled rotation: ``Q`` folded into block ``block``'s MLP output projection, the scale into its
        post-MLP norm (or, without one, ``Q diag(D)`` into the projection alone)."""
        norm = self._post_mlp_norm(model, block)
        if norm is None:
            scale = torch.ones(xtx.shape[0], dtype=torch.float64, device=xtx.device)
        else:
            scale = norm.weight.detach().to(xtx.device, torch.float64) + (1.0 if _adds_one(norm) else 0.0)
        fit = fit_scaled_rotation(xtx, xtr, scale, ridge)
        if norm is None:
            edits.update(fold_into_mlp_output(model, block, fit.rotation * fit.scale[None, :]))
            where = "mlp output projection (scaled rotation)"
        else:
            edits.update(fold_into_mlp_output(model, block, fit.rotation))
            edits.update(self._fold_into_norm(model, block, fit.scale / scale))
            where = "mlp output projection (rotation) and post-mlp norm (scale)"
        unexplained = residual_fraction(xtx, xtr, rtr_diag, as_map(fit, scale))
        return {"fold": where, "unexplained": unexplained, "rotation_rounds": fit.iterations}

    def _post_mlp_norm(self, model: nn.Module, block: int) -> Any:
        roles = layout_for(model_config(model)).roles
        if roles.post_mlp_norm is None:
            return None
        return layer_part(decoder_layers(model)[block], roles.post_mlp_norm)

    def _fold_into_norm(self, model: nn.Module, block: int, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The post-MLP norm's weight scaled per coordinate by ``t`` (Gemma stores the scale as ``1 + w``)."""
        roles = layout_for(model_config(model)).roles
        assert roles.post_mlp_norm is not None
        norm = layer_part(decoder_layers(model)[block], roles.post_mlp_norm)
        weight = norm.weight
        offset = 1.0 if _adds_one(norm) else 0.0
        new = (weight.detach().to(torch.float64) + offset) * t.to(weight.device) - offset
        return {parameter_name(model, weight): new.to(weight.dtype)}


def _merged(fitted: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    return {name: value for _run, edits in fitted for name, value in edits.items()}


def _adds_one(norm: Any) -> bool:
    """Whether an RMS norm scales by ``1 + weight`` (Gemma) rather than ``weight``: probed on a unit input."""
    weight: torch.Tensor = norm.weight
    with torch.no_grad():
        out = norm(torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device))[0]
        plus_one = torch.allclose(out, 1.0 + weight, atol=1e-3, rtol=1e-3)
        return bool(plus_one) and not bool(torch.allclose(out, weight, atol=1e-3, rtol=1e-3))
