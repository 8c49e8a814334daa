"""Which objective, and which activations, should the linear repair fit? (issue 16, item 3)

For each removal set: the least-squares map the linear repair fits today (ReplaceMe's closed form), and a
map fitted to ReplaceMe's cosine objective (Adam from the least-squares map, on the same activations); both
on the dense model's activations ("dense", as the repair does today) and, for sets of several runs, each
run's map fitted on the model already cut and least-squares repaired upstream ("sequential"). Each map is
folded into the MLP output projection of the block before its run, and the held-out perplexity measured.

    python benchmarks/repair_objective.py --model smollm2-135m --windows 64 \
        --set 12,13,14,15,16,17,18,19,20 --set 3,4,5,13,14,15,16,17,18 --out benchmarks/results/repair-objective-smollm2-135m

A pre-norm family only (SmolLM2, Llama, Qwen): the full map folds there. No guard here: every fit is kept.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from results_io import TEXT, write_results

from miprun.data.sources import load_text
from miprun.data.windows import token_windows
from miprun.evaluation.heldout import heldout_windows
from miprun.methods.search import runs
from miprun.model.edits import edited
from miprun.model.layouts import decoder_layers
from miprun.model.loading import load_model
from miprun.model.perplexity import perplexity
from miprun.model.surgery import skip_blocks
from miprun.repair.fold import fold_into_mlp_output
from miprun.repair.linear import solve_map

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--windows", type=int, default=64, help="calibration windows of 128 tokens for the fits")
parser.add_argument("--set", action="append", required=True, help="a removal set, comma-separated")
parser.add_argument("--steps", type=int, default=1000, help="Adam steps of the cosine fit")
parser.add_argument("--out", required=True)
args = parser.parse_args()
model_name, sets = args.model, [sorted(int(b) for b in s.split(",")) for s in args.set]
torch.manual_seed(0)
loaded = load_model(model_name, device="cpu", dtype="float32")
model, tok = loaded.model, loaded.tokenizer
cal = token_windows(tok, load_text(TEXT, "calibration"), args.windows, 128, 0)
_, held = heldout_windows(tok, TEXT, 256, 8)
layers = decoder_layers(model)


def out(o):
    return o[0] if isinstance(o, tuple) else o


@torch.inference_mode()
def capture(removed_before, edits, a, b, dense_y):
    """X (mlp out of a-1), B (out of a-1) on the model cut/repaired upstream; Y (out of b) dense."""
    Xs, Bs, Ys = [], [], []
    h = []
    la = layers[a - 1]
    h.append(la.mlp.register_forward_hook(lambda m, i, o: Xs.append(out(o).flatten(0, 1).float())))
    h.append(la.register_forward_hook(lambda m, i, o: Bs.append(out(o).flatten(0, 1).float())))
    with edited(model, edits), skip_blocks(model, removed_before + list(range(a, b + 1))):
        for i in range(0, len(cal), 8):
            model(cal[i : i + 8])
    for x in h:
        x.remove()
    if dense_y is None:
        hh = layers[b].register_forward_hook(lambda m, i, o: Ys.append(out(o).flatten(0, 1).float()))
        for i in range(0, len(cal), 8):
            model(cal[i : i + 8])
        hh.remove()
        dense_y = torch.cat(Ys)
    return torch.cat(Xs), torch.cat(Bs), dense_y


def ls_fit(X, B, Y):
    R = (Y - B + X).double()
    Xd = X.double()
    return solve_map(Xd.T @ Xd, Xd.T @ R, 1e-4).float()


def cos_fit(X, B, Y, T0, steps=args.steps, lr=1e-4):
    T = T0.clone().requires_grad_(True)
    opt = torch.optim.Adam([T], lr=lr)
    base = B - X
    n = X.shape[0]
    g = torch.Generator().manual_seed(0)
    for _s in range(steps):
        idx = torch.randint(0, n, (4096,), generator=g)
        pred = base[idx] + X[idx] @ T
        loss = (1 - F.cosine_similarity(pred, Y[idx], dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        full = (1 - F.cosine_similarity(base + X @ T, Y, dim=-1)).mean().item()
    return T.detach(), full


def cosdist(X, B, Y, T):
    return (1 - F.cosine_similarity(B - X + X @ T, Y, dim=-1)).mean().item()


@torch.inference_mode()
def ppl(removed, edits):
    with edited(model, edits), skip_blocks(model, removed):
        return perplexity(model, held, batch_size=4)


results = []
for removed in sets:
    row = {"removed": removed, "cut": ppl(removed, {})}
    print(row, flush=True)
    modes = ["dense"] if len(runs(removed)) == 1 else ["dense", "sequential"]
    for mode in modes:
        edits = {"ls": {}, "cos": {}}
        info = {"ls": [], "cos": []}
        before = []
        for a, b in runs(removed):
            # sequential: X, B from the model cut and LS-repaired upstream (the cosine fit reuses them)
            X, B, Y = capture(
                before if mode == "sequential" else [],
                edits["ls"] if mode == "sequential" else {},
                a,
                b,
                None,
            )
            X, B, Y = X.clone(), B.clone(), Y.clone()
            T = ls_fit(X, B, Y)
            Tc, c = cos_fit(X, B, Y, T)
            for obj, M in (("ls", T), ("cos", Tc)):
                info[obj].append(
                    {
                        "run": [a, b],
                        "cos_dist": cosdist(X, B, Y, M),
                        "rel_l2": float((B - X + X @ M - Y).pow(2).sum() / (Y - B).pow(2).sum()),
                        "cos_identity": cosdist(X, B, Y, torch.eye(X.shape[1])),
                    }
                )
                edits[obj].update(fold_into_mlp_output(model, a - 1, M.double()))
            before = before + list(range(a, b + 1))
        for obj in ("ls", "cos"):
            p = ppl(removed, edits[obj])
            row[f"{mode}-{obj}"] = p
            row[f"{mode}-{obj}-info"] = info[obj]
            print(mode, obj, round(p, 3), info[obj], flush=True)
        results.append(row)


def markdown(rows):
    lines = [
        f"### {model_name}: the linear repair's objective and activations ({args.windows} x 128 calibration tokens, "
        "held-out perplexity on 8 x 256 wiki tokens; no guard)",
        "",
        "| removed | cut | least squares | cosine | sequential least squares | sequential cosine |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row.get(k) for k in ("dense-ls", "dense-cos", "sequential-ls", "sequential-cos")]
        shown = " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
        lines.append(f"| {row['removed']} | {row['cut']:.2f} | {shown} |")
    return "\n".join(lines)


final = {}
for row in results:  # one row per mode was appended: keep the fullest per set
    final[tuple(row["removed"])] = row
rows = list(final.values())
write_results(
    args.out, "repair_objective", {"model": model_name, "windows": args.windows, "rows": rows}, markdown(rows)
)
