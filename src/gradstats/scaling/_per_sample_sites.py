r"""Σ_i ‖c_i‖² of a parameter from the recorded module calls (*sites*) that produced it.

A site is one call of a module owning the parameter: the Fisher collector's handler for that
module type (:func:`gradstats.fisher._engine.make_handler`), the tensors it saved in the forward
and the gradient of its output, ``prepared`` by the handler into per-unit rows. Linear-like
weights and embeddings go through the factor identities of
:mod:`gradstats.scaling._per_sample_norms`; a Linear bias is Σ_t b_t per unit; every other
parameter is materialised by the handler a chunk of units at a time and squared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import UnitLayout
from gradstats.fisher._handler import Handler
from gradstats.fisher._persample import EmbeddingHandler, LinearHandler
from gradstats.scaling._per_sample_norms import (
    Factor,
    Index,
    Outer,
    cross_sum,
    norm_sum,
    squared_sum,
)
from gradstats.scaling._per_sample_staging import Staging

__all__ = ["Part", "shared_norm", "site_norms"]


@dataclass(frozen=True)
class Part:
    """One site's share of one parameter: its handler, layout, prepared rows and attribute."""

    handler: Handler
    layout: UnitLayout
    prepared: object
    attr: str
    norm: torch.Tensor | None = None  # Σ_i ‖c_i‖² if already known (float64 0-dim)
    dense: torch.Tensor | None = None  # the [N, *param.shape] per-unit gradients, if kept


def _factor(handler: Handler, prepared: object, attr: str) -> Factor | None:
    if isinstance(handler, LinearHandler) and attr == "weight":
        a, b = cast(tuple[torch.Tensor, torch.Tensor], prepared)
        return Outer(a, b) if handler.transposed else Outer(b, a)
    if isinstance(handler, EmbeddingHandler):
        ids, b = cast(tuple[torch.Tensor, torch.Tensor], prepared)
        return Index(ids, b, handler.module.num_embeddings)
    return None


def site_norms(
    handler: Handler, layout: UnitLayout, prepared: object, attrs: list[str], staging: Staging
) -> None:
    """Stage Σ_i ‖c_i‖² of one site's parameters ``attrs``, used at this site only."""
    budget = layout.chunk_bytes
    names = handler.attrs
    if isinstance(handler, LinearHandler) and cast(tuple, prepared)[0].shape[1] == 1:
        # one position per unit: ‖c_i‖² = ‖a_i‖²‖b_i‖² (weight), ‖b_i‖² (bias)
        a, b = cast(tuple[torch.Tensor, torch.Tensor], prepared)
        weight = names["weight"] if "weight" in attrs else None
        staging.rows(weight, names["bias"] if "bias" in attrs else None, a[:, 0], b[:, 0])
        return
    rest = []
    for attr in attrs:
        factor = _factor(handler, prepared, attr)
        if factor is not None:
            staging.add(names[attr], norm_sum(factor, budget))
        elif isinstance(handler, LinearHandler) and attr == "bias":
            staging.add_norm(names[attr], prepared[1].sum(1))  # type: ignore[index]
        else:
            rest.append(attr)
    if rest:
        n = layout.n_units
        step = layout.chunk(handler.bytes_per_unit(rest))
        for lo in range(0, n, step):
            grads = handler.materialise(prepared, rest, lo, min(n, lo + step))
            for attr, g in grads.items():
                staging.add_norm(names[attr], g)


def shared_norm(label: str, parts: list[Part]) -> torch.Tensor:
    """Σ_i ‖Σ_s c_i^(s)‖² of a parameter used at several sites of one forward.

    Factor forms: Σ_s ‖c^(s)‖² + 2 Σ_{s<s'} ⟨c^(s), c^(s')⟩ by the cross identities; otherwise
    the sites' per-unit gradients are materialised, summed and squared chunk by chunk.
    """
    units = {part.layout.n_units for part in parts}
    if len(units) != 1:
        raise ConfigurationError(
            f"parameter {label!r} was used at several sites of one forward with different "
            f"numbers of units {sorted(units)}: per-example gradients cannot be summed"
        )
    budget = parts[0].layout.chunk_bytes
    device = parts[0].handler.module.get_parameter(parts[0].attr).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    factors = [_factor(p.handler, p.prepared, p.attr) for p in parts]
    if all(f is not None for f in factors):
        forms = [f for f in factors if f is not None]
        for part, f in zip(parts, forms, strict=True):
            total = total + (norm_sum(f, budget) if part.norm is None else part.norm)
        for s, f in enumerate(forms):
            for t in range(s + 1, len(forms)):
                cross = _dense_cross(parts[s], f, parts[t], forms[t])
                if cross is None:
                    cross = cross_sum(f, forms[t], budget)
                total = total + 2.0 * cross
        return total
    (n,) = units
    step = min(p.layout.chunk(p.handler.bytes_per_unit([p.attr])) for p in parts)
    # dense sites first: an embedding then adds its few rows into their sum
    ordered = sorted(parts, key=lambda p: isinstance(p.handler, EmbeddingHandler))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        summed: torch.Tensor | None = None
        for p in ordered:
            handler = p.handler
            if summed is not None and isinstance(handler, EmbeddingHandler):
                summed = handler.materialise(p.prepared, [p.attr], lo, hi, summed)[p.attr]
                continue
            g = handler.materialise(p.prepared, [p.attr], lo, hi)[p.attr]
            summed = g if summed is None else summed + g.to(summed.dtype)
        if summed is not None:
            total = total + squared_sum(summed)
    return total


def _dense_cross(p1: Part, f1: Factor, p2: Part, f2: Factor) -> torch.Tensor | None:
    """Σ_i ⟨c_i, c'_i⟩ from kept per-unit gradients: a dot product of two dense sites, or for a
    dense nn.Linear site [N, V, d] and an embedding, Σ_{i,t} ⟨c_i[x_it], b_it⟩ (one gather of
    N·S rows); None where neither applies."""
    if p1.dense is not None and p2.dense is not None:
        return squared_sum_pair(p1.dense, p2.dense)
    if isinstance(f1, Index):
        p1, f1, p2, f2 = p2, f2, p1, f1
    if p1.dense is None or not isinstance(f2, Index) or p1.dense.dim() != 3:
        return None
    if getattr(p1.handler, "transposed", True):
        return None  # a Conv1D weight is [in, out]: its rows are not the embedding's rows
    dense, ids = p1.dense, f2.ids
    if dense.stride(-1) != 1:  # [N, V, d] viewing [N, d, V] (see materialised_grads)
        columns = dense.transpose(1, 2)  # gather c_i[:, x_it] along its contiguous rows
        index = ids.unsqueeze(1).expand(ids.shape[0], columns.shape[1], ids.shape[1])
        picked = columns.gather(2, index)  # [N, d, S]
        return (picked * f2.right.transpose(1, 2).to(picked.dtype)).sum().to(torch.float64)
    units = torch.arange(dense.shape[0], device=dense.device).unsqueeze(1)
    rows = dense[units, ids]  # [N, S, d]: c_i[x_it]
    return (rows * f2.right.to(rows.dtype)).sum().to(torch.float64)


def squared_sum_pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over every element of x ⊙ y (float64 0-dim)."""
    return (x * y.to(x.dtype)).sum().to(torch.float64)
