"""Checks every subcommand makes before any compute: its output folder and its device.

* :func:`check_out_dir` — ``--out`` must be a folder (or not exist yet) that this process can
  write in: not a file, not under a file, not in a read-only or permission-denied place. It
  creates nothing; it proves writability by creating and removing one empty temporary file in
  the folder, or in its nearest existing ancestor when the folder does not exist yet.
* :func:`resolve_device` — ``--device`` must name a device that holds data and exists here:
  ``meta`` is refused, ``cuda`` needs a CUDA device (``cuda:K`` needs K+1 of them), and any
  other type must accept a tensor.

Both raise :class:`~gradstats.errors.ConfigurationError` (a ``ValueError``), which the CLI
prints as one line with exit status 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from gradstats.errors import ConfigurationError

__all__ = ["check_out_dir", "resolve_device"]


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists (or is a link), else its closest existing ancestor."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")  # pragma: no cover - a relative path's parents end at "."


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Return ``path`` if it is a folder, or can become one, that this process can write in.

    Raises:
        ConfigurationError: ``path`` is a file, lies under a file, or its folder (or nearest
            existing ancestor) cannot be written in; the message names ``flag`` and the path.
    """
    out = Path(path)
    where = _nearest_existing(out)
    if not where.is_dir():
        if where == out:
            raise ConfigurationError(f"{flag} {out} is a file, not a folder")
        raise ConfigurationError(f"{flag} {out}: {where} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".gradstats-write-check-", dir=where)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        inside = "" if where == out else f" (its nearest existing folder {where})"
        raise ConfigurationError(f"{flag} {out}: cannot write in{inside}: {reason}") from None
    os.close(handle)
    os.unlink(probe)
    return out


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """The :class:`torch.device` ``name`` names, if it can hold this command's tensors here.

    Raises:
        ConfigurationError: ``name`` is not a torch device, is ``meta`` (no data), or is a CUDA
            (or other) device this machine does not have.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigurationError(
            f"{flag} {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if device.type == "meta":
        raise ConfigurationError(
            f"{flag} meta: a meta tensor holds no data, so nothing can be computed; use cpu or cuda"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"{flag} {name}: no CUDA device is available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigurationError(
                f"{flag} {name}: this machine has {count} CUDA device(s) (cuda:0 to "
                f"cuda:{count - 1})"
            )
        return device
    if device.type == "cpu":
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigurationError(f"{flag} {name}: device not available ({reason})") from None
    return device
