"""Atomic writes for every file gradstats produces (CLI outputs, checkpoints, reports).

Every output file is written to a temporary file in the same folder and renamed over the target
with :func:`os.replace` (atomic on POSIX and Windows): a full disk, a permission error or an
interrupt leaves the previous file (or none) and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


def _with_path(error: OSError, path: Path) -> OSError:
    """``error`` re-stated so that its message names ``path`` (an ENOSPC from a writer often
    does not)."""
    reason = error.strerror or str(error) or type(error).__name__
    return type(error)(error.errno, f"cannot write {path}: {reason}") if error.errno else error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The temporary name keeps ``path``'s suffix (writers that look at it still work). On any
    exception — including ``KeyboardInterrupt`` — the temporary file is removed and the error
    re-raised (an ``OSError`` re-stated to name ``path``).
    """
    target = Path(path)
    if target.is_symlink():  # write the file the link points to, never replace the link
        try:
            target = target.resolve(strict=False)
        except (OSError, RuntimeError) as error:  # a loop of links
            raise OSError(errno.ELOOP, f"cannot write {path}: {error}") from error
    if target.exists() and not target.is_file():
        raise IsADirectoryError(
            f"cannot write {target}: it is not a regular file (a folder, device or FIFO)"
        )
    # a name of this process (not mkstemp's private 0600 file: the writer creates it with the
    # usual permissions)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _with_path(error, target) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
