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

* native (CPU): two loops in C (:data:`_SOURCE`), compiled on first use with the system C
  compiler into a cache folder (``$GRADSTATS_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradstats``,
  else ``~/.cache/gradstats``; about 0.3 s, once per machine) and called through ``ctypes``.
  Used for contiguous CPU tensors of float32/float64 (bfloat16 gradients too); one pass per
  kernel: ``squared_norms`` reads g (4 B/element in float32) and :class:`NativeDeviation`
  reads g and m and writes m (12 B) — 16 B/element for the whole temporal update.
  By default used while torch runs on one CPU thread (the loops are single-threaded);
  ``GRADSTATS_NATIVE_KERNELS=0``/``1`` (or :func:`set_native_kernels`) turns it off/on; without a
  compiler, on other devices and dtypes, under ``torch.compile`` or tensor subclasses the
  foreach path runs instead.
* foreach: ``torch._foreach_*`` and whole-buffer ops (any device, no compiler, no host sync).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FlatScratch", "NativeDeviation", "deviation_step_", "native_kernels_available",
    "native_traffic", "power_of_two_scale", "set_native_kernels", "squared_norms", "state_dtype",
]  # fmt: skip


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """float32, or the parameter's dtype when it is wider (statistics never live in fp16/bf16)."""
    return torch.promote_types(param.dtype, torch.float32)


# ------------------------------------------------------------------------------ native (CPU)
# kind codes: 0 float32, 1 float64, 2 bfloat16 (its bits are the top half of a float32)
_SOURCE = r"""
#include <stdint.h>
#include <string.h>
/* 16 independent float64 accumulators per loop: a single one would bound the pass by the
   latency of its additions rather than by memory bandwidth */
#define GS_LANES 16
static inline double gs_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return (double)f;
}
#define GS_PLAIN(v) ((double)(v))
#define GS_SUMSQ(T, LOAD) {                                                                 \
    const T *restrict x = (const T *)ptr[j]; double acc[GS_LANES] = {0}, total = 0.0;      \
    int64_t i = 0;                                                                         \
    for (; i + GS_LANES <= n[j]; i += GS_LANES)                                            \
        for (int k = 0; k < GS_LANES; ++k) { double v = LOAD(x[i + k]); acc[k] += v * v; } \
    for (; i < n[j]; ++i) { double v = LOAD(x[i]); total += v * v; }                       \
    for (int k = 0; k < GS_LANES; ++k) total += acc[k];                                    \
    out[j] = total; }
/* out[j] = sum_i x_j[i]^2, accumulated in double */
void gs_sumsq(int64_t count, void *const *ptr, const int64_t *n, const int8_t *kind,
              double *out) {
    for (int64_t j = 0; j < count; ++j) {
        if (kind[j] == 0) GS_SUMSQ(float, GS_PLAIN)
        else if (kind[j] == 1) GS_SUMSQ(double, GS_PLAIN)
        else GS_SUMSQ(uint16_t, gs_bf16)
    }
}
#define GS_DEV(M_, G, LOAD_) {                                                              \
    typedef M_ M;                                                                          \
    M *restrict mj = (M *)m[j]; const G *restrict gj = (const G *)g[j];                    \
    double acc[GS_LANES] = {0}; int64_t i = 0;                                             \
    for (; i + GS_LANES <= n[j]; i += GS_LANES)                                            \
        for (int k = 0; k < GS_LANES; ++k) GS_STEP_##LOAD_(i + k, acc[k])                  \
    for (; i < n[j]; ++i) GS_STEP_##LOAD_(i, total)                                        \
    for (int k = 0; k < GS_LANES; ++k) total += acc[k]; }
#define GS_STEP_GS_PLAIN(I, ACC) { double mi = (double)mj[I], d = s * (double)gj[I] - mi;  \
    ACC += d * d; mj[I] = (M)(mi + w * d); }
#define GS_STEP_gs_bf16(I, ACC) { double mi = (double)mj[I], d = s * gs_bf16(gj[I]) - mi;  \
    ACC += d * d; mj[I] = (M)(mi + w * d); }
/* d = s g_j - m_j (in double); out[j] = sum_i d_i^2; m_j += a_j d; nothing read when a_j == 0 */
void gs_deviation(int64_t count, void *const *m, void *const *g, const int64_t *n,
                  const int8_t *kind, const double *a, const double *scale, double *out) {
    const double s = scale ? *scale : 1.0;
    for (int64_t j = 0; j < count; ++j) {
        const double w = a[j];
        double total = 0.0;
        if (w != 0.0) {
            if (kind[j] == 0) GS_DEV(float, float, GS_PLAIN)
            else if (kind[j] == 1) GS_DEV(double, double, GS_PLAIN)
            else GS_DEV(float, uint16_t, gs_bf16)
        }
        out[j] = total;
    }
}
"""
_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_MEAN_DTYPE = (torch.float32, torch.float64, torch.float32)  # the m dtype of each kind
_SETTING = os.environ.get("GRADSTATS_NATIVE_KERNELS", "auto").strip().lower()
# True: always (where they apply); False: never; None ("auto"): only while torch runs on one
# CPU thread — the loops are single-threaded, and with several threads torch's own foreach ops
# share the work (measured single-threaded only: with more threads the fallback may be faster)
_ENABLED: bool | None = (
    False if _SETTING in ("0", "false") else True if _SETTING in ("1", "true") else None
)
_LIB: ctypes.CDLL | None = None
_TRIED = False
_TALLY: list[tuple[str, int, int]] | None = None
_P = ctypes.c_void_p


