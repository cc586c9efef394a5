r"""Per-batch accumulators that the per-sample handlers write into, and the generic reduction of
materialised per-unit gradients.

For one batch the collector runs one or more backward *passes* (one for ``"empirical"``, K for
``"mc"``, one per output direction for ``"exact"``). Each pass's objective is pre-scaled by √w_k
(w_k = 1/K for ``"mc"``), so that every handler simply squares what it sees:

* ``sq[p]``   += Σ_units g_{i,p}²        (the Fisher numerator)
* ``sq4[p]``  += Σ_units g_{i,p}⁴        (only with ``element_se``; single-pass kinds)
* ``lin[p]``  += Σ_units g_{i,p}         (only while validating the first batch)
* ``trace[f]``[i, k] += Σ_{j ∈ group k} g_ij²          (per-unit group traces, family f)
* ``mask_lin[f]``[i, k] += Σ_{j ∈ mask set of k} θ_j g_ij  (reset every pass; its square is
  added to ``mask[f]`` at the end of the pass)

Units are rows: samples for ``unit="sample"``, flattened positions (B·T) for ``unit="token"``.
The batch buffers use the compute dtype (float32, float64 for float64 models); the collector's
running statistics are float64 and absorb each batch once.
"""

from __future__ import annotations

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
    sq4: dict[str, torch.Tensor] | None = None
    lin: dict[str, torch.Tensor] | None = None
    trace: list[torch.Tensor] = field(default_factory=list)
    mask_lin: list[torch.Tensor] = field(default_factory=list)
    mask: list[torch.Tensor] = field(default_factory=list)

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
        if self.unit == "sample":
            return x.reshape(self.n_samples, -1, x.shape[-1])
        shape = tuple(self.active.shape)
        if x.dim() < 3 or tuple(x.shape[:2]) != shape:
            raise ConfigurationError(
                f"unit='token' needs {what} of shape [B, T, ...] with [B, T] = {list(shape)}; got "
                f"{tuple(x.shape)}"
            )
        return x.reshape(shape[0] * shape[1], -1, x.shape[-1])

    def token_weights(self) -> torch.Tensor | None:
        """The flat [B·T] mask of active positions for ``unit="token"`` (None for samples)."""
        return None if self.unit == "sample" else self.active.reshape(-1)

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
        targets = [(self.trace[request.family], trace)]
        if lin is not None:
            targets.append((self.mask_lin[request.family], lin))
        for buffer, value in targets:
            value = value.to(self.dtype)
            if request.block == 1:  # group k is index k
                buffer[lo:hi, : value.shape[1]] += value
            elif request.block:
                size = buffer.shape[1] - 1
                buffer[lo:hi, :size] += value.view(value.shape[0], size, request.block).sum(-1)
            else:
                buffer[lo:hi].index_add_(1, request.assign, value)


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
    keep = layout.lin is not None or any(r.in_mask for r in requests)
    squares = grads.square() if keep else grads.square_()
    layout.add(layout.sq, name, squares.sum(0))
    if layout.sq4 is not None:
        layout.add(layout.sq4, name, squares.square().sum(0))
    if layout.lin is not None:
        layout.add(layout.lin, name, grads.sum(0))
    hi = lo + squares.shape[0]
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
