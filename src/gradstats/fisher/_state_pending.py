r"""Deferred folding of the batch statistics into the float64 state (the collector's hot path).

Converting and adding every parameter-sized batch sum into float64 costs more than the GEMMs of a
small batch (a float32 → float64 add of 670k elements: 0.8–1.2 ms; a float32 add: 0.1 ms, one
thread). So accepted batches are first added, in the compute dtype and with one ``_foreach_add_``
for all tensors, into persistent *pending* buffers, which are folded into the float64 sums every
``FOLD_EVERY`` batches and before any read, merge, reduce or save (on the CPU tensor by tensor
through a float64 copy, 1.5× faster than ``_foreach_add_``'s type promotion). Between folds at
most ``FOLD_EVERY`` float32 batch sums are added: for the non-negative Σg² a relative rounding
≤ FOLD_EVERY · 2⁻²⁴ ≈ 1.9e-6 (the bound of one float32 GEMM over 32 units, which forms each
batch sum; measured over 200 batches of 32: 4.4 · 2⁻²⁴), for the signed Σg an absolute one,
FOLD_EVERY · 2⁻²⁴ · Σ|g|; the float64 state then carries the totals exactly. (Each batch is
checked finite, but 32 finite float32 batch sums can overflow the pending buffer when one
element's Σg² nears 1e37; on the CPU, where the batch's finiteness total is read anyway, it is
also an upper bound of every pending entry, and :meth:`PendingSums.crowded` folds early before
the reserved bounds could pass the dtype's largest value / 2. On an accelerator, which reads
nothing to the host, that overflow stays possible at such scales.)
Only ``mode="cumulative"`` without ``element_se`` defers (its Chan merges need each batch on its
own).

The per-unit group rows are deferred likewise on the CPU: accepted batches' rows are kept and
given to the one :class:`~gradstats.moments.RunningMoments` of all families (traces and mask
values side by side) in a single ``update`` (the same West/Chan result, in one merge instead of
one per batch); a skipped batch is counted there at once. Elsewhere every batch is folded at
once, with ``accept`` on the device (no host read).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradstats.moments import RunningMoments

__all__ = [
    "FOLD_EVERY",
    "PendingGroups",
    "PendingSums",
    "accepted_flag",
    "batch_flag",
    "masked_add_",
    "unit_count",
]

FOLD_EVERY = 32
_FLOAT32_LIMIT = torch.finfo(torch.float32).max / 2


def accepted_flag(ok: torch.Tensor) -> bool | None:
    """On the CPU the batch flag is read (free: there is no device to wait for), which skips
    the masking work of an accepted batch; elsewhere None: mask on the device, never sync."""
    return bool(ok) if ok.device.type == "cpu" else None  # sync-ok: CPU only


def batch_flag(ok: torch.Tensor | bool, device: torch.device) -> tuple[bool | None, torch.Tensor]:
    """(accepted, ok as a tensor) of a batch's finite flag: ``accepted`` is the flag where it is
    known on the host (a bool given, or a CPU tensor: :func:`accepted_flag`), None on a device
    (then mask with the tensor). On the CPU a bool ``True`` gets a shared constant (no op)."""
    if isinstance(ok, bool):
        if ok and device.type == "cpu":
            return True, _ACCEPTED
        return ok, torch.tensor(ok, device=device)
    return accepted_flag(ok), ok


_ACCEPTED = torch.tensor(True, device="cpu")  # (whatever the default device at import)


def unit_count(n_units: torch.Tensor | None, n_samples: int, device: torch.device) -> torch.Tensor:
    """The batch's unit count, float64 (``None``: sample units, ``n_samples``)."""
    return (
        torch.full((), n_samples, dtype=torch.float64, device=device)
        if n_units is None
        else n_units
    )


def masked_add_(target: torch.Tensor, value: torch.Tensor, ok: torch.Tensor, accepted) -> None:
    if accepted is None:
        target.add_(torch.where(ok, value, 0.0))
    elif accepted:
        # on the CPU a float32 → float64 add_ through type promotion is 1.4× slower than
        # converting first (measured, 400k elements); only the CPU path reads ``accepted``
        target.add_(value if value.dtype == target.dtype else value.to(target.dtype))


def add_counts(
    counts: dict[str, torch.Tensor],
    ok: torch.Tensor,
    accepted: bool | None,
    n_samples: int,
    n_tokens: torch.Tensor | int,
    draw_weight_units: torch.Tensor | float,
) -> None:
    """counts += the batch's (samples, tokens, batches, draw_weight_sq = w² · units) when it
    is accepted, else skipped += 1; ``accepted`` known (CPU): one op where ``n_tokens`` and
    the draw weight are host numbers, else masked on the device by ``ok`` without a host read."""
    if accepted is None:
        okf = ok.to(torch.float64)
        counts["samples"] += okf * n_samples
        if isinstance(n_tokens, int):
            counts["tokens"] += okf * n_tokens
        else:
            counts["tokens"] += okf * n_tokens.to(torch.float64)
        counts["batches"] += okf
        counts["skipped"] += 1.0 - okf
        counts["draw_weight_sq"] += okf * draw_weight_units
    elif not accepted:
        counts["skipped"] += 1.0
    else:
        keys = ["samples", "batches"]
        values: list[float] = [float(n_samples), 1.0]
        if isinstance(draw_weight_units, torch.Tensor):
            counts["draw_weight_sq"] += draw_weight_units
        else:
            keys.append("draw_weight_sq")
            values.append(draw_weight_units)
        if isinstance(n_tokens, int):
            keys.append("tokens")
            values.append(float(n_tokens))
        else:
            counts["tokens"] += n_tokens
        torch._foreach_add_([counts[k] for k in keys], values)


