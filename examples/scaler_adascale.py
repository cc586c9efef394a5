"""Experiment: does AdaScale keep the result when the batch grows S-fold? (issue 13 (a))

The learning rate is tuned at a base batch B0 (S = 1, a grid, SGD with momentum 0.9, a step
decay ×0.1 at 80% of training). Then every batch scale S ∈ {1, 2, 4, 8, 16} trains on batches of
S·B0, formed by accumulating S micro-batches of B0, with four learning-rate rules:

* ``none``: the base learning rate unchanged, the same number of samples (T0/S steps);
* ``linear``: lr × S (the linear scaling rule), the same number of samples;
* ``adascale``: lr × r_t, AdaScale's gain from the scaler's same-point noise of the S
  micro-batches (``rule="adascale"``, ``statistic="same_point"``), the same number of samples;
  the decay schedule runs on the scaler's progress clock τ instead of on samples;
* ``adascale_tau``: the same, trained until τ reaches the base run's T0 steps (AdaScale's own
  protocol; it uses more samples: reported).

Two tasks: ``mlp`` (a student MLP learning a noisy teacher, mean squared error) and ``lm`` (the
backprop transformer of :mod:`gradstats.eqprop.models` on the embedded Shakespeare characters,
cross-entropy in nats). The result is the final validation loss, mean ± std over seeds, and its
ratio to the S = 1 run of the same seed.

Run: ``python examples/scaler_adascale.py --out runs/scaler-adascale`` (``--tasks mlp``, ``--seeds
3``; about 40 CPU-minutes at one thread for both tasks; ``--smoke`` takes seconds). Outputs in
``--out``: ``results.json`` and ``scaler_adascale.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gradstats import VarianceGradientScaler
from gradstats.data import shakespeare_char
from gradstats.eqprop.models import BackpropTransformer

SCALES = (1, 2, 4, 8, 16)
RULES = ("none", "linear", "adascale", "adascale_tau")
DECAY_AT = 0.8  # the schedule: lr × 0.1 from 80% of the base run's steps on


@dataclass(frozen=True)
class Task:
    """A training problem: model, micro-batches of the base size, loss, validation."""

    name: str
    base_batch: int
    base_steps: int
    lrs: tuple[float, ...]
    model: Callable[[int], torch.nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Callable[[torch.nn.Module], float]


def _sibling(name: str):
    """A function module from the example next to this one (the MLP teacher/student)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlp_task(smoke: bool) -> Task:
    mlp = _sibling("scaler_batch_size")
    teacher = mlp._teacher()
    (x, y), (x_val, y_val) = mlp._sample(teacher, 8192, seed=1), mlp._sample(teacher, 4096, 2)
    base = 8

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(x), (base,), generator=g)
        return x[rows], y[rows]

    def validate(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_val), y_val).item()

    return Task(
        "mlp", base, 64 if smoke else 4096, (0.001, 0.003, 0.01, 0.03), mlp._student, batch,
        lambda m, a, b: torch.nn.functional.mse_loss(m(a), b), validate,
    )  # fmt: skip


