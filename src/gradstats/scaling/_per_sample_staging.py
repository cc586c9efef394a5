r"""What one backward of ``statistic="per_sample"`` records, reduced in a few ops at its end.

The hooks of :mod:`gradstats.scaling._per_sample` hand every site's share of Σ_i ‖c_i‖² to a
:class:`Staging` in one of three forms, and :meth:`Staging.values` turns them all into one
float64 vector with a fixed number of ops per backward (not per site):

* ``add(name, v)``: v = Σ_i ‖c_i‖² itself (a float64 0-dim tensor: shared sites, embeddings);
* ``add_norm(name, x)``: v = ‖x‖²_F of a small tensor x (the per-unit rows of a bias or a
  norm's γ/β, or a 0-dim norm already taken of a chunk of per-unit gradients); all of them are
  normed by one ``torch._foreach_norm`` and squared in float64;
* ``rows(weight, bias, a, b)``: a Linear/Conv1D site of one position per unit (a [N, d_in],
  b [N, d_out]), ‖c_i(W)‖² = ‖a_i‖²‖b_i‖² and ‖c_i(bias)‖² = ‖b_i‖²: the hook writes ‖a_i‖
  and ‖b_i‖ straight into row k of a buffer R [3, K, N] kept across backward passes
  (``vector_norm(out=)``, no op of its own), and at the end R[0] = R[2]·R[1] = ‖a_i‖‖b_i‖ and
  one float64 ``vector_norm`` over the units of R[:2] give Σ_i ‖a_i‖²‖b_i‖² and Σ_i ‖b_i‖² of
  every such site at once (3 ops per backward, whatever the number of layers).

Several entries of one name add up (``index_add`` of the state). :class:`Scratch` lends reused
buffers for chunks of per-unit gradients, so that a chunk (up to a few MB) is not a fresh
allocation, page-faulted in, at every site of every step.
"""

from __future__ import annotations

import torch

__all__ = ["DEFER_BYTES", "MAX_ROW_LAYOUTS", "Scratch", "Staging"]

DEFER_BYTES = 2**20  # tensors up to this size are normed at the end of the backward (kept alive)
MAX_ROW_LAYOUTS = 16  # row buffers kept (one per batch size, dtype, device), then rebuilt