class PendingSums:
    """Compute-dtype sums of accepted batches, not yet in the float64 ``targets``."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.batches = 0
        self.reserved = 0.0  # Σ of the host bounds of the pending batches' entries (CPU)

    def crowded(self, bound: float) -> bool:
        """Whether a batch whose entries are at most ``bound`` (a host number) could overflow
        the pending sums in their smallest dtype (largest value / 2: rounding included): then
        fold first. (The buffers are float32 or float64: below float32's range, never.)"""
        total = self.reserved + bound
        if not self.batches or total <= _FLOAT32_LIMIT:
            return False
        return total > min(torch.finfo(b.dtype).max for b in self.buffers.values()) / 2

    def reserve(self, bound: float) -> None:
        """Count a batch's bound in (after :meth:`crowded` and any fold it asked for)."""
        self.reserved += bound

    def add(
        self,
        values: dict[str, torch.Tensor],
        ok: torch.Tensor,
        accepted: bool | None,
        products: Sequence[tuple[object, tuple | None, torch.Tensor, torch.Tensor]] = (),
        shape_of: Callable[[object], tuple[int, ...]] | None = None,
    ):
        """Add one batch's ``values`` (key -> tensor); ``accepted`` None: mask with ``ok``.

        ``products`` (key, index, m1, m2): buffer[key][index] += m1 @ m2 (``index`` None: the
        whole buffer), by ``addmm_`` straight into the pending buffer — no product tensor and
        no second pass over it; ``shape_of(key)`` gives a new buffer's shape."""
        if accepted is False or (not values and not products):
            return
        for key, value in values.items():
            if key not in self.buffers:
                self.buffers[key] = torch.zeros_like(value)
        if values:
            items = list(values.values())
            if accepted is None:
                items = [torch.where(ok, v, 0.0) for v in items]
            torch._foreach_add_([self.buffers[k] for k in values], items)
        buffers: dict[Any, torch.Tensor] = self.buffers
        for key2, index, m1, m2 in products:
            if key2 not in buffers:
                if shape_of is None:
                    raise RuntimeError("a new pending product buffer needs shape_of")
                buffers[key2] = m1.new_zeros(shape_of(key2))
            target = buffers[key2] if index is None else buffers[key2][index]
            if accepted is None:
                target.add_(torch.where(ok, m1 @ m2, 0.0))
            else:
                target.addmm_(m1, m2)
        self.batches += 1

    def due(self) -> bool:
        return self.batches >= FOLD_EVERY

    def fold(self, targets: dict[str, torch.Tensor]) -> None:
        """Add the pending sums into ``targets`` (same keys, float64) and zero them."""
        if not self.batches:
            return
        keys = list(self.buffers)
        sources = [self.buffers[k] for k in keys]
        if sources[0].device.type == "cpu":
            for key, source in zip(keys, sources, strict=True):
                target = targets[key]
                target.add_(source if source.dtype == target.dtype else source.to(target.dtype))
        else:
            torch._foreach_add_([targets[k] for k in keys], sources)
        torch._foreach_zero_(sources)
        self.batches, self.reserved = 0, 0.0

    def clear(self) -> None:
        self.buffers, self.batches, self.reserved = {}, 0, 0.0


class PendingGroups:
    """Per-unit group rows of accepted batches, not yet in the combined moments."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.units: list[torch.Tensor | None] = []

    def add(
        self,
        stats: RunningMoments,
        rows: torch.Tensor,
        units: torch.Tensor | None,
        ok: torch.Tensor,
        accepted: bool | None,
    ) -> None:
        if accepted is None:  # on a device: fold now, accept on the device
            stats.update(rows, mask=units, accept=ok)
            return
        if not accepted:  # counted as skipped, nothing else changes
            stats.update(rows[:1], accept=ok)
            return
        self.rows.append(rows)
        self.units.append(units)
        if len(self.rows) >= FOLD_EVERY:
            self.fold(stats)

    def fold(self, stats: RunningMoments) -> None:
        if not self.rows:
            return
        rows = self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)
        mask = None
        if any(u is not None for u in self.units):
            parts = [
                torch.ones(r.shape[0], dtype=torch.bool, device=r.device) if u is None else u
                for r, u in zip(self.rows, self.units, strict=True)
            ]
            mask = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.rows, self.units = [], []
        stats.update(rows, mask=mask)

    def clear(self) -> None:
        self.rows, self.units = [], []
