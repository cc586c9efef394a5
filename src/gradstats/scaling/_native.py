r"""The native CPU kernels of the scaler: build and ctypes wrappers (C source in
:mod:`gradstats.scaling._native_source`).

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
from itertools import repeat
from pathlib import Path

import torch

from gradstats.scaling._native_source import SOURCE as _SOURCE

__all__ = [
    "NativeBatch", "NativeDeviation", "NativeDeviationInto", "native_batch",
    "native_kernels_available", "native_squared_norms", "native_traffic", "set_native_kernels",
]  # fmt: skip

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
        lib.gs_deviation_into.argtypes = [ctypes.c_int64, *[_P] * 10]
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
_DTYPE, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")


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
    # every check iterates in C (no Python frame per tensor): this runs at every step
    kinds = list(map(_KIND.get, map(_DTYPE, tensors)))
    if (
        None in kinds
        or not all(map(operator.is_, map(type, tensors), repeat(_Tensor)))
        or not all(map(_IS_CPU, tensors))
        or not all(map(_Tensor.is_contiguous, tensors))
    ):
        return None
    ptrs, sizes = list(map(_Tensor.data_ptr, tensors)), list(map(_Tensor.numel, tensors))
    _LAST = batch = NativeBatch(tensors, ptrs, sizes, kinds)  # type: ignore[arg-type]
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


class _MeanKernel:
    """What the kernels over fixed state buffers ``means`` share: the per-call checks of the
    gradients against them and the traffic tally."""

    means: list[torch.Tensor]
    ready: bool
    _sizes: list[int]
    _bytes: int

    def __init__(self, means: list[torch.Tensor], ready: bool, sizes: list[int]) -> None:
        self.means, self.ready, self._sizes = means, ready, sizes
        self._kinds: list[int] | None = None  # the gradient kinds last checked against m
        self._bytes = sum(m.numel() * m.element_size() for m in means)

    def _inputs(
        self,
        grads: list[torch.Tensor],
        weights: torch.Tensor,
        multiplier: torch.Tensor | None,
        fresh: bool,
    ) -> tuple[ctypes.CDLL, NativeBatch, torch.Tensor, torch.Tensor | None] | None:
        """(library, gradient batch, float64 weights, float64 multiplier) for one call, or None
        where the native kernels do not apply to these gradients."""
        lib = _library()
        if lib is None or not self.ready or torch.compiler.is_compiling():
            return None
        if not weights.is_cpu or (multiplier is not None and not multiplier.is_cpu):
            return None
        batch = native_batch(grads, fresh=fresh)
        if batch is None or batch.sizes != self._sizes:
            return None
        if batch.kinds != self._kinds:
            for m, k in zip(self.means, batch.kinds, strict=True):
                if m.dtype is not _MEAN_DTYPE[k]:
                    return None
            self._kinds = batch.kinds
        w = weights.to(torch.float64).contiguous()
        s = None if multiplier is None else multiplier.to(torch.float64).reshape(()).contiguous()
        return lib, batch, w, s

    def _tally(self, name: str, grads: list[torch.Tensor]) -> None:
        if _TALLY is not None:
            read = self._bytes + sum(g.numel() * g.element_size() for g in grads)
            _TALLY.append((name, read, self._bytes))


class NativeDeviation(_MeanKernel):
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
        batch = native_batch(means, fresh=True)
        ready = batch is not None and all(k != 2 for k in batch.kinds)  # m: float32/64
        super().__init__(means, ready, batch.sizes if batch is not None else [])
        if batch is not None:
            self._batch = batch

    def __call__(
        self,
        grads: list[torch.Tensor],
        weights: torch.Tensor,
        multiplier: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        inputs = self._inputs(grads, weights, multiplier, fresh=False)
        if inputs is None:
            return None
        lib, batch, w, s = inputs
        out = torch.empty(batch.count, dtype=torch.float64)
        lib.gs_deviation(
            batch.count, self._batch.ptr_array, batch.ptr_array, batch.size_array,
            batch.kind_array, w.data_ptr(), None if s is None else s.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        self._tally("gs_deviation", grads)
        return out


class NativeDeviationInto(_MeanKernel):
    r"""The whole temporal step of a device block in one pass, between buffer pairs (CPU).

    Built over the state's ``means``, as many ``spares`` of the same shapes and dtypes, and
    ``parity``, a bool vector (CPU, one entry per tensor) saying which buffer of pair j holds
    m_j now (False: ``means[j]``). Calling it with gradients g_j (every tensor of the block),
    weights w_j and the multiplier s computes, per tensor j and in float64 registers,

        d = s·g_j − m_j,     ‖d‖²,     ‖g_j‖² (unscaled),     other buffer of j ← m_j + w_j d

    and returns (‖g‖², ‖d‖²) as float64 vectors: the sums of ``gs_sumsq`` and
    ``gs_deviation``, bitwise, and the new means those kernels would have written. m_j is only
    read, so the caller applies the step by flipping ``parity[j]`` (a tensor op: no host
    read) and drops it by doing nothing — a non-finite or skipped step costs no rollback.
    Traffic: read g and m, write the other buffer: 12 B/element in float32 for the whole
    update (no ``squared_norms`` pass). Returns None, having changed nothing, where the native
    kernels do not apply.
    """

    def __init__(
        self, means: list[torch.Tensor], spares: list[torch.Tensor], parity: torch.Tensor
    ) -> None:
        first, second = native_batch(means, fresh=True), native_batch(spares, fresh=True)
        ready = (
            first is not None
            and second is not None
            and all(k != 2 for k in first.kinds)
            and first.sizes == second.sizes
            and first.kinds == second.kinds
            and parity.dtype is torch.bool
            and parity.is_cpu
            and parity.is_contiguous()
            and parity.numel() == first.count
        )
        super().__init__(means, ready, first.sizes if first is not None else [])
        if first is not None and second is not None:
            self._pair, self._parity = (first, second), parity

    def __call__(
        self,
        grads: list[torch.Tensor],
        weights: torch.Tensor,
        multiplier: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        inputs = self._inputs(grads, weights, multiplier, fresh=True)
        if inputs is None:
            return None
        lib, batch, w, s = inputs
        dev_sq = torch.empty(batch.count, dtype=torch.float64)
        sq = torch.empty(batch.count, dtype=torch.float64)
        first, second = self._pair
        lib.gs_deviation_into(
            batch.count, first.ptr_array, second.ptr_array, self._parity.data_ptr(),
            batch.ptr_array, batch.size_array, batch.kind_array, w.data_ptr(),
            None if s is None else s.data_ptr(), dev_sq.data_ptr(), sq.data_ptr(),
        )  # fmt: skip
        self._tally("gs_deviation_into", grads)
        return sq, dev_sq