class Scratch:
    """Flat buffers per (dtype, device), lent by :meth:`take` and given back by :meth:`give`."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous [shape] tensor of ``like``'s dtype and device (contents undefined)."""
        numel = 1
        for n in shape:
            numel *= n
        free = self._free.setdefault((like.dtype, like.device), [])
        for k, flat in enumerate(free):
            if flat.numel() >= numel:
                return free.pop(k)[:numel].view(shape)
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor from :meth:`take` (its storage is reused by a later ``take``)."""
        flat = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        flat.set_(tensor.untyped_storage())
        free = self._free.setdefault((tensor.dtype, tensor.device), [])
        free.append(flat)
        free.sort(key=torch.Tensor.numel)

    def clear(self) -> None:
        self._free = {}


class Staging:
    """The entries of one backward (see the module docstring); :meth:`reset` after each."""

    def __init__(self) -> None:
        self._rows: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        # views of a row buffer, made once (each view is an op): per row k (R[1, k], R[2, k]),
        # and per number of rows k (R[0, :k], R[1, :k], R[2, :k], R[:2, :k])
        self._row_views: dict[tuple[int, torch.dtype, torch.device], list] = {}
        self._sum_views: dict[tuple[tuple[int, torch.dtype, torch.device], int], tuple] = {}
        self.reset()

    def reset(self) -> None:
        self._names: list[str] = []  # one per scalar entry
        self._scalars: list[torch.Tensor] = []
        self._norm_names: list[str] = []
        self._norms: list[torch.Tensor] = []
        self._row_names: list[tuple[str | None, str | None]] = []
        self._row_key: tuple[int, torch.dtype, torch.device] | None = None

    def __bool__(self) -> bool:
        return bool(self._names or self._norm_names or self._row_names)

    def add(self, name: str, value: torch.Tensor) -> None:
        """Σ_i ‖c_i‖² of ``name`` (float64 0-dim)."""
        self._names.append(name)
        self._scalars.append(value)

    def add_norm(self, name: str, x: torch.Tensor) -> None:
        """‖x‖²_F for ``name``: x a tensor (normed now if larger than ``DEFER_BYTES``, else at
        the end of the backward) or a 0-dim ‖·‖ already taken."""
        if x.dim() > 0 and x.numel() * x.element_size() > DEFER_BYTES:
            x = torch.linalg.vector_norm(x)
        self._norm_names.append(name)
        self._norms.append(x)

    def rows(self, weight: str | None, bias: str | None, a: torch.Tensor, b: torch.Tensor) -> None:
        """A site of one position per unit (a [N, d_in], b [N, d_out], one dtype and device)
        for its weight and/or bias."""
        key = (b.shape[0], b.dtype, b.device)
        if self._row_key is None and not (a.requires_grad or b.requires_grad):
            self._row_key = key
        if key != self._row_key or a.requires_grad or b.requires_grad:
            # another layout in the same backward (or differentiable rows: create_graph,
            # torch.func): normed on their own
            b_norm = torch.linalg.vector_norm(b, dim=1)
            if weight is not None:
                a_norm = torch.linalg.vector_norm(a, dim=1)
                self.add_norm(weight, torch.linalg.vector_norm(a_norm * b_norm))
            if bias is not None:
                self.add_norm(bias, torch.linalg.vector_norm(b_norm))
            return
        k = len(self._row_names)
        buffer = self._rows.get(key)
        if buffer is None and len(self._rows) >= MAX_ROW_LAYOUTS:  # batch sizes that keep changing
            self._rows, self._row_views, self._sum_views = {}, {}, {}
        if buffer is None or buffer.shape[1] <= k:
            grown = torch.empty((3, max(4, 2 * k), key[0]), dtype=b.dtype, device=b.device)
            if buffer is not None:
                grown[:, :k] = buffer[:, :k]
            self._rows[key] = buffer = grown
            self._row_views[key] = list(zip(grown[1], grown[2], strict=True))
            self._sum_views = {}
        out_b, out_a = self._row_views[key][k]
        torch.linalg.vector_norm(b, dim=1, out=out_b)
        torch.linalg.vector_norm(a if weight is not None else b, dim=1, out=out_a)
        self._row_names.append((weight, bias))

    def values(self, device: torch.device) -> tuple[list[str | None], torch.Tensor | None]:
        """(the name of every entry, their values as one float64 vector on ``device``); a
        name is None where a site has no such parameter (its value is to be dropped)."""
        names: list[str | None] = list(self._names)
        parts = []
        if self._scalars:
            parts.append(_stack(self._scalars, device))
        if self._norms:
            normed = [x for x in self._norms if x.dim() > 0]
            norms = iter(torch._foreach_norm(normed)) if normed else iter(())
            taken = [next(norms) if x.dim() > 0 else x for x in self._norms]
            parts.append(_stack(taken, device).to(torch.float64).square())
            names += self._norm_names
        if self._row_names:
            assert self._row_key is not None
            k = len(self._row_names)
            views = self._sum_views.get((self._row_key, k))
            if views is None:
                rows = self._rows[self._row_key][:, :k]
                views = self._sum_views[(self._row_key, k)] = (*rows, rows[:2])
            product, b_norms, a_norms, both = views
            torch.mul(a_norms, b_norms, out=product)  # ‖a_i‖‖b_i‖
            # [Σ_i ‖a_i‖²‖b_i‖² of every site; Σ_i ‖b_i‖² of every site]
            sums = torch.linalg.vector_norm(both, dim=2, dtype=torch.float64).square()
            parts.append(sums.reshape(-1).to(device))
            names += [w for w, _ in self._row_names] + [c for _, c in self._row_names]
        if not parts:
            return names, None
        return names, parts[0] if len(parts) == 1 else torch.cat(parts)


def _stack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One vector of 0-dim tensors (of possibly several dtypes: promoted to float64)."""
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.to(torch.float64) for t in tensors]
    if any(t.device != device for t in tensors):
        tensors = [t.to(device) for t in tensors]
    return torch.stack(tensors)