def _cache_dir() -> Path:
    base = os.environ.get("GRADSTATS_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradstats"


def _flags() -> list[str]:
    flags = ["-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp-simd"]
    if platform.machine().lower() in ("x86_64", "amd64") and (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    ):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build() -> ctypes.CDLL | None:
    """Load the cached library, compiling it first if needed; None if that is not possible."""
    named = os.environ.get("CC")  # a compiler the user names is the only one tried
    compiler = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if sys.platform == "win32" or compiler is None:
        return None
    flags = _flags()
    key = hashlib.sha256("\0".join([_SOURCE, *flags, platform.machine()]).encode()).hexdigest()
    path = _cache_dir() / f"kernels-{key[:16]}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                source, built = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                source.write_text(_SOURCE)
                subprocess.run(
                    [compiler, *flags, str(source), "-o", str(built)],
                    check=True, capture_output=True, timeout=120,
                )  # fmt: skip
                os.replace(built, path)  # atomic: concurrent builders are harmless
        lib = ctypes.CDLL(str(path))
        lib.gs_sumsq.argtypes = [ctypes.c_int64, _P, _P, _P, _P]
        lib.gs_deviation.argtypes = [ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P]
    except (OSError, AttributeError, subprocess.SubprocessError):  # no compiler, bad cache
        return None
    return lib


def _library() -> ctypes.CDLL | None:
    """The built library where the native kernels are to run now, else None."""
    global _LIB, _TRIED
    if _ENABLED is False or (_ENABLED is None and torch.get_num_threads() != 1):
        return None
    if not _TRIED:
        _TRIED, _LIB = True, _build()
    return _LIB


def set_native_kernels(enabled: bool | None) -> bool | None:
    """Use the compiled CPU kernels where they apply (True), never (False), or only while
    ``torch.get_num_threads() == 1`` (None, the default; ``GRADSTATS_NATIVE_KERNELS=0/1/auto``
    sets the same). Returns the previous setting. Building happens on first use, not here."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, None if enabled is None else bool(enabled)
    return previous


def native_kernels_available() -> bool:
    """Whether the compiled CPU kernels run now: enabled (for this thread count) and built
    (building them if needed)."""
    return _library() is not None


@contextlib.contextmanager
def native_traffic() -> Iterator[list[tuple[str, int, int]]]:
    """Record every native kernel call made inside the block as (name, bytes read, bytes
    written) — the benchmark's count of the calls a profiler cannot see."""
    global _TALLY
    previous, _TALLY = _TALLY, []
    try:
        yield _TALLY
    finally:
        _TALLY = previous


def _native_args(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], list[int]] | None:
    """(data pointers, sizes, kinds) if every tensor is a plain contiguous CPU tensor of a
    supported dtype (else None)."""
    ptrs, sizes, kinds = [], [], []
    for t in tensors:
        kind = _KIND.get(t.dtype)
        if kind is None or type(t) is not torch.Tensor or not t.is_cpu or not t.is_contiguous():
            return None
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
        kinds.append(kind)
    return ptrs, sizes, kinds


