"""Experiment: does the scaler help stable-baselines3 PPO? (issue 13 (b))

SB3's PPO with its default hyperparameters (``MlpPolicy``: two hidden layers of 64, tanh,
separate policy and value networks; Adam, lr 3e-4, n_steps 2048, batch 64, 10 epochs, γ 0.99,
GAE λ 0.95, clip 0.2, entropy 0, value coefficient 0.5, max grad norm 0.5; one environment) on
CartPole-v1 and Acrobot-v1, with these variants:

* ``plain``: the constant lr 3e-4;
* ``linear_decay``: SB3's linear schedule lr = 3e-4 × (remaining progress), the baseline a user
  would pick;
* ``temporal_shrink``: the original's scaler, the library's defaults before issue 13
  (``statistic="temporal"``, ``rule="shrink"``, f = 1/(1 + ρ)) through
  :class:`~gradstats.integrations.sb3.VarianceScalingCallback` (``apply_to="lr"``) on the
  constant lr;
* ``per_sample_shrink``: the same with ``statistic="per_sample"``: the exact same-point noise of
  each minibatch from the per-example gradient norms of its one backward (unit: one transition;
  the policy is Linear layers, so the norms come from the layer identity);
* ``per_sample_shrink_min``: as ``per_sample_shrink`` with ``min_scale=0.1``.

``rule="adascale"`` is not a variant: PPO's batch is fixed, S = 1, and the AdaScale gain
r = (1 + Sρ)/(1 + ρ) is exactly 1 — the plain run (what the callback's defaults now do, with
the ``per_sample`` noise of the policy measured and logged). ``statistic="same_point"`` is not
either: stock PPO does one backward per minibatch, so it never gets an estimate (factor 1).

Each run trains for ``--timesteps`` (rounded up to whole rollouts of 2048 by SB3) and is then
evaluated with SB3's ``evaluate_policy`` over 20 deterministic episodes on a fresh environment
(seeded 10_000 + seed). Each run is its own JSON file under ``--out``/runs, skipped when present,
so an interrupted experiment resumes; the summary (mean ± std over seeds, n) is rebuilt from
every run file found: ``results.json`` and ``scaler_ppo.png`` in ``--out`` (or ``--figure``).

Run: ``OMP_NUM_THREADS=1 python examples/scaler_ppo.py --out runs/scaler-ppo`` (5 seeds, both
envs, all variants, 50,000 steps; the README's table ran CartPole-v1 with ``--envs CartPole-v1
--timesteps 20000`` into the same folder, since at 50,000 every variant reaches 500); ``--smoke``
takes seconds; ``--summary-only`` rebuilds the table and plot from the run files.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

ENVS = ("CartPole-v1", "Acrobot-v1")
VARIANTS = (
    "plain",
    "linear_decay",
    "temporal_shrink",
    "per_sample_shrink",
    "per_sample_shrink_min",
)
LR = 3e-4
EVAL_EPISODES = 20

SCALER = {
    "temporal_shrink": {"statistic": "temporal", "rule": "shrink"},
    "per_sample_shrink": {"statistic": "per_sample", "rule": "shrink"},
    "per_sample_shrink_min": {"statistic": "per_sample", "rule": "shrink", "min_scale": 0.1},
}


def _run_path(out: Path, env: str, variant: str, seed: int) -> Path:
    return out / "runs" / f"{env}__{variant}__{seed}.json"


def run(env_id: str, variant: str, seed: int, timesteps: int, smoke: bool = False) -> dict:
    """Train one PPO run and evaluate it; returns the record written to its JSON file."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    from gradstats.integrations.sb3 import VarianceScalingCallback

    start = time.perf_counter()
    lr = (lambda remaining: LR * remaining) if variant == "linear_decay" else LR
    extra = {"n_steps": 64, "batch_size": 32, "n_epochs": 2} if smoke else {}
    model = PPO("MlpPolicy", env_id, learning_rate=lr, seed=seed, device="cpu", verbose=0, **extra)
    trace: list[dict[str, float]] = []
    callbacks: list[BaseCallback] = []
    scaling = None
    if variant in SCALER:
        kwargs = dict(SCALER[variant])
        if kwargs["statistic"] == "per_sample":
            kwargs["model"] = model.policy
        scaling = VarianceScalingCallback(apply_to="lr", **kwargs)

        class Trace(BaseCallback):
            """The scaler's global statistics after each PPO update (read at rollout end)."""

            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                _read(scaling, self.num_timesteps, trace)

        callbacks = [scaling, Trace()]
    model.learn(timesteps, callback=CallbackList(callbacks) if callbacks else None)
    if scaling is not None:
        _read(scaling, model.num_timesteps, trace)
        scaling.scaler.remove_hooks()
    train_s = time.perf_counter() - start
    eval_env = make_vec_env(env_id, n_envs=1, seed=10_000 + seed)
    episodes = 2 if smoke else EVAL_EPISODES
    returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True
    )
    factors = [t["factor"] for t in trace if math.isfinite(t["factor"])]
    return {
        "env": env_id,
        "variant": variant,
        "seed": seed,
        "timesteps": int(model.num_timesteps),
        "eval_episodes": episodes,
        "eval_return": statistics.fmean(returns),
        "eval_returns": [float(r) for r in returns],
        "mean_factor": statistics.fmean(factors) if factors else 1.0,
        "trace": trace,
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
    }


