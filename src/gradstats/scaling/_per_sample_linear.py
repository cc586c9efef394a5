r"""Sequence Linear/Conv1D sites whose weight gradient is *built from* the per-unit gradients.

For a unit of S > 1 positions the per-unit weight gradient is c_i = Σ_t b_it a_itᵀ and the
weight gradient autograd computes is ĝ = Σ_i c_i. When the Gram identity of
:mod:`gradstats.scaling._per_sample_norms` costs more than materialising (S(d_in + d_out) large
against d_in·d_out), the module's output is routed through :class:`LinearSite`, whose backward
computes the c_i by one batched matmul per chunk of units (the same B·S·d_in·d_out
multiply-adds as autograd's weight GEMM), returns ĝ = Σ_i c_i as the weight gradient and keeps
Σ_i ‖c_i‖² for the statistic — so the norms cost one pass over chunks of c_i that stay in cache
instead of a second GEMM. The input gradient is the same product autograd forms (b W, or b Wᵀ
for Conv1D); the bias gradient is Σ_i Σ_t b_it (its per-unit rows Σ_t b_it give the bias norm).
``.grad`` equals the plain backward's up to float rounding (a different summation order).

Only plain float32/float64 tensors outside autocast take this route (bf16/fp16 would change
the gradient's precision), and only under ``unit="sample"`` with grad mode off in the backward
(``create_graph=True`` gets autograd's own formulas and the Gram/materialised norms).
"""

from __future__ import annotations

import math

import torch

from gradstats.fisher._persample import LinearHandler
from gradstats.scaling._per_sample_staging import Scratch

__all__ = [
    "GEMM_OVERHEAD",
    "PASS_MACS",
    "LinearSite",
    "materialised_grads",
    "plain_grads",
    "reusable",
]

# Cost model (multiply-adds per unit): the reuse route costs GEMM_OVERHEAD · S·d_in·d_out more
# than autograd's weight GEMM (batched matmuls of one unit are less efficient) plus passes over
# the materialised c_i worth PASS_MACS per element; the Gram route costs S²(d_in + d_out).
GEMM_OVERHEAD = 0.3
PASS_MACS = 8.0
CACHE_BYTES = 2**22  # a chunk of per-unit gradients (few chunks: each costs ~4 dispatches)


def reusable(handler: object, unit: str, args: tuple, output: object) -> bool:
    """Whether a recorded call of ``handler``'s module takes the :class:`LinearSite` route."""
    if unit != "sample" or not isinstance(handler, LinearHandler) or handler.keep_output:
        return False
    module = handler.module
    weight, bias = module.weight, module.bias
    if "weight" not in handler.attrs or not weight.requires_grad or not args:
        return False
    x = args[0]
    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() < 3:
        return False
    tensors = [x, weight, output] + ([] if bias is None else [bias])
    dtype = weight.dtype
    if dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled():
        return False
    if any(type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter for t in tensors):
        return False
    if any(t.dtype != dtype or t.device != weight.device for t in tensors):
        return False
    s = math.prod(x.shape[1:-1])
    p, q = weight.shape
    return s > 1 and s * s * (p + q) > (GEMM_OVERHEAD * s + PASS_MACS) * p * q


def materialised_grads(
    handler: LinearHandler,
    a: torch.Tensor,
    b: torch.Tensor,
    budget: int,
    keep: bool = False,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ĝ = Σ_i c_i in the weight's layout, ‖c‖ = (Σ_i ‖c_i‖²)^½ over the units (a 0-dim
    tensor of the data's dtype, or one per chunk), and the [N, *weight.shape] per-unit
    gradients if ``keep`` and they fit in ``budget``) from the per-unit rows a [N, S, d_in],
    b [N, S, d_out].

    Every chunk is formed as Σ_t a_t b_tᵀ [n, d_in, d_out] (a batched matmul whose output rows
    are the wide output features; an ``nn.Linear`` weight [out, in] is its transpose, a view),
    in a buffer lent by ``scratch`` when given (given back unless kept)."""
    n = a.shape[0]
    p, q = handler.module.weight.shape
    unit_bytes = p * q * a.element_size()
    whole = keep and n * unit_bytes <= budget
    step = n if whole else max(1, min(n, CACHE_BYTES // unit_bytes))
    # one unit larger than the budget: chunk its output features (rows of W, columns of Conv1D)
    width = b.shape[-1]
    cols = width if unit_bytes <= budget else max(1, width * budget // unit_bytes)
    d_in = a.shape[-1]
    grad = None if cols >= width else torch.empty((d_in, width), dtype=a.dtype, device=a.device)
    norms = []  # ‖chunk‖ (float32 for float32 data)
    kept = None
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        a_t = a[lo:hi].transpose(1, 2)
        for c0 in range(0, width, cols):
            b_c = b[lo:hi] if cols >= width else b[lo:hi, :, c0 : c0 + cols]
            shape = (hi - lo, d_in, b_c.shape[-1])
            out = None if scratch is None else scratch.take(shape, a)
            per_unit = torch.bmm(a_t, b_c, out=out) if out is not None else torch.bmm(a_t, b_c)
            summed = per_unit.sum(0)
            if cols >= width:  # whole output width: accumulate over chunks of units
                grad = summed if grad is None else grad.add_(summed)
            else:
                assert grad is not None
                target = grad[:, c0 : c0 + cols]
                target.copy_(summed) if lo == 0 else target.add_(summed)
            norms.append(torch.linalg.vector_norm(per_unit))
            if whole:
                kept = per_unit if handler.transposed else per_unit.transpose(1, 2)
            elif out is not None and scratch is not None:
                scratch.give(out)
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    assert grad is not None
    return (grad if handler.transposed else grad.T), norm, kept


class LinearSite(torch.autograd.Function):
    """y = the module's own output; backward: autograd's input gradient, ĝ from per-unit
    gradients (see the module docstring). ``carry`` = (owner, site, output detached)."""

    @staticmethod
    def forward(ctx, x, weight, bias, carry):
        owner, site, out = carry
        ctx.owner, ctx.site = owner, site
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        handler = ctx.site[0]
        gx = None
        if need_x:
            gx = torch.matmul(grad, weight.T if handler.transposed else weight)
        gw, gb = ctx.owner.on_linear(ctx.site, x, grad, need_w, need_b and ctx.has_bias)
        return gx, gw, gb, None


def plain_grads(
    handler: LinearHandler, x: torch.Tensor, grad: torch.Tensor, need_w: bool, need_b: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Autograd's own weight and bias gradients (nothing recorded)."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gw = None
    if need_w:
        gw = x2.T @ g2 if handler.transposed else g2.T @ x2
    return gw, g2.sum(0) if need_b else None
