"""Experiment: the scaler's noise scale B_noise against a ground truth, along training (13 (c)).

A student MLP (20-64-64-1, tanh) learns a noisy teacher by plain SGD at batch 32. Three scalers
watch the same run (factor never applied, ``alpha=0``): ``per_sample`` (per-example gradient
norms of each batch, one backward), ``same_point`` (the batch as two micro-batches) and
``temporal`` (an EMA window over steps). At checkpoints along training the ground truth is the
noise scale at the current θ from 4,096 per-example gradients (``torch.func.vmap(grad)``):
B_noise = tr Σ / ‖G‖² with tr Σ the per-sample gradient covariance's trace and ‖G‖² the squared
mean gradient (the unbiased estimate ‖ḡ‖² − tr Σ / N). Reported: each scaler's B_noise ÷ truth,
mean ± std over seeds, at each checkpoint.

Run: ``python examples/scaler_noise_truth.py --out runs/scaler-noise-truth`` (a few CPU-minutes;
``--smoke`` takes seconds). Outputs: ``results.json`` and ``scaler_noise_truth.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

from gradstats import VarianceGradientScaler

STATISTICS = ("per_sample", "same_point", "temporal")
BATCH = 32


def _teacher_student(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    g = torch.Generator().manual_seed(1234)
    teacher = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.3))
    torch.manual_seed(seed)
    student = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip
    return teacher, student


def _data(teacher: torch.nn.Module, n: int, g: torch.Generator):
    x = torch.randn(n, 20, generator=g)
    with torch.no_grad():
        return x, teacher(x) + 0.3 * torch.randn(n, 1, generator=g)


def ground_truth(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """B_noise at the current θ from the per-example gradients of all of (x, y), in float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.mse_loss(out, yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per.values()], dim=1).double()
    mean = flat.mean(0)
    trace = (flat - mean).square().sum(1).mean() * len(x) / (len(x) - 1)
    signal = mean.square().sum() - trace / len(x)
    return float(trace / signal)


def run(seed: int, steps: int, checkpoints: int, lr: float) -> list[dict[str, float]]:
    teacher, model = _teacher_student(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x_pool, y_pool = _data(teacher, 4096, g)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scalers = {
        s: VarianceGradientScaler(
            model.named_parameters(), statistic=s, rule="shrink", alpha=0.0, beta=0.9,
            batch_size=BATCH,
            confidence=None, **({"model": model} if s == "per_sample" else {}),
        )
        for s in STATISTICS
    }  # fmt: skip
    every = max(steps // checkpoints, 1)
    rows = []
    for step in range(1, steps + 1):
        x, y = _data(teacher, BATCH, g)
        opt.zero_grad()
        for part in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            (torch.nn.functional.mse_loss(model(x[part]), y[part]) / 2).backward()
        for scaler in scalers.values():
            scaler.step()
        opt.step()
        if step % every == 0:
            truth = ground_truth(model, x_pool, y_pool)
            row = {"step": float(step), "truth": truth}
            for name, scaler in scalers.items():
                b_noise = scaler.statistics()["global"].B_noise
                row[name] = math.nan if b_noise is None else b_noise
            rows.append(row)
    return rows


def _ratio_stats(runs: list[list[dict[str, float]]], name: str, index: int) -> tuple[float, float]:
    ratios = [r[index][name] / r[index]["truth"] for r in runs]
    finite = [v for v in ratios if math.isfinite(v)]
    if not finite:  # every estimate "no detectable signal" (B_noise = ∞), or none
        return (math.inf if any(v == math.inf for v in ratios) else math.nan), math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def pooled(runs: list[list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Over every checkpoint of every seed: the median ratio, the geometric mean of the finite
    ratios and the fraction of estimates that were infinite (no detectable signal)."""
    out = {}
    for name in STATISTICS:
        ratios = [row[name] / row["truth"] for run in runs for row in run]
        finite = [v for v in ratios if math.isfinite(v) and v > 0]
        out[name] = {
            "median": statistics.median(ratios),
            "geometric_mean": math.exp(statistics.fmean(map(math.log, finite)))
            if finite
            else math.nan,
            "infinite_fraction": sum(v == math.inf for v in ratios) / len(ratios),
        }
    return out


def summarise(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    out = []
    for index, row in enumerate(runs[0]):
        entry = {
            "step": row["step"],
            "truth_mean": statistics.fmean(r[index]["truth"] for r in runs),
        }
        for name in STATISTICS:
            mean, std = _ratio_stats(runs, name, index)
            entry[f"{name}_ratio_mean"], entry[f"{name}_ratio_std"] = mean, std
        out.append(entry)
    return out


def _plot(summary: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    steps = [r["step"] for r in summary]
    for name, style in zip(STATISTICS, ("o-", "s--", "^:"), strict=True):
        ax.errorbar(
            steps, [r[f"{name}_ratio_mean"] for r in summary],
            yerr=[r[f"{name}_ratio_std"] for r in summary], fmt=style, capsize=3, label=name,
        )  # fmt: skip
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_yscale("log")
    ax.set(
        xlabel="SGD step (batch 32)",
        ylabel="B_noise ÷ ground truth (4,096 per-example gradients)",
        title="Noise scale estimates along training",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scaler-noise-truth"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds (student init and data)")
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--smoke", action="store_true", help="tiny run: checks the script runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, checkpoints = (40, 2) if args.smoke else (args.steps, 8)
    seeds = range(1 if args.smoke else args.seeds)
    runs = [run(seed, steps, checkpoints, args.lr) for seed in seeds]
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    overall = pooled(runs)
    record = {"summary": summary, "pooled": overall, "runs": runs, "lr": args.lr, "batch": BATCH}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    _plot(summary, args.out / "scaler_noise_truth.png")
    print("step   truth    " + "   ".join(f"{n} ÷ truth" for n in STATISTICS))
    for r in summary:
        cells = "   ".join(
            f"{r[f'{n}_ratio_mean']:.2f} ± {r[f'{n}_ratio_std']:.2f}" for n in STATISTICS
        )
        print(f"{r['step']:>5.0f}  {r['truth_mean']:>7.1f}  {cells}")
    for name, row in overall.items():
        print(
            f"{name}: median ratio {row['median']:.2f}, geometric mean "
            f"{row['geometric_mean']:.2f}, infinite {row['infinite_fraction']:.0%}"
        )
    return record


if __name__ == "__main__":
    main()