def lm_task(smoke: bool) -> Task:
    corpus = shakespeare_char()
    block, base = 32, 8
    train, val = corpus.train, corpus.val
    g_val = torch.Generator().manual_seed(12345)
    starts = torch.randint(0, len(val) - block - 1, (128,), generator=g_val)
    val_x = torch.stack([val[s : s + block] for s in starts])
    val_y = torch.stack([val[s + 1 : s + block + 1] for s in starts])

    def model(seed: int) -> torch.nn.Module:
        g = torch.Generator().manual_seed(seed)
        return BackpropTransformer(len(corpus.vocab), block, 64, 4, 2, generator=g)

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.randint(0, len(train) - block - 1, (base,), generator=g)
        return torch.stack([train[i : i + block] for i in s]), torch.stack(
            [train[i + 1 : i + block + 1] for i in s]
        )

    def loss(m: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        logits = m(xs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten())

    def validate(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return loss(m, val_x, val_y).item()

    steps = 32 if smoke else 512
    return Task("lm", base, steps, (0.1, 0.3, 1.0), model, batch, loss, validate)


def run(task: Task, scale: int, rule: str, lr: float, seed: int) -> dict[str, object]:
    """One training run; returns the final validation loss, steps, samples and mean gain."""
    model = task.model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    adaptive = rule.startswith("adascale")
    vgs = None
    if adaptive:
        vgs = VarianceGradientScaler(
            model.named_parameters(), optimizer=opt, statistic="same_point", rule="adascale",
            scale=float(scale), apply_to="lr",
        )  # fmt: skip
    g = torch.Generator().manual_seed(1000 + seed)
    base_steps = task.base_steps
    max_steps = base_steps if rule == "adascale_tau" else base_steps // scale
    steps, gains = 0, []
    while steps < max_steps:
        position = float(vgs.progress) if vgs is not None else steps * scale  # base-batch steps
        if rule == "adascale_tau" and position >= base_steps:
            break
        decay = 0.1 if position >= DECAY_AT * base_steps else 1.0
        factor = scale if rule == "linear" else 1
        for group in opt.param_groups:
            group["lr"] = lr * factor * decay
        opt.zero_grad()
        for _ in range(scale):
            xs, ys = task.batch(g)
            (task.loss(model, xs, ys) / scale).backward()
        if vgs is not None:
            vgs.step()
            with vgs.apply(opt):
                opt.step()
            gains.append(vgs.get_scaling_factor())
        else:
            opt.step()
        steps += 1
    final = task.validate(model)
    return {
        "task": task.name,
        "scale": scale,
        "rule": rule,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "samples": steps * scale * task.base_batch,
        "val_loss": final if math.isfinite(final) else float("nan"),
        "mean_gain": statistics.fmean(gains) if gains else float(scale if rule == "linear" else 1),
        "progress": float(vgs.progress) if vgs is not None else float(steps * scale),
    }


def tune(task: Task, seeds: list[int]) -> tuple[float, dict[float, float]]:
    """The base learning rate: the grid value with the lowest mean S = 1 validation loss."""
    scores = {}
    for lr in task.lrs:
        losses = [run(task, 1, "none", lr, s)["val_loss"] for s in seeds]
        finite = [v for v in losses if math.isfinite(v)]
        scores[lr] = statistics.fmean(finite) if len(finite) == len(losses) else math.inf
    return min(scores, key=lambda k: scores[k]), scores


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; NaN for both when a run diverged (a NaN or inf loss)."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std of the final loss and of its ratio to the same seed's S = 1 run."""
    base = {(r["task"], r["seed"]): r["val_loss"] for r in runs if r["scale"] == 1}
    rows = []
    for task in sorted({r["task"] for r in runs}):
        for scale in SCALES:
            for rule in RULES:
                key = (task, scale, rule)
                cell = [r for r in runs if (r["task"], r["scale"], r["rule"]) == key]
                if not cell:
                    continue
                losses = [r["val_loss"] for r in cell]
                ratios = [r["val_loss"] / base[(task, r["seed"])] for r in cell]
                loss_mean, loss_std = _mean_std(losses)
                ratio_mean, ratio_std = _mean_std(ratios)
                rows.append(
                    {
                        "task": task, "scale": scale, "rule": rule,
                        "val_loss_mean": loss_mean, "val_loss_std": loss_std,
                        "ratio_mean": ratio_mean, "ratio_std": ratio_std,
                        "diverged": sum(not math.isfinite(v) for v in losses),
                        "samples": statistics.fmean(r["samples"] for r in cell),
                        "mean_gain": statistics.fmean(r["mean_gain"] for r in cell),
                    }
                )  # fmt: skip
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for rule, style in zip(RULES, ("o--", "s:", "^-", "v-."), strict=True):
            cell = [r for r in rows if r["task"] == task and r["rule"] == rule]
            ax.errorbar(
                [r["scale"] for r in cell], [r["ratio_mean"] for r in cell],
                yerr=[r["ratio_std"] for r in cell], fmt=style, capsize=3, label=rule,
            )  # fmt: skip
        ax.axhspan(0.98, 1.02, color="0.9", label="within 2% of S = 1")
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="batch scale S (batch = S × base)",
            ylabel="final val loss ÷ S = 1 (same seed)",
            title=f"{task}: lr rules when the batch grows",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    lines = ["task  S  rule          val loss (mean ± std)   ÷ S=1            samples  gain"]
    for r in rows:
        lines.append(
            f"{r['task']:<4} {r['scale']:>2}  {r['rule']:<12} {r['val_loss_mean']:.4f} ± "
            f"{r['val_loss_std']:.4f}       {r['ratio_mean']:.3f} ± {r['ratio_std']:.3f}  "
            f"{r['samples']:>8.0f}  {r['mean_gain']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scaler-adascale"), help="folder")
    parser.add_argument("--tasks", default="mlp,lm", help="comma-separated: mlp, lm")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--lr", type=float, default=None, help="base lr (skips the S = 1 grid)")
    parser.add_argument(
        "--rules", default=",".join(RULES), help=f"comma-separated subset of {', '.join(RULES)}"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    makers = {"mlp": mlp_task, "lm": lm_task}
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in makers]
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; choose from {sorted(makers)}")
    rules = tuple(r for r in args.rules.split(",") if r)
    if not rules or any(r not in RULES for r in rules):
        parser.error(f"--rules: choose from {', '.join(RULES)}; got {args.rules!r}")
    seeds = list(range(1 if args.smoke else args.seeds))
    scales = (1, 2) if args.smoke else SCALES
    runs, tuning = [], {}
    for name in names:
        task = makers[name](args.smoke)
        if args.lr is None:
            lr, scores = tune(task, seeds)
        else:
            lr, scores = args.lr, {}
        tuning[name] = {"lr": lr, "grid": {str(k): v for k, v in scores.items()}}
        print(f"{name}: base lr {lr} (S = 1 grid: {scores})", flush=True)
        for scale in scales:
            for rule in ("none",) if scale == 1 else rules:
                for seed in seeds:
                    runs.append(run(task, scale, rule, lr, seed))
                    loss = runs[-1]["val_loss"]
                    print(f"{name} S={scale} {rule} seed {seed}: {loss:.4f}", flush=True)
    rows = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"tuning": tuning, "summary": rows, "runs": runs, "seeds": seeds}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    _plot(rows, args.out / "scaler_adascale.png")
    print(_table(rows))
    return record


if __name__ == "__main__":
    main()
