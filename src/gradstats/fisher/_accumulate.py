r"""Per-batch accumulators that the per-sample handlers write into, and the generic reduction of
materialised per-unit gradients.

For one batch the collector runs one or more backward *passes* (one for ``"empirical"``, K for
``"mc"``, one per output direction for ``"exact"``). Each pass's objective is pre-scaled by √w_k
(w_k = 1/K for ``"mc"``), so that every handler simply squares what it sees:

* ``sq[p]``   += Σ_units g_{i,p}²        (the Fisher numerator)
* with ``element_se`` (single-pass kinds), for x_ip = g_ip² and a per-element reference
  c_p = m_p² chosen from the batch itself (``ref[p]`` = m_p, the batch mean gradient, or a
  rank-1 product of means for the Linear closed form): ``dev[p]`` += Σ_units (x_ip − c_p)
  and ``dev2[p]`` += Σ_units (x_ip − c_p)². Centring before squaring keeps float32 sums
  right when the per-unit gradients sit on a large offset (the uncentred Σx² − (Σx)²/n
  loses every digit once Var(x)/x² < 1e-7); the state turns them into the batch mean
  c + dev/n and M2 = dev2 − dev²/n (float64) and merges them with Chan's formula.
* ``lin[p]``  += Σ_units g_{i,p}         (only while validating the first batch)
* ``trace[f]``[i, k] += Σ_{j ∈ group k} g_ij²          (per-unit group traces, family f)
* ``mask_lin[f]``[i, k] += Σ_{j ∈ mask set of k} θ_j g_ij  (reset every pass; its square is
  added to ``mask[f]`` at the end of the pass)

Units are rows: samples for ``unit="sample"``, flattened positions (B·T) for ``unit="token"``.
The batch buffers use the compute dtype (float32, float64 for float64 models); the collector's
running statistics are float64 and absorb each batch once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gradstats.errors import ConfigurationError

__all__ = ["Request", "UnitLayout", "accumulate_materialised", "compute_dtype"]


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 data; float32 for everything else (bf16/fp16 are upcast before any
    square is taken, so nothing below 6e-8 underflows)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Request:
    """A group family that needs per-unit values from one parameter.

    ``assign`` maps each index along ``axis`` of the parameter to a group id in [0, G) or to the
    dump column G (elements outside every group); ``in_mask`` says whether the member enters
    the family's mask quantity Σ θ_j g_j. ``block`` > 0 says that index j belongs to group
    j // block and every index belongs to a group (a reshape-sum instead of an index_add).
    """

    family: int
    axis: int
    assign: torch.Tensor
    in_mask: bool
    block: int = 0


@dataclass
class UnitLayout:
    """How a batch is cut into units, and the buffers of the current batch."""

    unit: str
    n_samples: int
    token_mask: torch.Tensor | None  # [B, T] for token likelihoods
    chunk_bytes: int
    dtype: torch.dtype = torch.float64
    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    se: bool = False  # element_se: fill ref / dev / dev2 (see the module docstring)
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    dev: dict[str, torch.Tensor] = field(default_factory=dict)
    dev2: dict[str, torch.Tensor] = field(default_factory=dict)
    lin: dict[str, torch.Tensor] | None = None
    # per family f (size G_f): [n, G_f] (or [n, G_f + 1] with the dump column), built lazily —
    # the first full-width write is stored as it is; None until something is written
    family_sizes: list[int] = field(default_factory=list)
    trace: list[torch.Tensor | None] = field(default_factory=list)
    mask_lin: list[torch.Tensor | None] = field(default_factory=list)
    mask: list[torch.Tensor | None] = field(default_factory=list)
    # finiteness proxies: name -> scalars whose sum is finite iff every element of sq[name] is
    proxy: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # deferred products (CPU, cumulative, no element_se): sq[name][index] += m1 @ m2, added by
    # the state straight into its pending buffers once the batch is accepted (see _state_pending)
    gemms: list[tuple[str, tuple | None, torch.Tensor, torch.Tensor]] | None = None

    @property
    def active(self) -> torch.Tensor:
        """The [B, T] token mask (``unit="token"`` layouts only)."""
        if self.token_mask is None:
            raise ConfigurationError("unit='token' needs a likelihood with a token mask")
        return self.token_mask

    @property
    def n_units(self) -> int:
        if self.unit == "sample":
            return self.n_samples
        return self.active.numel()

    def rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """View ``x`` ([B, *mid, f]) as [N, S, f]: N units, S positions summed within a unit."""
        if self.unit == "sample":  # explicit sizes: a zero-width layer has no -1 to infer
            return x.reshape(self.n_samples, math.prod(x.shape[1:-1]), x.shape[-1])
        shape = tuple(self.active.shape)
        if x.dim() < 3 or tuple(x.shape[:2]) != shape:
            raise ConfigurationError(
                f"unit='token' needs {what} of shape [B, T, ...] with [B, T] = {list(shape)}; got "
                f"{tuple(x.shape)}"
            )
        return x.reshape(shape[0] * shape[1], math.prod(x.shape[2:-1]), x.shape[-1])

    def token_weights(self) -> torch.Tensor | None:
        """The flat [B·T] mask of active positions for ``unit="token"`` (None for samples)."""
        return None if self.unit == "sample" else self.active.reshape(-1)

    def row_weights(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor | None:
        """[hi − lo] weights (1: a unit, 0: an inactive position) of rows lo..hi, or None."""
        weights = self.token_weights()
        return None if weights is None else (weights[lo:hi] > 0).to(dtype)

    def n_active(self, device: torch.device) -> torch.Tensor:
        """The number of units in the batch, as a tensor (no host read)."""
        weights = self.token_weights()
        if weights is None:
            return torch.full((), float(self.n_samples), dtype=self.dtype, device=device)
        return (weights > 0).sum().to(device, self.dtype)

    def add_centred(self, name: str, g: torch.Tensor, weights: torch.Tensor | None) -> None:
        r"""Add per-unit gradients ``g`` ([n, *shape], rows weighted 0/1 by ``weights``) to
        ``dev``/``dev2`` about c = m², m (``ref``) the mean of the first rows seen:

        d_i = (g_i − m)(g_i + m) = g_i² − c,  dev += Σ_i w_i d_i,  dev2 += Σ_i w_i d_i²
        (the factored difference stays right in float32 when g sits on a large offset)."""
        g = g.to(self.dtype)
        view = (-1, *([1] * (g.dim() - 1)))
        if name not in self.ref:
            if weights is None:
                self.ref[name] = g.mean(0)
            else:
                total = (g * weights.view(view)).sum(0)
                self.ref[name] = total / weights.sum().clamp(min=1.0)
        m = self.ref[name]
        d = (g - m) * (g + m)
        if weights is not None:
            d = d * weights.view(view)
        self.add(self.dev, name, d.sum(0))
        self.add(self.dev2, name, d.square_().sum(0))

    def set_centred(
        self, name: str, ref: torch.Tensor, dev: torch.Tensor, dev2: torch.Tensor
    ) -> None:
        """Store a closed-form (ref, dev, dev2) of one parameter (the only contribution)."""
        if name in self.ref:
            raise RuntimeError(f"{name}: a closed-form centred sum must be the only contribution")
        self.ref[name], self.dev[name], self.dev2[name] = ref, dev, dev2

    def chunk(self, bytes_per_unit: int) -> int:
        """Units per chunk so that one chunk of per-unit gradients fits ``chunk_bytes``."""
        return max(1, min(self.n_units, self.chunk_bytes // max(1, bytes_per_unit)))

    def add(self, store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        if name in store:
            store[name].add_(value)
        else:  # values handed in are fresh temporaries: no copy needed
            store[name] = value.to(self.dtype)

    def add_family(
        self, request: Request, lo: int, hi: int, trace: torch.Tensor, lin: torch.Tensor | None
    ) -> None:
        """Add per-unit marginals (rows lo..hi, along the request's axis) to the family buffers."""
        self._family_add(self.trace, request, lo, hi, trace)
        if lin is not None:
            self._family_add(self.mask_lin, request, lo, hi, lin)

    def _family_add(
        self, buffers: list, request: Request, lo: int, hi: int, value: torch.Tensor
    ) -> None:
        fam = request.family
        size = self.family_sizes[fam]
        value = value.to(self.dtype)
        dense = None  # the value as [rows, G] group columns, when no dump column is needed
        if request.block == 1 and value.shape[1] == size:
            dense = value
        elif request.block > 1:
            dense = value.view(value.shape[0], size, request.block).sum(-1)
        current = buffers[fam]
        if dense is not None and lo == 0 and hi == self.n_units:
            if current is None:  # borrowed: every later write to this slot is out of place
                buffers[fam] = dense
            elif current.shape[1] == size:
                buffers[fam] = current + dense
            else:  # an owned buffer with the dump column
                current[:, :size] += dense
            return
        if current is None:
            current = torch.zeros(self.n_units, size + 1, dtype=self.dtype, device=value.device)
        elif current.shape[1] == size:  # (also makes a borrowed buffer an owned one)
            current = torch.cat([current, current.new_zeros(self.n_units, 1)], dim=1)
        buffers[fam] = current
        if dense is not None:
            current[lo:hi, :size] += dense
        elif request.block == 1:  # group k is index k
            current[lo:hi, : value.shape[1]] += value
        else:
            current[lo:hi].index_add_(1, request.assign, value)

    def family_rows(self, buffers: list, fam: int, device: torch.device) -> torch.Tensor:
        """Family ``fam``'s per-unit rows [n, G] (zeros when nothing was written)."""
        value = buffers[fam]
        size = self.family_sizes[fam]
        if value is None:
            return torch.zeros(self.n_units, size, dtype=self.dtype, device=device)
        return value if value.shape[1] == size else value[:, :size]

    def end_pass(self) -> None:
        """Square the pass's mask values into ``mask`` and reset them (one per pass)."""
        for fam, lin in enumerate(self.mask_lin):
            if lin is None:
                continue
            size = self.family_sizes[fam]
            square = (lin if lin.shape[1] == size else lin[:, :size]).square()
            total = self.mask[fam]
            self.mask[fam] = square if total is None else total + square
            self.mask_lin[fam] = None

    def add_proxy(self, name: str, value: torch.Tensor) -> None:
        """Record a scalar whose finiteness stands for that of ``name``'s Σg² contribution."""
        self.proxy.setdefault(name, []).append(value)

    def add_sq_product(
        self, name: str, index: tuple | None, m1: torch.Tensor, m2: torch.Tensor, shape
    ) -> None:
        """sq[name][index] += m1 @ m2: deferred into the pending state when ``gemms`` is on,
        else formed now (a fresh full-width product is stored without zeros + add)."""
        if self.gemms is not None:
            self.gemms.append((name, index, m1, m2))
            return
        value = m1 @ m2
        if name not in self.sq and index is None:
            self.sq[name] = value.to(self.dtype)
            return
        if name not in self.sq:
            self.sq[name] = torch.zeros(shape, dtype=self.dtype, device=value.device)
        target = self.sq[name] if index is None else self.sq[name][index]
        target += value


def accumulate_materialised(
    layout: UnitLayout,
    name: str,
    grads: torch.Tensor,
    lo: int,
    requests: Sequence[Request],
    theta: torch.Tensor | None,
) -> None:
    """Reduce per-unit gradients ``grads`` ([n, *shape], units lo..lo+n) of parameter ``name``.

    ``grads`` is a fresh tensor owned by the caller; it is squared in place when nothing else
    needs it."""
    hi = lo + grads.shape[0]
    if layout.se:
        layout.add_centred(name, grads, layout.row_weights(lo, hi, layout.dtype))
    keep = layout.lin is not None or any(r.in_mask for r in requests)
    squares = grads.square() if keep else grads.square_()
    layout.add(layout.sq, name, squares.sum(0))
    if layout.lin is not None:
        layout.add(layout.lin, name, grads.sum(0))
    for request in requests:
        dims = [d for d in range(1, grads.dim()) if d != request.axis + 1]
        trace = squares.sum(dims) if dims else squares
        lin = None
        if request.in_mask:
            if theta is None:
                raise ConfigurationError(f"{name}: a mask request needs the parameter's values")
            weighted = grads * theta.to(grads.dtype)
            lin = weighted.sum(dims) if dims else weighted
        layout.add_family(request, lo, hi, trace, lin)