def _array(kind: type[ctypes._SimpleCData[Any]], values: list[int]) -> ctypes.Array[Any]:
    return (kind * max(len(values), 1))(*values)


def _native_squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    lib = _library()
    args = None if lib is None or torch.compiler.is_compiling() else _native_args(tensors)
    if lib is None or args is None:
        return None
    ptrs, sizes, kinds = args
    out = torch.empty(len(tensors), dtype=torch.float64)
    lib.gs_sumsq(
        len(ptrs), _array(_P, ptrs), _array(ctypes.c_int64, sizes),
        _array(ctypes.c_int8, kinds), out.data_ptr(),
    )  # fmt: skip
    if _TALLY is not None:
        _TALLY.append(("gs_sumsq", sum(t.numel() * t.element_size() for t in tensors), 0))
    return out


class NativeDeviation:
    r"""Fused :func:`deviation_step_` in one pass over fixed state buffers ``means`` (CPU).

    Calling it with gradients g_j, weights w_j and the multiplier s computes, per tensor j and
    in float64 registers,

        d = s·g_j − m_j,      returns ‖d‖² (float64 vector),      m_j ← m_j + w_j d

    (m_j rounded once to its dtype; ``w_j = 0``: m_j is neither read nor written, so NaN in
    g_j never reaches it). No power-of-two scaling is needed: every square is a normal float64.
    A call returns None, having changed nothing, when the native kernels do not apply (the
    caller runs :func:`deviation_step_`). Traffic: read g and m, write m (12 B/element in
    float32).
    """

    def __init__(self, means: list[torch.Tensor]) -> None:
        self.means = means
        args = _native_args(means)
        self._ready = args is not None and all(k != 2 for k in args[2])  # m: float32/64
        if args is not None and self._ready:
            self._ptrs = _array(_P, args[0])
            self._sizes, self._sizes_c = args[1], _array(ctypes.c_int64, args[1])
            self._bytes = sum(m.numel() * m.element_size() for m in means)

    def __call__(
        self,
        grads: list[torch.Tensor],
        weights: torch.Tensor,
        multiplier: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        lib = _library()
        if lib is None or not self._ready or torch.compiler.is_compiling():
            return None
        if not weights.is_cpu or (multiplier is not None and not multiplier.is_cpu):
            return None
        args = _native_args(grads)
        if args is None or args[1] != self._sizes:
            return None
        ptrs, _, kinds = args
        for m, k in zip(self.means, kinds, strict=True):
            if m.dtype is not _MEAN_DTYPE[k]:
                return None
        w = weights.to(torch.float64).contiguous()
        s = None if multiplier is None else multiplier.to(torch.float64).reshape(()).contiguous()
        out = torch.empty(len(ptrs), dtype=torch.float64)
        lib.gs_deviation(
            len(ptrs), self._ptrs, _array(_P, ptrs), self._sizes_c,
            _array(ctypes.c_int8, kinds), w.data_ptr(), None if s is None else s.data_ptr(),
            out.data_ptr(),
        )  # fmt: skip
        if _TALLY is not None:
            read = self._bytes + sum(g.numel() * g.element_size() for g in grads)
            _TALLY.append(("gs_deviation", read, self._bytes))
        return out


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
    native = _native_squared_norms(tensors)
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
