"""Experiment: prune attention heads and FFN neurons of a small GPT-2 without retraining.

A character-level GPT-2 (width 128) is trained with AdamW on the embedded Shakespeare corpus,
one model per seed (the seed sets the initialisation, the data order, the batches the
statistics are collected on and the random ranking). Then 25% and 50% of its attention heads
and, separately, of its FFN neurons are removed — the lowest-ranked groups over all layers
(``pruning_masks(scope="global")``, at least one group kept per layer; ``--scope layer``:
the same fraction of every layer) — ranked by

* gradstats' Fisher, ``kind`` = ``empirical`` / ``mc`` / ``exact``, group quantity ``mask``
  (Fisher of a multiplicative mask on the group's output, as in Kwon et al. 2022) or ``trace``
  (Σ_j F_jj over the group's parameters);
* ``batch_grad_sq``: the original system's squared mini-batch mean gradient (group trace);
* ``magnitude``: the L2 norm of the group's weights (all its q/k/v/out or in/out slices);
* ``random``: a uniformly random order.

The validation cross-entropy (nats per character) on a fixed held-out set is measured after
pruning, and again after the kept mask values are refitted by least squares on a few batches
of layer outputs (:func:`gradstats.fisher._rescale.rescale_masks`, the mask tuning of Kwon et
al. 2022). The exact Fisher enumerates all (T − 1)·V labels per sequence batch (one backward
pass each), so it is collected on fewer sequences than the others (``--exact-seqs``).

Outputs in ``--out``: ``results.json`` (every value per seed, settings, timings) and
``fisher_pruning.png`` (val CE vs fraction removed per ranking, before and after rescaling);
a table of mean ± std over seeds is printed.

Run: ``python examples/fisher_pruning.py --out runs/fisher-pruning`` (3 seeds, about 8
CPU-minutes per seed on one thread); ``--smoke`` takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from gradstats.data import shakespeare_char
from gradstats.fisher import FisherCollector, apply_masks, pruning_masks, rescale_masks

FRACTIONS = (0.25, 0.5)
STRUCTURES = {"heads": "heads", "neurons": "neurons"}  # structure -> family kind
FISHER_KINDS = ("empirical", "mc", "exact")
METHODS = (
    *(f"{k}/{q}" for k in FISHER_KINDS for q in ("mask", "trace")),
    "batch_grad_sq/trace",
    "magnitude",
    "random",
)


def _model(corpus, args, seed: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=corpus.vocab_size,
        n_positions=args.block_size,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config)


def _ce(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model, corpus, args, seed: int) -> dict:
    """AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    warmup = max(args.steps // 20, 1)
    trace, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        cosine = 0.5 * (1 + math.cos(math.pi * min(step / max(args.steps - 1, 1), 1.0)))
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)
        x, y = corpus.batch("train", args.batch_size, args.block_size, generator=g)
        loss = _ce(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(args.steps // 10, 1) == 0 or step == args.steps - 1:
            trace.append({"step": step, "train_ce": loss.item()})
    model.eval()
    return {"seconds": time.perf_counter() - start, "trace": trace}


def evaluate(model, val: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(_ce(model, x, y).item() * x.numel() for x, y in val) / sum(
            x.numel() for x, _ in val
        )


def _block_params(model) -> list[str]:
    """The attention and MLP weights of the blocks: every head / neuron family's members."""
    return [n for n, _ in model.named_parameters() if ".attn." in n or ".mlp." in n]


def collect(model, kind: str, batches: list[torch.Tensor], seed: int, max_passes: int):
    """A closed FisherCollector of ``kind`` on ``batches``, and the seconds it took."""
    start = time.perf_counter()
    fc = FisherCollector(
        model,
        kind,
        "causal_lm",
        params=_block_params(model),
        seed=seed,
        max_exact_passes=max_passes,
    )
    for x in batches:
        fc.collect(x)
    fc.close()
    model.zero_grad(set_to_none=True)
    return fc, time.perf_counter() - start


def family_scores(fc, structure: str, method: str, model, seed: int) -> dict[str, torch.Tensor]:
    """{family: score [G]} for a non-Fisher ranking (higher = more important)."""
    fams = [f for f in fc.families if f.kind == STRUCTURES[structure]]
    if method == "batch_grad_sq/trace":
        values = fc.group_fisher("trace")
        return {f.name: values[f.name].double() for f in fams}
    if method == "random":
        g = torch.Generator().manual_seed(10_000 + seed)
        return {f.name: torch.rand(f.size, generator=g, dtype=torch.float64) for f in fams}
    params = dict(model.named_parameters())
    out = {}
    for fam in fams:  # magnitude: sqrt of Σ θ² over every member slice of the group
        total = torch.zeros(fam.size + 1, dtype=torch.float64)
        for m in fam.members:
            p = params[m.param].detach().double() ** 2
            marginal = p.sum([d for d in range(p.dim()) if d != m.axis]) if p.dim() > 1 else p
            assign = torch.tensor(m.assign)
            total.index_add_(0, torch.where(assign < 0, fam.size, assign), marginal)
        out[fam.name] = total[: fam.size].sqrt()
    return out


def scoped_masks(
    scores: dict[str, torch.Tensor], fraction: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """The procedure of ``pruning_masks(scope=..., min_keep=1)`` on arbitrary scores: the
    lowest-scored groups over all families (``"global"``), or the same fraction of every
    family (``"layer"``, largest-remainder rounding)."""
    names = list(scores)
    total = sum(len(s) for s in scores.values())
    count = round(fraction * total)
    masks = {n: torch.ones(len(s), dtype=torch.bool) for n, s in scores.items()}
    if scope == "layer":
        quotas = {n: count * len(s) for n, s in scores.items()}  # in units of 1/total
        counts = {n: min(q // total, len(scores[n]) - 1) for n, q in quotas.items()}
        order = sorted(names, key=lambda n: (-(quotas[n] % total), names.index(n)))
        while sum(counts.values()) < count:
            for n in order:
                if sum(counts.values()) < count and counts[n] < len(scores[n]) - 1:
                    counts[n] += 1
        for n in names:
            masks[n][scores[n].argsort()[: counts[n]]] = False
        return masks
    flat = torch.cat([scores[n] for n in names])
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    index = torch.cat([torch.arange(len(scores[n])) for n in names])
    kept, removed = {n: len(s) for n, s in scores.items()}, 0
    for j in flat.argsort().tolist():
        if removed == count:
            break
        name = names[int(owner[j])]
        if kept[name] > 1:
            masks[name][index[j]] = False
            kept[name] -= 1
            removed += 1
    return masks


def run_seed(corpus, args, seed: int, val) -> dict:
    model = _model(corpus, args, seed)
    record: dict = {"seed": seed, "train": train(model, corpus, args, seed)}
    record["val_ce"] = evaluate(model, val)
    print(
        f"seed {seed}: trained in {record['train']['seconds']:.0f} s, val CE "
        f"{record['val_ce']:.4f}",
        flush=True,
    )
    g = torch.Generator().manual_seed(20_000 + seed)
    fisher_batches = [
        corpus.batch("train", args.fisher_batch, args.block_size, generator=g)[0]
        for _ in range(args.fisher_batches)
    ]
    exact_batches = [fisher_batches[0][: args.exact_seqs]]
    ls_batches = [
        corpus.batch("train", args.fisher_batch, args.block_size, generator=g)[0]
        for _ in range(args.ls_batches)
    ]
    passes = (args.block_size - 1) * corpus.vocab_size
    collectors, timing = {}, {}
    for kind in (*FISHER_KINDS, "batch_grad_sq"):
        batches = exact_batches if kind == "exact" else fisher_batches
        collectors[kind], timing[kind] = collect(model, kind, batches, seed, passes)
        print(f"  {kind}: {timing[kind]:.1f} s", flush=True)
    record["collect_seconds"] = timing
    record["exact"] = {"passes_per_batch": passes, "sequences": args.exact_seqs}
    results: dict = {}
    for structure in STRUCTURES:
        for method in METHODS:
            kind, _, quantity = method.partition("/")
            for fraction in FRACTIONS:
                if kind in FISHER_KINDS:
                    fc = collectors[kind]
                    masks = pruning_masks(
                        fc, fraction, structure=structure, kind=quantity, scope=args.scope
                    )
                    scores = {n: v.double() for n, v in fc.group_fisher(quantity).items()}
                    check = scoped_masks({n: scores[n] for n in masks}, fraction, args.scope)
                    assert all(torch.equal(check[n], masks[n]) for n in masks)
                else:
                    scores = family_scores(
                        collectors["batch_grad_sq"], structure, method, model, seed
                    )
                    masks = scoped_masks(scores, fraction, args.scope)
                group_map = collectors["empirical"].group_map
                with apply_masks(model, masks, group_map):
                    pruned = evaluate(model, val)
                fitted = rescale_masks(model, masks, group_map, ls_batches)
                with apply_masks(model, fitted, group_map):
                    rescaled = evaluate(model, val)
                key = f"{structure}/{method}/{fraction}"
                results[key] = {
                    "pruned": pruned,
                    "rescaled": rescaled,
                    "removed": {n: torch.nonzero(~m).flatten().tolist() for n, m in masks.items()},
                }
            print(
                f"  {structure:7s} {method:20s} "
                + "  ".join(
                    f"{f:.0%}: {results[f'{structure}/{method}/{f}']['pruned']:.3f} -> "
                    f"{results[f'{structure}/{method}/{f}']['rescaled']:.3f}"
                    for f in FRACTIONS
                ),
                flush=True,
            )
    record["results"] = results
    return record


def summary(records: list[dict]) -> dict:
    """{key: {"pruned": [mean, std], "rescaled": [mean, std]}} over seeds."""

    def stats(values: list[float]) -> list[float]:
        return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

    out: dict = {"unpruned": stats([r["val_ce"] for r in records])}
    for key in records[0]["results"]:
        out[key] = {
            stage: stats([r["results"][key][stage] for r in records])
            for stage in ("pruned", "rescaled")
        }
    return out


def table(summ: dict, stage: str) -> str:
    cols = [(s, f) for s in STRUCTURES for f in FRACTIONS]
    head = "| ranking | " + " | ".join(f"{s} −{f:.0%}" for s, f in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for method in METHODS:
        cells = [summ[f"{s}/{method}/{f}"][stage] for s, f in cols]
        lines.append(f"| {method} | " + " | ".join(f"{m:.3f} ± {d:.3f}" for m, d in cells) + " |")
    return "\n".join(lines)


def plot(summ: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained", sharey="row")
    base = summ["unpruned"]
    for row, structure in zip(grid, STRUCTURES, strict=True):
        for ax, stage in zip(row, ("pruned", "rescaled"), strict=True):
            for method in METHODS:
                means = [base[0]] + [summ[f"{structure}/{method}/{f}"][stage][0] for f in FRACTIONS]
                stds = [base[1]] + [summ[f"{structure}/{method}/{f}"][stage][1] for f in FRACTIONS]
                style = "-" if "mask" in method else "--" if "trace" in method else ":"
                ax.errorbar(
                    [0.0, *FRACTIONS],
                    means,
                    yerr=stds,
                    fmt=style,
                    marker="o",
                    capsize=3,
                    label=method,
                )
            title = "no retraining" if stage == "pruned" else "kept masks rescaled (LS)"
            ranked = [  # the y range of every ranking but random; random is written where off it
                summ[f"{structure}/{m}/{f}"][st]
                for m in METHODS[:-1]
                for f in FRACTIONS
                for st in ("pruned", "rescaled")
            ]  # over both panels of the row (they share the y axis)
            top = max(m + d for m, d in ranked) + 0.02
            ax.set_ylim(base[0] - 0.01, top)
            for f in FRACTIONS:
                mean, std = summ[f"{structure}/random/{f}"][stage]
                if mean > top:
                    ax.annotate(
                        f"random: {mean:.2f} ± {std:.2f} ↑",
                        (f, top),
                        ha="right",
                        va="top",
                        fontsize=8,
                        xytext=(-6, -4),
                        textcoords="offset points",
                    )
            ax.set(
                xlabel=f"fraction of {structure} removed",
                ylabel="val CE (nats/char)",
                title=f"{structure}: {title}",
                xticks=[0.0, *FRACTIONS],
            )
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/fisher-pruning"),
        help="output folder (results.json, fisher_pruning.png)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one model per seed (init, data order, random ranking)",
    )
    parser.add_argument("--steps", type=int, default=800, help="AdamW steps per model")
    parser.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="training sequences per step")
    parser.add_argument("--block-size", type=int, default=64, help="context length T")
    parser.add_argument("--width", type=int, default=128, help="n_embd")
    parser.add_argument("--layers", type=int, default=4, help="n_layer")
    parser.add_argument("--heads", type=int, default=4, help="n_head per layer")
    parser.add_argument(
        "--fisher-batches",
        type=int,
        default=4,
        help="batches for the empirical / mc / batch_grad_sq statistics",
    )
    parser.add_argument("--fisher-batch", type=int, default=16, help="sequences per such batch")
    parser.add_argument(
        "--exact-seqs",
        type=int,
        default=2,
        help="sequences for the exact Fisher ((T−1)·V backward passes)",
    )
    parser.add_argument(
        "--ls-batches",
        type=int,
        default=4,
        help="batches of layer outputs for the least-squares rescaling",
    )
    parser.add_argument("--val-seqs", type=int, default=128, help="held-out sequences (fixed)")
    parser.add_argument(
        "--scope",
        choices=("global", "layer"),
        default="global",
        help="global: the lowest-ranked groups over all layers; layer: the same fraction of "
        "every layer",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.block_size, args.width = args.seeds[:2], 20, 8, 32
        args.layers, args.heads, args.fisher_batches, args.fisher_batch = 2, 4, 2, 4
        args.exact_seqs, args.ls_batches, args.val_seqs = 1, 2, 8
    torch.set_num_threads(args.threads)
    corpus = shakespeare_char()
    gv = torch.Generator().manual_seed(12_345)
    val = [
        corpus.batch("val", 16, args.block_size, generator=gv)
        for _ in range(max(args.val_seqs // 16, 1))
    ]
    start = time.perf_counter()
    records = [run_seed(corpus, args, seed, val) for seed in args.seeds]
    summ = summary(records)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vocab_size": corpus.vocab_size,
        "seconds": time.perf_counter() - start,
        "seeds": records,
        "summary": summ,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(summ, args.out / "fisher_pruning.png")
    m, s = summ["unpruned"]
    print(f"\nunpruned val CE {m:.3f} ± {s:.3f} over {len(records)} seeds")
    for stage in ("pruned", "rescaled"):
        print(f"\nval CE after pruning ({stage}), mean ± std over seeds:\n{table(summ, stage)}")
    return result


if __name__ == "__main__":
    main()
