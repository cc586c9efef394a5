r"""The native CPU kernels of the scaler: C source, build, and the ctypes wrappers.

See :mod:`gradstats.scaling._kernels` for what the kernels compute and when they run. The
wrappers are cheap per step: a gradient list is validated once per step (dtype, contiguity,
device, sizes) into a :class:`NativeBatch` — its pointer/size/kind arrays as ``array.array``
buffers, built in C rather than element by element through ``ctypes`` — that the
``squared_norms`` pass and :class:`NativeDeviation` of the same step share (the batch is
reused only for the very same tensor objects, held by weak references, at the same data
pointers; anything else is validated afresh).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "NativeBatch", "NativeDeviation", "native_batch", "native_kernels_available",
    "native_squared_norms", "native_traffic", "set_native_kernels",
]  # fmt: skip

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


# array.array typecodes of the C argument types: void *, int64_t, int8_t
_PTR_CODE = next(c for c in "QLI" if array.array(c).itemsize == ctypes.sizeof(ctypes.c_void_p))
_I64_CODE = next(c for c in "qlL" if array.array(c).itemsize == 8)
_Tensor = torch.Tensor


def _address(buffer: array.array[int]) -> int:
    return buffer.buffer_info()[0]


class NativeBatch:
    """A validated list of plain contiguous CPU tensors of a supported dtype, with the
    pointer/size/kind arrays the C kernels take (built once; shared by the kernels of a step)."""

    __slots__ = ("_arrays", "_refs", "count", "kinds", "ptrs", "sizes")
    _arrays: tuple[array.array[int], array.array[int], array.array[int]]

    def __init__(
        self, tensors: list[torch.Tensor], ptrs: list[int], sizes: list[int], kinds: list[int]
    ) -> None:
        self._refs = list(map(weakref.ref, tensors))  # never keeps a gradient alive
        self.count, self.ptrs, self.sizes, self.kinds = len(ptrs), ptrs, sizes, kinds
        previous = _LAST
        if previous is not None and previous.sizes == sizes and previous.kinds == kinds:
            _, sizes_c, kinds_c = previous._arrays
        else:
            sizes_c, kinds_c = array.array(_I64_CODE, sizes), array.array("b", kinds)
        self._arrays = (array.array(_PTR_CODE, ptrs), sizes_c, kinds_c)

    @property
    def ptr_array(self) -> int:
        """Address of the ``void *[count]`` array of data pointers (alive with the batch)."""
        return _address(self._arrays[0])

    @property
    def size_array(self) -> int:
        return _address(self._arrays[1])

    @property
    def kind_array(self) -> int:
        return _address(self._arrays[2])

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` are the very objects of this batch, at the same data pointers."""
        return (
            len(tensors) == self.count
            and all(map(operator.is_, tensors, [r() for r in self._refs]))
            and [t.data_ptr() for t in tensors] == self.ptrs
        )


_LAST: NativeBatch | None = None  # the batch of the latest validation


def native_batch(tensors: list[torch.Tensor], *, fresh: bool = False) -> NativeBatch | None:
    """The :class:`NativeBatch` of ``tensors`` (None where any is not a plain contiguous CPU
    tensor of a supported dtype). The latest batch is reused when it holds the same tensor
    objects at the same data pointers, unless ``fresh`` (validate again)."""
    global _LAST
    last = _LAST
    if not fresh and last is not None and last.holds(tensors):
        return last
    ptrs, sizes, kinds = [], [], []
    for t in tensors:
        kind = _KIND.get(t.dtype)
        if kind is None or type(t) is not _Tensor or not t.is_cpu or not t.is_contiguous():
            return None
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
        kinds.append(kind)
    _LAST = batch = NativeBatch(tensors, ptrs, sizes, kinds)
    return batch


def native_squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """‖t_j‖² of every tensor by the native kernel (see ``squared_norms``), or None where it
    does not apply. Validates ``tensors`` (once per step: the engine calls this first) and
    leaves the batch for :class:`NativeDeviation` to reuse."""
    lib = _library()
    if lib is None or torch.compiler.is_compiling():
        return None
    batch = native_batch(tensors, fresh=True)
    if batch is None:
        return None
    out = torch.empty(batch.count, dtype=torch.float64)
    lib.gs_sumsq(batch.count, batch.ptr_array, batch.size_array, batch.kind_array, out.data_ptr())
    if _TALLY is not None:
        _TALLY.append(("gs_sumsq", sum(t.numel() * t.element_size() for t in tensors), 0))
    return out


class NativeDeviation:
    r"""Fused :func:`~gradstats.scaling._kernels.deviation_step_` in one pass over fixed state
    buffers ``means`` (CPU).

    Calling it with gradients g_j, weights w_j and the multiplier s computes, per tensor j and
    in float64 registers,

        d = s·g_j − m_j,      returns ‖d‖² (float64 vector),      m_j ← m_j + w_j d

    (m_j rounded once to its dtype; ``w_j = 0``: m_j is neither read nor written, so NaN in
    g_j never reaches it). No power-of-two scaling is needed: every square is a normal float64.
    A call returns None, having changed nothing, when the native kernels do not apply (the
    caller runs ``deviation_step_``). Traffic: read g and m, write m (12 B/element in
    float32). The gradients' batch validated by this step's ``squared_norms`` is reused.
    """

    def __init__(self, means: list[torch.Tensor]) -> None:
        self.means = means
        batch = native_batch(means, fresh=True)
        self._ready = batch is not None and all(k != 2 for k in batch.kinds)  # m: float32/64
        self._kinds: list[int] | None = None  # the gradient kinds last checked against m
        if batch is not None and self._ready:
            self._batch, self._sizes = batch, batch.sizes
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
        batch = native_batch(grads)
        if batch is None or batch.sizes != self._sizes:
            return None
        if batch.kinds != self._kinds:
            for m, k in zip(self.means, batch.kinds, strict=True):
                if m.dtype is not _MEAN_DTYPE[k]:
                    return None
            self._kinds = batch.kinds
        w = weights.to(torch.float64).contiguous()
        s = None if multiplier is None else multiplier.to(torch.float64).reshape(()).contiguous()
        out = torch.empty(batch.count, dtype=torch.float64)
        lib.gs_deviation(
            batch.count, self._batch.ptr_array, batch.ptr_array, batch.size_array,
            batch.kind_array, w.data_ptr(), None if s is None else s.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        if _TALLY is not None:
            read = self._bytes + sum(g.numel() * g.element_size() for g in grads)
            _TALLY.append(("gs_deviation", read, self._bytes))
        return out
