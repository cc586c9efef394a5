r"""The gradient noise scale of ``gradstats noise``: exact means over batches, SE, layers, plot.

Per batch b (B sequences, fixed θ) and tensor j the ``per_sample`` statistic of
:class:`~gradstats.VarianceGradientScaler` gives, from the per-sequence gradients g_i and their
mean ĝ, the unbiased two-batch estimates with B_small = 1 (spec/scaling.md §6)

    T_bj = (Σ_i ‖g_i‖² − B‖ĝ‖²)/(B − 1)     (tr Σ_j: the per-sequence gradient covariance),
    G_bj = ‖ĝ‖² − T_bj / B                  (‖G_j‖²: the squared true gradient).

A group of tensors (a layer, or all of them: "global") sums its tensors, T_b = Σ_j T_bj and
G_b = Σ_j G_bj. Over the N batches the estimates are plain means (no EMA weighting),
T̄ = (1/N) Σ_b T_b and Ḡ = (1/N) Σ_b G_b, both unbiased, and the noise scale is their ratio

    B_noise = T̄ / Ḡ  (McCandlish et al. 2018: the critical batch B_crit ≈ B_noise),

undefined ("no detectable signal") when Ḡ ≤ 0. Standard errors over batches: se(T̄) = s_T/√N,
se(Ḡ) = s_G/√N with the sample standard deviations (N − 1) of the per-batch values, and by the
delta method (with the covariance s_TG of T_b and G_b)

    se(B_noise)² = (se(T̄)² − 2 B_noise s_TG/N + B_noise² se(Ḡ)²) / Ḡ²,

none with a single batch. The suggested batch size is B_noise rounded (at least 1).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from gradstats._files import atomic_path

__all__ = ["layer_of", "plot_layers", "summarise"]

_INDEX = re.compile(r"^\d+$")


def layer_of(name: str) -> str:
    """The layer of parameter ``name``: the prefix up to its first numeric part (a
    transformer block, ``transformer.h.0``, ``model.layers.3``), else its module
    (``transformer.wte``; a top-level tensor is its own layer)."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if _INDEX.match(part):
            return ".".join(parts[: k + 1])
    return ".".join(parts[:-1]) or name


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def group_estimate(trace: torch.Tensor, signal: torch.Tensor) -> dict[str, Any]:
    """B_noise and its pieces from per-batch ``trace`` (T_b) and ``signal`` (G_b), float64 [N]."""
    n = trace.numel()
    t_mean, g_mean = float(trace.mean()), float(signal.mean())
    b_noise = t_mean / g_mean if g_mean > 0 else math.nan
    t_se = g_se = b_se = math.nan
    if n >= 2:
        t_var, g_var = float(trace.var()), float(signal.var())
        cov = float(((trace - t_mean) * (signal - g_mean)).sum()) / (n - 1)
        t_se, g_se = math.sqrt(t_var / n), math.sqrt(g_var / n)
        if math.isfinite(b_noise):
            var = (t_var - 2 * b_noise * cov + b_noise**2 * g_var) / n
            b_se = math.sqrt(max(var, 0.0)) / g_mean
    return {
        "B_noise": _finite(b_noise),
        "B_noise_se": _finite(b_se),
        "trace_sigma": t_mean,
        "trace_sigma_se": _finite(t_se),
        "grad_sq_norm": g_mean,
        "grad_sq_norm_se": _finite(g_se),
        "suggested_batch_size": max(1, round(b_noise)) if math.isfinite(b_noise) else None,
        "no_signal": g_mean <= 0,
    }


def summarise(per_batch: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """``{"global": ..., "layers": {layer: ...}}`` from ``per_batch`` [N, J, 2] float64
    (T_bj, G_bj) of the tensors ``names`` (see the module docstring)."""
    layers: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        layers.setdefault(layer_of(name), []).append(j)
    overall = group_estimate(per_batch[:, :, 0].sum(1), per_batch[:, :, 1].sum(1))
    overall["tensors"] = len(names)
    rows = {}
    for layer, index in layers.items():
        cols = per_batch[:, index]
        rows[layer] = group_estimate(cols[:, :, 0].sum(1), cols[:, :, 1].sum(1))
        rows[layer]["tensors"] = [names[j] for j in index]
    return {"global": overall, "layers": rows}


def plot_layers(summary: dict[str, Any], path: Path, title: str) -> None:
    """Bar chart of the per-layer B_noise with SE error bars (and the global one as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    names = list(layers)
    values = [math.nan if r["B_noise"] is None else r["B_noise"] for r in layers.values()]
    errors = [0.0 if r["B_noise_se"] is None else r["B_noise_se"] for r in layers.values()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    overall = summary["global"]["B_noise"]
    if overall is not None:
        ax.axhline(overall, color="tab:red", linestyle="--", label=f"global {overall:.3g}")
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set(xlabel="layer", ylabel="B_noise = tr Σ / ‖G‖² (sequences)", title=title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
