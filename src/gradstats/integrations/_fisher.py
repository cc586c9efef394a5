"""The framework-free part of the Fisher callbacks: collect at the end of training, save, summarise.

:func:`collect_after_training` runs a :class:`~gradstats.FisherCollector` over a data loader in
``eval()`` mode (the model's training flag is restored afterwards), removes the collector's hooks,
writes ``fisher.safetensors`` on the main process and returns the collector with a summary.

Under ``torch.distributed`` (DDP, ``torchrun``) every rank must call it. With
``loader_is_sharded=False`` every rank iterates the same loader and rank r collects the batches
b with b mod W = r; with ``loader_is_sharded=True`` (a ``DistributedSampler`` or an
accelerate-prepared loader) each rank collects its whole loader. Either way the statistics are
all-reduced, so every rank holds the single-process result on all the collected batches.

Summary metrics (floats, logged by the callbacks under these keys):

* ``fisher/samples``, ``fisher/tokens``, ``fisher/skipped_batches`` — the counts (skipped:
  batches dropped as non-finite; gradstats 0.1.0 named it ``fisher/rejected_batches``);
* ``fisher/trace`` — Σ_j F_jj over all collected parameters (per unit);
* ``fisher/trace/<family>`` — Σ over the family's groups of the ``trace`` group Fisher for the
  ``top`` largest families (only families with per-unit values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import FisherCollector
from gradstats.integrations._options import check_forwarded

__all__ = ["collect_after_training", "summary_metrics"]


def collect_after_training(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    path: str | Path | None,
    is_main: bool,
    kind: str = "empirical",
    likelihood: object = "classification",
    unit: str = "sample",
    max_batches: int | None = None,
    loader_is_sharded: bool = False,
    progress: bool = False,
    collector_kwargs: dict[str, Any] | None = None,
) -> tuple[FisherCollector, dict[str, float]]:
    """Collect, all-reduce, save (main process only); returns (collector, summary metrics)."""
    if not isinstance(model, nn.Module):
        raise ConfigurationTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    was_training = model.training
    fc = FisherCollector(model, kind, likelihood, unit, **(collector_kwargs or {}))
    device = fc.result.device  # the parameters' device (checked by the collector)
    try:
        model.eval()
        with torch.inference_mode(False):
            fc.collect_loader(
                loader,
                max_batches=max_batches,
                progress=progress and is_main,
                device=device,
                distributed=not loader_is_sharded,
            )
            if loader_is_sharded:
                fc.all_reduce()
    finally:
        fc.close()
        model.train(was_training)
    if is_main and path is not None:
        fc.save(path)
    return fc, summary_metrics(fc)


def summary_metrics(fc: FisherCollector, top: int = 8) -> dict[str, float]:
    """The summary metrics of the module docstring (host reads)."""
    counts = fc.counts
    metrics = {
        "fisher/samples": float(counts["samples"]),
        "fisher/tokens": float(counts["tokens"]),
        "fisher/skipped_batches": float(counts["skipped"]),
    }
    if counts["units"] == 0:
        return metrics
    fisher = fc.fisher(dtype=torch.float64)
    metrics["fisher/trace"] = float(sum(v.sum() for v in fisher.values()))  # sync-ok: a report
    if fc.group_map is not None:
        per_unit = {f.name for f in fc.families if f.per_unit}
        traces = {
            name: float(value.sum())  # sync-ok: a report
            for name, value in fc.group_fisher("trace").items()
            if name in per_unit
        }
        for name in sorted(traces, key=lambda n: -traces[n])[:top]:
            metrics[f"fisher/trace/{name}"] = traces[name]
    return metrics


def resolve_module(
    owner: nn.Module, model: str | Callable[[nn.Module], nn.Module] | None
) -> nn.Module:
    """The module to collect on: ``owner`` itself, its attribute ``model`` or ``model(owner)``."""
    if model is None:
        return owner
    if isinstance(model, str):
        found = getattr(owner, model, None)
        if not isinstance(found, nn.Module):
            raise ConfigurationError(
                f"model={model!r}: {type(owner).__name__} has no such submodule"
            )
        return found
    if callable(model):
        return model(owner)
    raise ConfigurationTypeError(
        f"model must be None, an attribute name or a callable; got {model!r}"
    )


def check_options(
    kind: str,
    likelihood: object,
    unit: str,
    max_batches: int | None,
    collector_kwargs: dict[str, Any] | None = None,
) -> None:
    """Validate a callback's collector options when it is built (not after training)."""
    from gradstats.fisher import FisherSpec

    FisherSpec(kind, likelihood, unit)  # validates the three (and their combination)
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigurationError(f"max_batches must be an int >= 1 or None; got {max_batches!r}")
    reserved = ("model", "kind", "likelihood", "unit")
    check_forwarded(FisherCollector, collector_kwargs or {}, reserved)


__all__ += ["check_options", "resolve_module"]
