r"""Per-unit squared gradient norms Σ_i ‖c_i‖² of one parameter, without per-unit gradients
where an identity allows (the reductions behind ``statistic="per_sample"``).

A unit's contribution to a weight is a sum over its positions t of outer products, laid out like
the weight: ``nn.Linear`` (W [out, in]) c_i = Σ_t b_it a_itᵀ, Hugging Face ``Conv1D`` (W [in,
out]) c_i = Σ_t a_it b_itᵀ, ``nn.Embedding`` (W [V, d]) c_i = Σ_t e_{x_it} b_itᵀ — a
:class:`Outer` (left ⊗ right) or an :class:`Index` (one-hot left) factor form. Then

* one position: ‖c_i‖² = ‖l_i‖²‖r_i‖² (embedding: ‖b_i‖²);
* a sequence: ‖Σ_t l_t r_tᵀ‖² = Σ_{t,s} (l_t·l_s)(r_t·r_s) = ⟨L Lᵀ, R Rᵀ⟩, from the two [T, T]
  Gram matrices when that is the cheaper, T²(d_l + d_r) ≤ T·d_l·d_r multiply-adds per unit,
  else from the materialised [d_l, d_r] gradient (cost T·d_l·d_r), in chunks of units (a
  Linear/Conv1D site whose weight gradient is built from the per-unit gradients, see
  :mod:`gradstats.scaling._per_sample_linear`, gets the norm from those instead);
* an embedding sequence: rows with equal ids summed within the unit (sort + segment sum), then
  squared — no dense [B, V, d] buffer;
* a parameter used at several sites of one forward (tied ``wte``/``lm_head``, a module called
  twice): ‖Σ_s c_i^(s)‖² = Σ_s ‖c_i^(s)‖² + 2 Σ_{s<s'} ⟨c_i^(s), c_i^(s')⟩ with the cross terms
  Σ_{t,u} (l_t·l'_u)(r_t·r'_u) (one-hot left factors: a gather, or an equality mask).

Everything else (biases, norms, convolutions, the ``torch.func`` fallback) is materialised a
chunk of units at a time by the Fisher collector's handlers and squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Index", "Outer", "cross_sum", "norm_sum", "row_norms", "squared_sum"]


@dataclass(frozen=True)
class Outer:
    """c_i = Σ_t left[i, t] right[i, t]ᵀ (left [N, S, p], right [N, S, q])."""

    left: torch.Tensor
    right: torch.Tensor


@dataclass(frozen=True)
class Index:
    """c_i = Σ_t e_{ids[i, t]} right[i, t]ᵀ (ids [N, S], right [N, S, d], rows < ``vocab``)."""

    ids: torch.Tensor
    right: torch.Tensor
    vocab: int


Factor = Outer | Index


def _f64(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float64)


def squared_sum(per_unit: torch.Tensor) -> torch.Tensor:
    """Σ over every element of a chunk of materialised per-unit gradients of its square."""
    return _f64(per_unit.square().sum())


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖² of every unit of x [N, S, f] (one pass, no squared copy of x)."""
    return torch.linalg.vector_norm(x, dim=(1, 2)).square()


def _chunks(n: int, unit_bytes: int, budget: int) -> list[tuple[int, int]]:
    """(lo, hi) chunks of n units, each within ``budget`` bytes at ``unit_bytes`` per unit."""
    step = max(1, min(n, budget // max(1, unit_bytes)))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def norm_sum(f: Factor, budget: int) -> torch.Tensor:
    """Σ_i ‖c_i‖² of one factor form (float64 0-dim tensor, on the data's device)."""
    if isinstance(f, Index):
        return _index_norm(f)
    left, right = f.left, f.right
    n, s, p = left.shape
    q = right.shape[-1]
    if s == 1:
        return _f64((row_norms(left) * row_norms(right)).sum())
    total = torch.zeros((), dtype=torch.float64, device=left.device)
    item = left.element_size()
    if s * (p + q) <= p * q:  # ⟨L Lᵀ, R Rᵀ⟩ from two [S, S] Gram matrices: S²(p + q) ≤ S·p·q
        for lo, hi in _chunks(n, 2 * s * s * item, budget):
            gl = torch.bmm(left[lo:hi], left[lo:hi].transpose(1, 2))
            gr = torch.bmm(right[lo:hi], right[lo:hi].transpose(1, 2))
            total = total + _f64((gl * gr).sum())
        return total
    for lo, hi in _chunks(n, p * q * item, budget):  # materialise Σ_t l_t r_tᵀ, chunk by chunk
        total = total + squared_sum(torch.bmm(left[lo:hi].transpose(1, 2), right[lo:hi]))
    return total


def _index_norm(f: Index) -> torch.Tensor:
    ids, right = f.ids, f.right
    n, s, d = right.shape
    flat = right.reshape(n * s, d)
    if s == 1:
        return squared_sum(flat)
    units = torch.arange(n, device=ids.device).unsqueeze(1)
    keys, order = (units * f.vocab + ids).reshape(-1).sort()
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    segment = new.cumsum(0) - 1
    sums = torch.zeros_like(flat).index_add_(0, segment, flat[order])
    return squared_sum(sums)  # rows past the last segment stay zero


def cross_sum(f: Factor, g: Factor, budget: int) -> torch.Tensor:
    """Σ_i ⟨c_i(f), c_i(g)⟩ of two factor forms of the same parameter and units."""
    if isinstance(f, Index) and isinstance(g, Outer):
        f, g = g, f
    r1, r2 = f.right, g.right
    n, s1 = r1.shape[:2]
    s2 = r2.shape[1]
    total = torch.zeros((), dtype=torch.float64, device=r1.device)
    for lo, hi in _chunks(n, 2 * s1 * s2 * r1.element_size(), budget):
        gram = torch.bmm(r1[lo:hi], r2[lo:hi].transpose(1, 2))  # r_t·r'_u
        if isinstance(f, Outer) and isinstance(g, Outer):
            left = torch.bmm(f.left[lo:hi], g.left[lo:hi].transpose(1, 2))  # l_t·l'_u
        elif isinstance(f, Outer) and isinstance(g, Index):  # l_t·e_{x_u} = l_t[x_u]
            ids = g.ids[lo:hi].unsqueeze(1).expand(hi - lo, s1, s2)
            left = f.left[lo:hi].gather(2, ids)
        else:
            assert isinstance(f, Index)
            assert isinstance(g, Index)
            left = (f.ids[lo:hi].unsqueeze(2) == g.ids[lo:hi].unsqueeze(1)).to(gram.dtype)
        total = total + _f64((left * gram).sum())
    return total
