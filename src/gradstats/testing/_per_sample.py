r"""Obviously-correct reference for ``statistic="per_sample"``: a per-example autograd loop.

With per-unit gradients g_i (i = 1..B) of the per-unit loss and ḡ = (1/B) Σ_i g_i, per tensor

    tr Σ  = (Σ_i ‖g_i‖² − B‖ḡ‖²) / (B − 1),     ‖G‖² = ‖ḡ‖² − tr Σ / B,

both unbiased, and the noise of the applied (mean) gradient is tr Cov(ḡ) = tr Σ / B.
``unit="sample"``: one ``torch.autograd.grad`` call per sample on that sample alone.
``unit="token"``: the position-wise gradients of
:func:`~gradstats.testing.positionwise_fisher` (every position of every sequence a unit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.testing._fisher import Inputs, _call, _leaves, _slice, positionwise_fisher

__all__ = ["reference_per_sample_noise"]

Objective = Callable[[torch.Tensor, slice], torch.Tensor]


def _estimates(sum_sq: float, mean_sq: float, units: int) -> dict[str, float]:
    trace = (sum_sq - units * mean_sq) / (units - 1)
    return {
        "trace_sigma": trace,
        "signal": mean_sq - trace / units,
        "noise": trace / units,
        "units": float(units),
    }


def reference_per_sample_noise(
    model: nn.Module,
    inputs: Inputs,
    objective: Objective,
    *,
    unit: str = "sample",
) -> dict[str, dict[str, float]]:
    """{name: {"trace_sigma", "signal", "noise", "units"}, "global": the same over all tensors}.

    ``objective(output, rows)`` is the loss summed over the units of the batch rows ``rows``
    (a slice) given the model's output for those rows (logits for Hugging Face models), e.g.
    ``lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")``. Every parameter that
    requires grad is included (an unused one has zero gradients).
    """
    if unit not in ("sample", "token"):
        raise ConfigurationError(f"unit must be 'sample' or 'token'; got {unit!r}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = next(iter(_leaves(inputs))).shape[0]
    if unit == "sample":
        sum_sq = {n: 0.0 for n in params}
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for i in range(batch):
            value = objective(_call(model, _slice(inputs, i)), slice(i, i + 1))
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            for (name, p), g in zip(params.items(), grads, strict=True):
                g = torch.zeros_like(p) if g is None else g
                sum_sq[name] += float(g.double().square().sum())
                total[name] += g.double()
        units = batch
    else:
        logits = _call(model, inputs)
        mask = torch.ones(logits.shape[:2])
        squares, total = cast(
            tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
            positionwise_fisher(
                model, inputs, lambda out: objective(out, slice(None)), mask, with_sum=True
            ),
        )
        sum_sq = {n: float(squares[n].sum()) for n in params}
        units = int(mask.numel())
    out = {}
    for name in params:
        mean_sq = float((total[name] / units).square().sum())
        out[name] = _estimates(sum_sq[name], mean_sq, units)
    out["global"] = {
        key: sum(out[n][key] for n in params) if key != "units" else float(units)
        for key in ("trace_sigma", "signal", "noise", "units")
    }
    return out
