r"""Tensor-list kernels of the scaler: scale-safe squared norms and the deviation-form EMA step.

Every function takes lists of tensors (one per parameter tensor that has a gradient this step),
issues a fixed number of ops whatever the number of tensors, never syncs with the host, and
returns per-tensor results as one float64 device vector.

Scale safety. ``torch._foreach_norm`` squares in the input's precision: in float32 the square
of |g| > 1.8e19 overflows and that of |g| < 1e-19 underflows (measured: finite gradients of
1.3e19 read as non-finite, gradients of 1e-24 as zero). Here squares are accumulated in float64:
the square of every finite float32 (|x| <= 3.4e38, >= 1.4e-45) is a normal float64
(<= 1.2e77, >= 2e-90), so sums over fewer than 1e230 elements neither overflow nor underflow,
at any magnitude of float32/float16/bfloat16 gradients. float64 gradients are summed in float64
(safe for |g| < 1e154).

Two implementations of each kernel, pinned to each other and to the per-coordinate reference
by tests (``tests/scaling/test_kernels.py``):

* native (CPU): three loops in C (:mod:`gradstats.scaling._native_source`), compiled on first
  use with the system C compiler into a cache folder (``$GRADSTATS_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/gradstats``, else ``~/.cache/gradstats``; about 0.3 s, once per machine)
  and called through ``ctypes``. Used for contiguous CPU tensors of float32/float64 (bfloat16
  gradients too); one pass per kernel: ``squared_norms`` reads g (4 B/element in float32),
  :class:`NativeDeviation` reads g and m and writes m (12 B), and
  :class:`NativeDeviationInto` does both at once — the whole temporal update in one pass of
  12 B/element, writing the new means to a second buffer (one more state-sized buffer) so
  that a dropped step costs nothing to undo.
  By default used while torch runs on one CPU thread (the loops are single-threaded);
  ``GRADSTATS_NATIVE_KERNELS=0``/``1`` (or :func:`set_native_kernels`) turns it off/on; without a
  compiler, on other devices and dtypes, under ``torch.compile`` or tensor subclasses the
  foreach path runs instead. The C source, its build and the ``ctypes`` wrappers live in
  :mod:`gradstats.scaling._native`.
* foreach: ``torch._foreach_*`` and whole-buffer ops (any device, no compiler, no host sync).
"""

from __future__ import annotations

import torch

from gradstats.scaling._native import (
    NativeDeviation,
    NativeDeviationInto,
    native_kernels_available,
    native_squared_norms,
    native_traffic,
    set_native_kernels,
)

__all__ = [
    "FlatScratch", "NativeDeviation", "NativeDeviationInto", "deviation_step_",
    "native_kernels_available", "native_traffic", "power_of_two_scale", "set_native_kernels",
    "squared_norms", "state_dtype",
]  # fmt: skip


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """float32, or the parameter's dtype when it is wider (statistics never live in fp16/bf16)."""
    return torch.promote_types(param.dtype, torch.float32)


# ------------------------------------------------------------------------------ any device
def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖t_j‖² = Σ_i t_ij² of every tensor, accumulated in float64 (one float64 vector).

    NaN/inf anywhere in t_j makes its entry non-finite: that is how the scaler detects
    non-finite gradients without a separate pass. Finite inputs give finite, non-zero-where-
    nonzero entries at any float32 magnitude (module docstring). One native pass on the CPU
    (read 4 B/element in float32; torch's float64 ``_foreach_powsum`` makes a float64 copy
    there), one foreach op elsewhere.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    native = native_squared_norms(tensors)
    if native is not None:
        return native
    return torch.stack(torch._foreach_powsum(tensors, 2, dtype=torch.float64))


class FlatScratch:
    """One flat buffer per dtype over a fixed list of shapes, and a view of it per tensor.

    The deviations δ_j of one step live here, so that one whole-buffer op can clean them of
    NaN/inf; allocated on first use (as many elements as the tensors it serves).
    """

    def __init__(self, like: list[torch.Tensor]) -> None:
        self._like = like
        self._views: list[torch.Tensor] | None = None
        self.flat = torch.empty(0)

    def views(self) -> list[torch.Tensor]:
        if self._views is None:
            total = sum(t.numel() for t in self._like)
            first = self._like[0]
            self.flat = torch.empty(total, dtype=first.dtype, device=first.device)
            self._views, offset = [], 0
            for t in self._like:
                self._views.append(self.flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
        return self._views


def power_of_two_scale(mean_square: torch.Tensor) -> torch.Tensor:
    """c = 2^−e with 2^(e−1) <= sqrt(``mean_square``) < 2^e, e clamped to [−100, 100] (1 where
    ``mean_square`` is 0 or not finite): multiplying by c is exact and brings values of that
    root-mean-square to [0.5, 1), so their squares are safe to sum in float32."""
    ok = torch.isfinite(mean_square) & (mean_square > 0)
    root = torch.where(ok, mean_square, 1.0).sqrt()
    exponent = torch.frexp(root).exponent.clamp(-100, 100)
    return torch.where(ok, torch.ldexp(torch.ones_like(root), -exponent), 1.0)


def deviation_step_(
    means: list[torch.Tensor],
    grads: list[torch.Tensor],
    deltas: list[torch.Tensor],
    flat: torch.Tensor,
    weights: torch.Tensor,
    scale: torch.Tensor,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The mean half of a deviation-form (West) EMA step, for every tensor j at once.

    With s the ``multiplier`` (1/loss-scale, a device scalar; 1 if None) and c_j = ``scale[j]``
    a power of two (:func:`power_of_two_scale`, so that every product with it is exact):

        d_j = c_j (s·g_j − m_j)     (into ``deltas``, views of ``flat``)
        returns ‖d_j‖² / c_j²       = ‖s·g_j − m_j‖² (float64 vector): squares of values of
                                    order one, so no float32 over/underflow; non-finite iff
                                    g_j is
        m_j ← m_j + (w_j/c_j) d_j   = m_j + w_j (s·g_j − m_j), once NaN/±inf in d are zeroed

    so that ``w_j = 0`` leaves m_j unchanged even when g_j holds NaN (0 · NaN would be NaN;
    the zeroing is one op over ``flat``). The caller forms the variance from the result,
    Σ_i v_i ← (1 − w_j)(Σ_i v_i + w_j ‖δ_j‖²) (the coordinate sum of the per-coordinate West
    update), so no large number is ever subtracted from another (unlike q − ‖m‖²).

    Ops: copy, (mul), sub, mul, powsum, nan_to_num, addcmul, whatever ``len(means)``.
    """
    dtype = flat.dtype
    torch._foreach_copy_(deltas, grads)
    if multiplier is not None:
        torch._foreach_mul_(deltas, multiplier.to(dtype))
    torch._foreach_sub_(deltas, means)
    torch._foreach_mul_(deltas, list(scale.to(dtype).unbind()))
    sq = torch.stack(torch._foreach_powsum(deltas, 2)).to(torch.float64) / scale.square()
    flat.nan_to_num_(0.0, 0.0, 0.0)
    torch._foreach_addcmul_(means, deltas, list((weights / scale).to(dtype).unbind()))
    return sq
