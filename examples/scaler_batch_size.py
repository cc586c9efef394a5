"""Experiment: SGD at several batch sizes, with and without the variance gradient scaler.

A student MLP (20-64-64-1, tanh) learns a noisy teacher MLP by SGD on 8,192 samples. Each batch
size gets the same budget of samples (so small batches take more steps) and the same learning
rate. Every run tracks the scaler's statistics; "with scaler" runs also apply the factor to the
learning rate (``apply_to="lr"``), "without" runs use α = 0 (statistics only, factor 1).

Outputs in ``--out``: ``results.json`` (final held-out losses, traces) and ``scaler_batch_size.png``
(held-out loss vs samples seen, and the measured simple noise scale B_noise = ρ·B over training).
B_noise estimates tr Σ / ‖G‖² of the per-sample gradients, a property of the problem at the
current parameters, so the traces of different batch sizes should agree where their parameters do.

Run: ``python examples/scaler_batch_size.py --out runs/scaler-batch-size`` (a few minutes on a
laptop CPU; ``--smoke`` takes seconds). Base learning rates 0.05 and 0.2 by default (``--lrs``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling import optimizer_step

BATCH_SIZES = (8, 32, 128, 512)


def _teacher(seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():  # O(1) outputs: weights ~ N(0, 4 / fan_in)
            fan_in = p.shape[1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in**0.5 if p.dim() > 1 else 0.3))
    return teacher


def _sample(teacher: torch.nn.Module, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.randn(samples, 20, generator=g)
        return x, teacher(x) + 0.3 * torch.randn(samples, 1, generator=g)


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )  # fmt: skip


VARIANTS = ("plain", "temporal", "same_point")  # which statistic (if any) sets the lr


def run(batch: int, variant: str, budget: int, lr: float, data, test, seed: int = 0) -> dict:
    """One SGD run; returns its loss, factor and B_noise traces.

    Each batch is split into two micro-batches (the same total gradient). Two scalers watch
    every run — ``temporal`` and ``same_point`` — and the one named by ``variant`` also sets the
    learning rate (``apply_to="lr"``, α = 1); the other has α = 0 (statistics only).
    """
    (x, y), (x_test, y_test) = data, test
    model = _student(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    named = list(model.named_parameters())
    scalers = {
        statistic: VarianceGradientScaler(
            named, statistic=statistic, rule="shrink", optimizer=opt, apply_to="lr",
            alpha=1.0 if statistic == variant else 0.0, beta=0.98, batch_size=batch,
        )
        for statistic in ("temporal", "same_point")
    }  # fmt: skip
    applied = scalers.get(variant, scalers["temporal"])
    g = torch.Generator().manual_seed(seed + 1)
    steps = budget // batch
    every = max(steps // 40, 1)
    trace = []
    diverged = False
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(x), (batch,), generator=g)
        opt.zero_grad()
        for part in rows.chunk(2):
            (torch.nn.functional.mse_loss(model(x[part]), y[part]) / 2).backward()
        try:
            for scaler in scalers.values():
                scaler.step()  # both read the raw gradients before any factor is applied
        except FloatingPointError:  # the scaler's guard: too many non-finite steps in a row
            diverged = True
            break
        optimizer_step(opt, applied)
        if step % every == 0 or step == steps:
            with torch.no_grad():
                loss = torch.nn.functional.mse_loss(model(x_test), y_test).item()
            stats = {k: v.statistics()["global"] for k, v in scalers.items()}
            trace.append(
                {
                    "samples": step * batch,
                    "test_loss": loss,
                    "factor": stats[variant].factor if variant in stats else 1.0,
                    "B_noise_temporal": stats["temporal"].B_noise,
                    "B_noise_same_point": stats["same_point"].B_noise,
                }
            )
    return {
        "batch_size": batch,
        "variant": variant,
        "steps": steps,
        "diverged": diverged,
        "final_test_loss": float("nan") if diverged or not trace else trace[-1]["test_loss"],
        "final_factor": float("nan") if not trace else trace[-1]["factor"],
        "trace": trace,
    }


def _finite_points(xs: list, ys: list) -> tuple[list, list]:
    pairs = [(a, b) for a, b in zip(xs, ys, strict=True) if b is not None and 0 < b < float("inf")]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in results})
    fig, grid = plt.subplots(
        len(lrs), 3, figsize=(15, 4.2 * len(lrs)), constrained_layout=True, squeeze=False
    )
    colors = dict(zip(BATCH_SIZES, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    styles = {"plain": "--", "temporal": ":", "same_point": "-"}
    for row, lr in zip(grid, lrs, strict=True):
        ax_loss, ax_factor, ax_noise = row
        for result in (r for r in results if r["lr"] == lr):
            trace, batch, variant = result["trace"], result["batch_size"], result["variant"]
            samples = [r["samples"] for r in trace]
            color, style, label = (
                colors.get(batch, "black"),
                styles[variant],
                f"B={batch} {variant}",
            )
            losses = [r["test_loss"] for r in trace]
            ax_loss.semilogy(*_finite_points(samples, losses), style, color=color, label=label)
            if variant != "plain":
                factors = [r["factor"] for r in trace]
                ax_factor.semilogy(
                    *_finite_points(samples, factors), style, color=color, label=label
                )
                continue
            for key, line in (("B_noise_same_point", "-"), ("B_noise_temporal", ":")):
                xs, ys = _finite_points(samples, [r[key] for r in trace])
                name = key.removeprefix("B_noise_")
                ax_noise.loglog(xs, ys, line, color=color, label=f"B={batch} {name}")
        ax_loss.set(
            xlabel="samples seen", ylabel="held-out MSE", title=f"base lr {lr}: plain SGD vs scaler"
        )
        ax_loss.set_ylim(top=3.0)
        ax_factor.set(
            xlabel="samples seen",
            ylabel="factor c = 1/(1 + ρ)",
            title=f"base lr {lr}: applied factor",
        )
        ax_noise.set(
            xlabel="samples seen",
            ylabel="B_noise = ρ·B",
            title=f"base lr {lr}: noise scale, plain SGD",
        )
        for ax in row:
            ax.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("runs/scaler-batch-size"), help="output folder"
    )
    parser.add_argument("--budget", type=int, default=2**16, help="training samples per run")
    parser.add_argument(
        "--lrs",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[0.05, 0.2],
        help="comma-separated base SGD learning rates (each run uses one)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = 2**9 if args.smoke else args.budget
    teacher = _teacher()
    data, test = _sample(teacher, 8192, seed=1), _sample(teacher, 4096, seed=2)
    results = []
    for lr in args.lrs:
        for batch in BATCH_SIZES:
            for variant in VARIANTS:
                result = {"lr": lr, **run(batch, variant, budget, lr, data, test)}
                results.append(result)
                outcome = "diverged" if result["diverged"] else f"{result['final_test_loss']:.4f}"
                print(
                    f"lr={lr:<5} B={batch:4d} {variant:10s} held-out MSE {outcome:>8s} "
                    f"final factor {result['final_factor']:.3g}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"budget": budget, "lrs": args.lrs, "runs": results}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    _plot(results, args.out / "scaler_batch_size.png")
    print(f"wrote {args.out.resolve()}")
    return results


if __name__ == "__main__":
    main()