def _read(callback: object, step: int, trace: list[dict[str, float]]) -> None:
    scaler = getattr(callback, "scaler", None)
    if scaler is None:
        return
    stats = scaler.statistics().get("global")
    if stats is None:  # before the first update
        return

    def value(name: str) -> float:
        v = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
        return float(v) if v is not None else math.nan

    trace.append(
        {
            "timesteps": step,
            "factor": scaler.get_scaling_factor(),
            "rho": value("normalized_variance"),
            "B_noise": value("B_noise"),
        }
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std (sample std, n seeds) of the eval return per (env, variant)."""
    rows = []
    for env in [e for e in ENVS if any(r["env"] == e for r in runs)]:
        for variant in VARIANTS:
            cell = sorted(
                (r for r in runs if r["env"] == env and r["variant"] == variant),
                key=lambda r: r["seed"],
            )
            if not cell:
                continue
            mean, std = _mean_std([r["eval_return"] for r in cell])
            rows.append(
                {
                    "env": env,
                    "variant": variant,
                    "n": len(cell),
                    "seeds": [r["seed"] for r in cell],
                    "eval_return_mean": mean,
                    "eval_return_std": std,
                    "eval_returns": [r["eval_return"] for r in cell],
                    "mean_factor": statistics.fmean(r["mean_factor"] for r in cell),
                    "timesteps": cell[0]["timesteps"],
                    "train_s_mean": statistics.fmean(r["train_s"] for r in cell),
                }
            )
    return rows


def _plot(rows: list[dict], runs: list[dict], path: Path) -> None:
    """Top: eval return per variant (bars: mean ± std, dots: seeds). Bottom: the scaler's
    factor after each PPO update (one line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [e for e in ENVS if any(r["env"] == e for r in rows)]
    fig, axes = plt.subplots(2, len(envs), figsize=(5.5 * len(envs), 7.6), squeeze=False)
    for ax, env in zip(axes[1], envs, strict=True):
        for i, variant in enumerate(v for v in VARIANTS if v in SCALER):
            traces = [r["trace"] for r in runs if (r["env"], r["variant"]) == (env, variant)]
            for j, trace in enumerate(t for t in traces if t):
                # the last read (after the final update) replaces the one at the same step
                points = {t["timesteps"]: t["factor"] for t in trace}
                ax.plot(
                    list(points), list(points.values()),
                    color=f"C{i + 1}", alpha=0.7, lw=1, label=variant if j == 0 else None,
                )  # fmt: skip
        ax.set_yscale("log")
        ax.set(xlabel="timesteps", ylabel="scaler factor (lr × factor)")
        ax.set_title(f"{env}: the shrink factor along training", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax, env in zip(axes[0], envs, strict=True):
        cell = [r for r in rows if r["env"] == env]
        xs = range(len(cell))
        ax.bar(
            xs, [r["eval_return_mean"] for r in cell], yerr=[r["eval_return_std"] for r in cell],
            capsize=4, color="0.8", edgecolor="0.3",
        )  # fmt: skip
        for x, r in zip(xs, cell, strict=True):
            ys = r["eval_returns"]
            offsets = [(i - (len(ys) - 1) / 2) * 0.08 for i in range(len(ys))]
            ax.plot([x + o for o in offsets], ys, "o", color="C0", ms=4)
        labels = [f"{r['variant']} (n={r['n']})" for r in cell]
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=20, ha="right")
        ax.set(
            ylabel=f"eval return ({EVAL_EPISODES} deterministic episodes)",
            title=f"PPO {env}, {cell[0]['timesteps']:,} steps: mean ± std, dots = seeds",
        )
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    lines = ["env          variant                 eval return (mean ± std)   n  mean factor"]
    for r in rows:
        lines.append(
            f"{r['env']:<12} {r['variant']:<22} {r['eval_return_mean']:8.1f} ± "
            f"{r['eval_return_std']:6.1f}          {r['n']}  {r['mean_factor']:.3f}"
        )
    return "\n".join(lines)


def _split(value: str, valid: tuple[str, ...], flag: str, parser: argparse.ArgumentParser):
    items = tuple(v for v in value.split(",") if v)
    if not items or any(v not in valid for v in items):
        parser.error(f"{flag}: choose from {', '.join(valid)}; got {value!r}")
    return items


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/scaler-ppo"), help="folder")
    parser.add_argument("--envs", default=",".join(ENVS), help="comma-separated gymnasium ids")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,2,3")
    parser.add_argument("--timesteps", type=int, default=50_000, help="training steps per run")
    parser.add_argument("--smoke", action="store_true", help="tiny runs: checks the script runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--figure", type=Path, default=None, help="PNG path (default: in --out)")
    parser.add_argument("--summary-only", action="store_true", help="no training: rebuild table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    envs = _split(args.envs, ENVS, "--envs", parser)
    variants = _split(args.variants, VARIANTS, "--variants", parser)
    if "-" in args.seeds:
        lo, hi = args.seeds.split("-")
        seeds = list(range(int(lo), int(hi) + 1))
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    timesteps = 128 if args.smoke else args.timesteps
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for seed in seeds:  # seed-major: an interrupted experiment has whole seeds
            for env in envs:
                for variant in variants:
                    path = _run_path(args.out, env, variant, seed)
                    if path.exists():
                        continue
                    record = run(env, variant, seed, timesteps, smoke=args.smoke)
                    path.write_text(json.dumps(record, indent=1))
                    print(
                        f"{env} {variant} seed {seed}: eval {record['eval_return']:.1f}, "
                        f"factor {record['mean_factor']:.3f}, {record['total_s']:.0f} s",
                        flush=True,
                    )
    runs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    rows = summarise(runs)
    record = {
        "setup": {
            "algorithm": "stable_baselines3.PPO, MlpPolicy, SB3 defaults",
            "lr": LR,
            "eval": f"evaluate_policy, {EVAL_EPISODES} deterministic episodes, env seed 10000+seed",
            "variants": {v: SCALER.get(v, {}) for v in VARIANTS},
        },
        "summary": rows,
        "runs": [{k: v for k, v in r.items() if k != "trace"} for r in runs],
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    if rows:
        _plot(rows, runs, args.figure or args.out / "scaler_ppo.png")
    print(_table(rows))
    return record


if __name__ == "__main__":
    main()
