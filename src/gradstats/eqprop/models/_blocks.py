"""The transformer block's parts: causal attention and the feed-forward network.

Shared by the equilibrium transformer (one block at its fixed point) and the feed-forward
baseline. Every part takes real or complex inputs: complex inputs use the holomorphic versions
of the ops (:mod:`gradstats.eqprop._holo_ops`), equal to the real ops on the real axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradstats.eqprop._holo_ops import holo_gelu, holo_layer_norm, holo_masked_softmax

__all__ = [
    "CausalAttention",
    "Embedding",
    "FeedForward",
    "Head",
    "Readout",
    "cast_to",
    "layer_norm",
    "primitive_norms",
]


#: Set within :func:`primitive_norms`: LayerNorms from primitive ops (exact to every order).
_PRIMITIVE_NORMS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "primitive_norms", default=False
)


@contextlib.contextmanager
def primitive_norms() -> Iterator[None]:
    """Within the block :func:`layer_norm` is ``holo_layer_norm`` (mean, square, sqrt) on real
    inputs too. PyTorch's fused ``layer_norm`` saves its mean and 1/σ without autograd history:
    its first and second derivatives are right, the third is silently wrong
    (pytorch/pytorch#175754) — and a Jacobian penalty's gradient w.r.t. the parameters is a
    third derivative (measured: 37% off on ``attn.heads.*.query``)."""
    token = _PRIMITIVE_NORMS.set(True)
    try:
        yield
    finally:
        _PRIMITIVE_NORMS.reset(token)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension with ``norm``'s affine parameters (None: none):
    ``F.layer_norm``, or the primitive-op form for complex ``x`` and in :func:`primitive_norms`."""
    w = None if norm is None else norm.weight
    b = None if norm is None else norm.bias
    if x.is_complex() or _PRIMITIVE_NORMS.get():
        return holo_layer_norm(x, w, b, eps)
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def cast_to(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return w.to(z.dtype) if z.is_complex() else w


class Head(nn.Module):
    """One attention head's parameters: ``query``/``key``/``value`` [d, C], ``out`` [C, d] and,
    with qk-norm, the gains ``q_norm``/``k_norm`` [d]."""

    query: nn.Parameter
    key: nn.Parameter
    value: nn.Parameter
    out: nn.Parameter
    q_norm: nn.Parameter
    k_norm: nn.Parameter

    def __init__(self, d_model: int, d_head: int, qk_norm: bool) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(d_head, d_model))
        self.key = nn.Parameter(torch.empty(d_head, d_model))
        self.value = nn.Parameter(torch.empty(d_head, d_model))
        self.out = nn.Parameter(torch.empty(d_model, d_head))
        if qk_norm:
            self.q_norm = nn.Parameter(torch.ones(d_head))
            self.k_norm = nn.Parameter(torch.ones(d_head))


class CausalAttention(nn.Module):
    """Multi-head causal softmax attention with untied per-head Q/K/V/O and optional qk-norm.

    Attn(h) = Σ_h softmax_causal(q_h k_hᵀ/√d) v_h W_{o,h}ᵀ, q_h = LN(h W_{q,h}ᵀ) ⊙ g_q (qk-norm).
    Real inputs use the native ops, complex inputs their holomorphic versions (same values on
    the real axis).
    """

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.qk_norm = n_heads, d_model // n_heads, qk_norm
        self.norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList(Head(d_model, self.d_head, qk_norm) for _ in range(n_heads))

    def each_head(self) -> list[Head]:
        """The heads, typed."""
        return [h for h in self.heads if isinstance(h, Head)]

    def _stack(self, name: str, z: torch.Tensor) -> torch.Tensor:
        return cast_to(torch.stack([getattr(h, name) for h in self.heads]), z)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Attention of the (already normalised) input ``h`` [B, T, C]."""
        q = torch.einsum("btc,hdc->bhtd", h, self._stack("query", h))
        k = torch.einsum("btc,hdc->bhtd", h, self._stack("key", h))
        v = torch.einsum("btc,hdc->bhtd", h, self._stack("value", h))
        if self.qk_norm:
            q = layer_norm(q, None) * self._stack("q_norm", h)[None, :, None, :]
            k = layer_norm(k, None) * self._stack("k_norm", h)[None, :, None, :]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.d_head))
        t = h.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        if scores.is_complex():
            att = holo_masked_softmax(scores, mask)
        else:
            att = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
        return torch.einsum("bhtd,hcd->btc", att @ v, self._stack("out", h))


class FeedForward(nn.Module):
    """tanh-GELU MLP, FFN(h) = W₂ gelu(W₁h + b₁) + b₂ (``tied=True``: no W₂, see ``energy``)."""

    def __init__(self, d_model: int, hidden: int, tied: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, hidden)
        self.down = None if tied else nn.Linear(hidden, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            raise RuntimeError("a tied FeedForward has no output projection: use energy_force")
        pre = h @ cast_to(self.up.weight, h).T + cast_to(self.up.bias, h)
        act = holo_gelu(pre) if h.is_complex() else F.gelu(pre, approximate="tanh")
        return act @ cast_to(self.down.weight, h).T + cast_to(self.down.bias, h)

    def energy_force(self, z: torch.Tensor) -> torch.Tensor:
        """−∇_z E, E(z) = −½ Σ relu(W₁ LN(z) + b₁)²: J_LN(z)ᵀ W₁ᵀ relu(W₁ LN(z) + b₁).

        The LayerNorm VJP is written out: with x̂ = (z − μ)/σ and u = g ⊙ w,
        J_LNᵀw = (u − mean(u) − x̂ · mean(u ⊙ x̂))/σ.
        """
        centred = z - z.mean(-1, keepdim=True)
        sigma = torch.sqrt((centred * centred).mean(-1, keepdim=True) + self.norm.eps)
        xhat = centred / sigma
        h = xhat * self.norm.weight + self.norm.bias
        w = torch.relu(h @ self.up.weight.T + self.up.bias) @ self.up.weight
        u = self.norm.weight * w
        return (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True)) / sigma


class Embedding(nn.Module):
    """Token and position embeddings: ``token`` [V, C], ``position`` [block_size, C]."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.empty(vocab_size, d_model))
        self.position = nn.Parameter(torch.empty(block_size, d_model))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """tok[idx] + pos[:T] for token ids ``idx`` [B, T]."""
        return self.token[idx] + self.position[: idx.shape[1]]


class Readout(nn.Module):
    """The readout: a LayerNorm ``norm`` and the projection ``proj`` [V, C] (logits LN(z) Wᵀ)."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits LN(z) Wᵀ ([..., V]); complex ``z`` uses the holomorphic LayerNorm."""
        return layer_norm(z, self.norm) @ cast_to(self.proj, z).T
