"""Text, token rows and device of the commands that run a causal LM on a text file.

Shared by ``gradstats fisher`` and ``gradstats noise`` (same SOURCE handling, see
:mod:`gradstats.cli._fisher_source`): :func:`read_text` checks ``--text`` (a run folder
defaults to its own corpus), :func:`token_rows` cuts the token ids into ``[n, seq_len]`` rows
that fit the model, :func:`rank_device` resolves ``--device`` (a bare ``cuda`` is this rank's
GPU under ``torchrun``). Every failure is one line (:class:`~gradstats.errors.ConfigurationError`
or ``FileNotFoundError``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradstats.cli._checks import resolve_device
from gradstats.cli._fisher_source import is_run_source, max_positions
from gradstats.errors import ConfigurationError

__all__ = ["rank_device", "read_text", "token_rows"]


def rank_device(name: str) -> torch.device:
    """The checked ``--device``; a bare ``cuda`` is ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def read_text(text: Path | None, source: str) -> str | None:
    """The UTF-8 text of ``--text``; None for a run folder without ``--text`` (its corpus is
    read once the run is loaded).

    Raises:
        ConfigurationError: no ``--text`` for a source that is not a run folder, or a file
            that is not UTF-8.
        FileNotFoundError: ``--text`` names no file.
    """
    if text is None:
        if is_run_source(source):
            return None
        raise ConfigurationError(
            "--text FILE is required (only a gradstats run folder defaults to its corpus)"
        )
    if not text.is_file():
        raise FileNotFoundError(f"no text file {text}")
    try:
        return text.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigurationError(f"--text {text} is not UTF-8 text (byte {error.start})") from None


def token_rows(ids: list[int], seq_len: int, model: torch.nn.Module) -> torch.Tensor:
    """The text as [n, seq_len] token rows; checks it fills one and fits the model."""
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigurationError(f"the text has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    limit = max_positions(model)
    if limit is not None and seq_len > limit[0]:
        raise ConfigurationError(
            f"--seq-len {seq_len} exceeds the model's {limit[0]} positions "
            f"({limit[1]}); pass --seq-len {limit[0]} or less"
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
