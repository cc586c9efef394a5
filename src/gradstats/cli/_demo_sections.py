"""The measured parts of ``gradstats demo`` that are not a CLI command of their own.

* :func:`exact_streaming` — per-sample gradients of a softmax regression streamed in uneven
  batches through four :class:`~gradstats.moments.RunningMoments` and merged in a shuffled
  order, checked against autograd and the dense float64 reference.
* :func:`scaler_trace` — the variance gradient scaler watching the backprop transformer train:
  the same-point ρ (from the step's micro-batches) and the temporal ρ (an EMA over steps) beside
  a reference ρ at the current parameters from many per-sequence gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from gradstats._files import atomic_path
from gradstats.moments import RunningMoments
from gradstats.scaling import VarianceGradientScaler
from gradstats.testing import reference_moments

__all__ = ["exact_streaming", "plot_scaler_trace", "reference_rho", "scaler_trace"]


def _softmax_gradients(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_i = vec((softmax(W x_i) − e_{y_i}) x_iᵀ): cross-entropy gradients, one row per sample."""
    residual = torch.softmax(x @ weight.T, dim=1)
    residual[torch.arange(len(y)), y] -= 1.0
    return (residual[:, :, None] * x[:, None, :]).reshape(len(y), -1)


def exact_streaming(seed: int, samples: int = 4096, features: int = 20, classes: int = 10):
    """Four workers, uneven batches, a shuffled merge: max relative errors vs the references."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g, dtype=torch.float64)
    teacher = 2.0 * torch.randn(classes, features, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ teacher.T, dim=1), 1, generator=g).squeeze(1)
    weight = 0.1 * torch.randn(classes, features, generator=g, dtype=torch.float64)
    grads = _softmax_gradients(weight, x, y)
    shards = [RunningMoments(grads.shape[1]) for _ in range(4)]
    start = 0
    while start < len(grads):
        size = int(torch.randint(1, 300, (), generator=g))
        shards[int(torch.randint(0, 4, (), generator=g))].update(grads[start : start + size])
        start += size
    order = torch.randperm(4, generator=g).tolist()
    merged = shards[order[0]]
    for index in order[1:]:
        merged.merge(shards[index])
    w = weight.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ w.T, y), w)
    ref = reference_moments(grads)
    return {
        "per_sample_gradients": len(grads),
        "merge_order": order,
        "max_rel_error_mean_vs_autograd": float(
            (merged.mean - grad.reshape(-1)).abs().max() / grad.abs().max()
        ),
        "max_rel_error_variance_vs_dense": float(
            (merged.variance() - ref["unbiased_variance"]).abs().max()
            / ref["unbiased_variance"].abs().max()
        ),
    }


class LossModel(Protocol):
    """A model with ``loss(x, y)``: the summed cross-entropy of the batch's targets."""

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def reference_rho(model: LossModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """ρ = tr Cov(ĝ)/‖E ĝ‖² of a mean gradient ĝ over ``batch_size`` sequences, at the current θ,
    from the per-sequence gradients of the N rows of ``x`` (N ≫ ``batch_size`` for a precise value).

    h_n = ∇ℓ_n / T is sequence n's token-mean gradient (one backward per sequence); with S their
    unbiased covariance, tr Cov(ĝ) = tr S / batch_size and ‖E ĝ‖² = ‖h̄‖² − tr S / N (unbiased).
    The scaler's ρ estimates the same ratio for the steps' batches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        loss = model.loss(x[n : n + 1], y[n : n + 1]) / y.shape[1]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    h = torch.stack(rows).double()
    trace = float(h.var(dim=0).sum())
    signal = float(h.mean(dim=0).square().sum()) - trace / h.shape[0]
    return trace / batch_size / signal if signal > 0 else math.inf


def scaler_trace(
    corpus, build_model, *, steps: int, batch_size: int, block_size: int, micro_batches: int,
    lr: float, beta: float, trace_every: int, reference_sequences: int, seed: int, progress: bool,
) -> list[dict[str, float]]:  # fmt: skip
    """Train ``build_model()`` by AdamW with ``micro_batches`` accumulated backwards per step,
    watched by a ``same_point`` and a ``temporal`` scaler (measuring only: the factor is not
    applied); every ``trace_every`` steps :func:`reference_rho` at the current θ is added, from
    ``reference_sequences`` windows drawn with a generator of its own (the training batches do
    not change)."""
    from tqdm.auto import tqdm

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    named = list(model.named_parameters())
    watch = {
        name: VarianceGradientScaler(
            named,
            statistic=name,
            rule="shrink",
            beta=beta,
            confidence=None,
            batch_size=batch_size,
        )  # the original's rule: the factor it would apply is part of the trace
        for name in ("same_point", "temporal")
    }
    g = torch.Generator().manual_seed(seed)
    reference_gen = torch.Generator().manual_seed(seed + 1)
    trace = []
    for step in tqdm(range(1, steps + 1), desc="scaler trace", disable=not progress):
        x, y = corpus.batch("train", batch_size, block_size, generator=g)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
            loss = model.loss(xs, ys) / y.numel()  # the step's gradient: token mean of the batch
            loss.backward()
            total += float(loss.detach())  # sync-ok: demo logging
        for scaler in watch.values():
            scaler.step()
        record = {"step": step, "train_ce": total}
        for name, scaler in watch.items():
            stats = scaler.statistics()["global"]
            record[f"rho_{name}"] = stats.normalized_variance
            record[f"factor_{name}"] = stats.factor
        if step % trace_every == 0 or step == steps:
            rx, ry = corpus.batch("train", reference_sequences, block_size, generator=reference_gen)
            record["rho_reference"] = reference_rho(model, rx, ry, batch_size)
        opt.step()
        trace.append(record)
    return trace


def plot_scaler_trace(trace: list[dict[str, float]], path: Path) -> Path:
    """ρ of the three estimates (log scale) and the training loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rho, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for key, style, label in (
        ("rho_same_point", "-", "same-point (micro-batches, EMA)"),
        ("rho_temporal", "--", "temporal (EMA over steps)"),
        ("rho_reference", "o", "at θ_t from per-sequence gradients"),
    ):
        pts = [(r["step"], r[key]) for r in trace if key in r and 0 < r[key] < math.inf]
        if pts:
            ax_rho.semilogy(*zip(*pts, strict=True), style, label=label, markersize=4)
    ax_rho.set(xlabel="step", ylabel="ρ = tr Cov(ĝ) / ‖E ĝ‖²", title="Gradient noise")
    ax_rho.legend(fontsize=8)
    ax_loss.plot([r["step"] for r in trace], [r["train_ce"] for r in trace])
    ax_loss.set(xlabel="step", ylabel="train cross-entropy", title="Backprop baseline")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
