r"""A steady CPU heap for timings: glibc's ``malloc`` with neither trimming nor ``mmap``.

Why. By default glibc serves a large block (above a dynamic threshold of 128 KiB–32 MiB) by a
fresh ``mmap`` and hands free memory at the top of the heap back to the kernel (``trim``). The
next call of the same computation then touches new pages: thousands of page faults per call
(measured, GPT-2 4×128 at 8×128 tokens, one thread: a plain forward + backward takes 0–8,000
minor faults per call, about 32 MiB, on most calls, while an equal-cost candidate whose heap
happens to keep its blocks takes none). Which candidate pays them depends on the heap layout the
previous calls left, not on the work, and faults cost CPU time in the kernel (counted by
``thread_time``): the ratio of two candidates moves by several per cent either way. PyTorch's CPU
tuning guides swap in jemalloc or tcmalloc for the same reason.

What. :func:`steady_allocator` sets ``M_MMAP_MAX = 0`` (no ``mmap`` for any block: everything
comes from the heap) and ``M_TRIM_THRESHOLD = INT_MAX`` (the heap is never shrunk) by
``mallopt``, for the rest of the process: after a warm-up each call reuses the pages of the
previous ones and takes no page faults, so the timings measure the work. The process keeps its
peak heap until it exits (a dedicated benchmark process). ``gradstats bench`` does this by
default (``--allocator stock`` keeps glibc's defaults); the record's environment says which.
On other C libraries (musl, macOS, Windows) nothing is changed and the mode reads ``"stock"``.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["ALLOCATORS", "allocator_mode", "steady_allocator"]

ALLOCATORS = ("steady", "stock")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_MODE = {"mode": "stock", "detail": "the C library's defaults"}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def steady_allocator() -> dict[str, str]:
    """Make glibc's heap steady for the rest of the process (see the module docstring) and
    return :func:`allocator_mode`; elsewhere, change nothing and say why."""
    global _MODE
    libc = _glibc()
    if libc is None:
        _MODE = {"mode": "stock", "detail": f"not glibc ({platform.system()}): unchanged"}
        return allocator_mode()
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        _MODE = {"mode": "stock", "detail": "glibc refused mallopt: unchanged"}
        return allocator_mode()
    _MODE = {"mode": "steady", "detail": "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX"}
    return allocator_mode()


def allocator_mode() -> dict[str, str]:
    """``{"mode": "steady" | "stock", "detail": ...}``: the heap this process times with."""
    return dict(_MODE)
