r"""Cost floors of the Fisher suite: hand-minimal implementations, and an op counter.

* :func:`ef_floor` — the least work that yields the per-sample empirical Fisher diagonal of an
  MLP of ``nn.Linear`` layers: the forward, one ``torch.autograd.grad`` for the activation
  gradients b of the layer outputs only (no weight-gradient GEMMs), and per layer
  Σ_i g_i² = (b²)ᵀ(a²) added by one ``addmm_`` into a float32 buffer (bias: Σ_i b_i²).
* :func:`ef_groups_floor` — that, plus the mean gradient (autograd's weight gradients, added
  into float32 buffers with one ``_foreach_add_``) and the per-unit output-channel group values
  of each layer (weight and bias of channel k together): the trace t_ik = b_ik² (‖a_i‖² + 1)
  and the mask value m_ik = (b_ik y_ik)² (y = W a + bias: Σ_j θ_j g_ij over the channel), whose
  sums Σ_i and Σ_i of squares over the batch go into one concatenated float32 buffer.

* :func:`ef_checked_floor` — :func:`ef_floor` plus what a collector must check and count, written
  as tightly as it goes: the targets' dtype, shape and range (one ``aminmax``), the batch's
  finiteness (per layer Σ_i ‖a_i‖²‖b_i‖² and Σ_i ‖b_i‖², the loss, one float64 sum of their
  magnitudes, read on the host), products added only once the batch is accepted, sample/batch
  counts (one op) and a float64 fold every ``FOLD_EVERY`` batches, or earlier where the read
  totals could carry the float32 pending sums out of range. What the collector costs beyond it
  is the price of its structure.

The first two do not check finiteness, keep float64 statistics or standard errors: they are
floors, not collectors. :func:`count_ops` counts the ATen ops one call issues (a
``TorchDispatchMode``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats.bench._harness import Candidate, Comparison
from gradstats.fisher import FisherCollector
from gradstats.fisher._state_pending import FOLD_EVERY

__all__ = ["count_ops", "ef_checked_floor", "ef_floor", "ef_groups_floor", "floor_same_numbers"]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object], calls: int = FOLD_EVERY) -> float:
    """ATen ops (views included) per call of ``fn``: the mean over ``calls`` calls after one
    untimed call (a collector folds its pending sums every ``FOLD_EVERY`` = 32 batches)."""
    fn()
    with _OpCounter() as counter:
        for _ in range(calls):
            fn()
    return round(counter.count / calls, 1)


def _record(model: nn.Module) -> tuple[list[nn.Linear], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model's Linear layers and a list that forward hooks fill with (input, output)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    for module in linears:
        module.register_forward_hook(lambda _m, args, out: calls.append((args[0], out)))
    return linears, calls


def ef_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """Σ_i g_i² of every Linear weight and bias (``model`` is hooked: pass a copy)."""
    linears, calls = _record(model)
    sq_w = [torch.zeros_like(m.weight) for m in linears]
    sq_b = [torch.zeros_like(m.bias) for m in linears]

    def run() -> object:
        calls.clear()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, out in calls])
        with torch.no_grad():  # (a requires grad: an addmm_ outside would chain the buffers' graph)
            for (a, _), b, w, bias in zip(calls, grads, sq_w, sq_b, strict=True):
                b2 = b.square()
                w.addmm_(b2.T, a.square())
                bias.add_(b2.sum(0))
        calls.clear()
        return {"sq": [*sq_w, *sq_b]}

    return run


def ef_checked_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """:func:`ef_floor` with the checks, counts and float64 folds of a collector (see the module
    docstring; ``model`` is hooked: pass a copy)."""
    linears, calls = _record(model)
    pending_w = [torch.zeros_like(m.weight) for m in linears]
    pending_b = [torch.zeros_like(m.bias) for m in linears]
    totals = [torch.zeros_like(t, dtype=torch.float64) for t in pending_w + pending_b]
    counts = torch.zeros(2, dtype=torch.float64)
    batch = torch.tensor([float(x.shape[0]), 1.0], dtype=torch.float64)
    folds, reserved = [0], [0.0]
    limit = torch.finfo(pending_w[0].dtype).max / 2  # (rounding included)

    def fold() -> None:
        for target, source in zip(totals, pending_w + pending_b, strict=True):
            target.add_(source.to(torch.float64))
        torch._foreach_zero_(pending_w + pending_b)
        folds[0], reserved[0] = 0, 0.0

    def run() -> object:
        calls.clear()
        logits = model(x)
        if y.dtype != torch.long or y.shape != (logits.shape[0],):
            raise ValueError("targets must be int64 class indices, one per sample")
        low, high = (int(v) for v in torch.aminmax(y))
        if low < 0 or high >= logits.shape[1]:
            raise ValueError("targets out of range")
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, out in calls])
        checks, parts = [loss], []
        with torch.no_grad():
            for (a, _), b in zip(calls, grads, strict=True):
                a2, b2 = a.square(), b.square()
                b2_rows = b2.sum(1)
                checks += [a2.sum(1) @ b2_rows, b2_rows.sum()]
                parts.append((b2, a2, b2.sum(0)))
            bound = torch.stack(checks).abs().sum(dtype=torch.float64).item()
            if math.isfinite(bound):
                if folds[0] and reserved[0] + bound > limit:  # fold before an overflow
                    fold()
                reserved[0] += bound
                for (b2, a2, _), w in zip(parts, pending_w, strict=True):
                    w.addmm_(b2.T, a2)
                torch._foreach_add_(pending_b, [p[2] for p in parts])
                counts.add_(batch)
                folds[0] += 1
                if folds[0] == FOLD_EVERY:
                    fold()
        calls.clear()
        return {"sq": [*pending_w, *pending_b]}

    return run


def ef_groups_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """:func:`ef_floor` + the mean gradient + output-channel traces and mask values."""
    linears, calls = _record(model)
    params = [p for m in linears for p in (m.weight, m.bias)]
    sq = [torch.zeros_like(p) for p in params]
    g_sum = [torch.zeros_like(p) for p in params]
    width = sum(m.out_features for m in linears)
    group_sums = torch.zeros(2, 2 * width)  # [Σ_i, Σ_i of squares] × [traces | masks]

    def run() -> object:
        calls.clear()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, params + [out for _, out in calls])
        with torch.no_grad():  # (see ef_floor)
            torch._foreach_add_(g_sum, grads[: len(params)])
            traces, masks = [], []
            for index, ((a, out), b) in enumerate(zip(calls, grads[len(params) :], strict=True)):
                a2, b2 = a.square(), b.square()
                sq[2 * index].addmm_(b2.T, a2)
                sq[2 * index + 1].add_(b2.sum(0))
                traces.append(b2 * (a2.sum(1, keepdim=True) + 1.0))
                masks.append(b * out)
            rows = torch.cat(traces + masks, dim=1)
            rows[:, width:].square_()
            group_sums[0].add_(rows.sum(0))
            group_sums[1].add_(rows.square().sum(0))
        calls.clear()
        return {"sq": sq, "g_sum": g_sum, "trace_sum": group_sums[0, :width]}

    return run


def floor_same_numbers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: dict[str, object]
) -> Comparison:
    """The groups floor against the collector: Σg², Σg and the channel-trace sums."""
    names = [n for n, _ in model.named_parameters()]

    def collector() -> object:
        fc = FisherCollector(model, "empirical", "classification")
        fc.collect(x, y)
        n = x.shape[0]
        traces = fc.group_fisher("trace", "none")
        return {
            "sq": [fc.fisher("none")[k] for k in names],
            "g_sum": [fc.mean_gradient()[k] * n for k in names],
            "trace_sum": torch.cat([traces[f] for f in traces if f != "unmapped"]),
        }

    def floor() -> object:
        return ef_groups_floor(copy.deepcopy(model), x, y)()

    return Comparison(
        name="fisher/mlp_floor_same_numbers",
        candidates=[
            Candidate("gradstats (defaults)", collector, "fresh state + read"),
            Candidate("floor: EF + mean gradient + channel groups", floor, "one call"),
        ],
        baseline="gradstats (defaults)",
        rtol=1e-4,  # float32 sums in another order
        atol=1e-6,
        params=params,
    )
