"""Complex-analytic versions of transformer ops: equal to the real ops on the real axis.

Holomorphic EP relaxes complex states, so every op of a holomorphic force must be analytic in z:
no |·|, no conj, no real-only branches. These functions accept real or complex tensors:

* :func:`holo_layer_norm`: variance from squares (x − μ)², not |x − μ|²; principal sqrt.
* :func:`holo_masked_softmax`: the shift is the max of the *real part over valid entries only*
  (a huge logit at a masked position cannot underflow the valid ones); masked entries are exact
  zeros with zero gradient, rows without valid entries give zeros.
* :func:`holo_gelu`: tanh-GELU, 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))).
* :func:`holo_logsumexp`, :func:`holo_cross_entropy`: shifted by the real max (a constant for
  the derivative), principal log.
"""

from __future__ import annotations

import math

import torch

from gradstats.errors import ConfigurationTypeError

__all__ = [
    "holo_cross_entropy",
    "holo_gelu",
    "holo_layer_norm",
    "holo_logsumexp",
    "holo_masked_softmax",
]

_GELU_C = math.sqrt(2.0 / math.pi)


def _as(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.to(x.dtype)


def holo_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension: (x − μ)/√(mean((x − μ)²) + eps) · w + b.

    Equals ``torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)`` for real x.

    Example:
        >>> x = torch.randn(3, 5, dtype=torch.float64)
        >>> ref = torch.nn.functional.layer_norm(x, (5,))
        >>> torch.allclose(holo_layer_norm(x), ref)
        True
    """
    centred = x - x.mean(-1, keepdim=True)
    var = (centred * centred).mean(-1, keepdim=True)
    out = centred / torch.sqrt(var + eps)
    if weight is not None:
        out = out * _as(weight, x)
    if bias is not None:
        out = out + _as(bias, x)
    return out


def holo_masked_softmax(a: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax of ``a`` over ``dim`` restricted to entries where ``mask`` is True.

    Shift c = max over valid entries of Re a (it cancels exactly in exact arithmetic; here it
    only keeps exp in range). Invalid entries are 0 with zero gradient; an all-invalid row is 0.
    Equals ``torch.softmax(a.masked_fill(~mask, -inf), dim)`` for real ``a`` (where that is
    defined).

    Args:
        a: logits, real or complex.
        mask: bool, broadcastable to ``a``; True = valid.
    """
    if mask.dtype != torch.bool:
        raise ConfigurationTypeError(f"mask must be a bool tensor (True = valid); got {mask.dtype}")
    mask = mask.expand_as(a)
    real = a.real if a.is_complex() else a
    shift = real.detach().masked_fill(~mask, -math.inf).amax(dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    centred = torch.where(mask, a - shift, torch.zeros_like(a))
    e = torch.where(mask, torch.exp(centred), torch.zeros_like(a))
    total = e.sum(dim, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)
    return e / total


def holo_gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh-GELU; equals ``torch.nn.functional.gelu(x, approximate="tanh")`` for real x."""
    return 0.5 * x * (1 + torch.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def holo_logsumexp(a: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """log Σ exp(a) over ``dim`` with the real max as shift; equals ``torch.logsumexp`` on reals."""
    real = a.real if a.is_complex() else a
    shift = real.detach().amax(dim, keepdim=True)
    out = shift + torch.log(torch.exp(a - shift).sum(dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def holo_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean over non-ignored targets of logsumexp(logits) − logits[target] (last dim = classes).

    Equals ``torch.nn.functional.cross_entropy`` (mean reduction) for real logits.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = target.reshape(-1)
    valid = tgt != ignore_index
    safe = torch.where(valid, tgt, torch.zeros_like(tgt))
    picked = flat.gather(1, safe[:, None]).squeeze(1)
    per = holo_logsumexp(flat, -1) - picked
    per = torch.where(valid, per, torch.zeros_like(per))
    return per.sum() / valid.sum().clamp_min(1)
