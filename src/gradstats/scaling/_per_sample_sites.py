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

__all__ = ["Part", "shared_norm", "site_norms"]


@dataclass(frozen=True)
class Part:
    """One site's share of one parameter: its handler, layout, prepared rows and attribute."""

    handler: Handler
    layout: UnitLayout
    prepared: object
    attr: str


def _factor(handler: Handler, prepared: object, attr: str) -> Factor | None:
    if isinstance(handler, LinearHandler) and attr == "weight":
        a, b = cast(tuple[torch.Tensor, torch.Tensor], prepared)
        return Outer(a, b) if handler.transposed else Outer(b, a)
    if isinstance(handler, EmbeddingHandler):
        ids, b = cast(tuple[torch.Tensor, torch.Tensor], prepared)
        return Index(ids, b, handler.module.num_embeddings)
    return None


def site_norms(
    handler: Handler, layout: UnitLayout, prepared: object, attrs: list[str]
) -> dict[str, torch.Tensor]:
    """{attr: Σ_i ‖c_i‖²} (float64 0-dim) of one site's parameters, used at this site only."""
    budget = layout.chunk_bytes
    out: dict[str, torch.Tensor] = {}
    rest = []
    for attr in attrs:
        factor = _factor(handler, prepared, attr)
        if factor is not None:
            out[attr] = norm_sum(factor, budget)
        elif isinstance(handler, LinearHandler) and attr == "bias":
            out[attr] = squared_sum(prepared[1].sum(1))  # type: ignore[index]
        else:
            rest.append(attr)
    if rest:
        n = layout.n_units
        step = layout.chunk(handler.bytes_per_unit(rest))
        for lo in range(0, n, step):
            grads = handler.materialise(prepared, rest, lo, min(n, lo + step))
            for attr, g in grads.items():
                value = squared_sum(g)
                out[attr] = value if attr not in out else out[attr] + value
    return out


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
        for f in forms:
            total = total + norm_sum(f, budget)
        for s, f in enumerate(forms):
            for other in forms[s + 1 :]:
                total = total + 2.0 * cross_sum(f, other, budget)
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
