"""Run checkpoints: one ``torch.save`` dict that ``torch.load(weights_only=True)`` reads.

Keys (format ``gradstats.eqprop.train``, version 1):

* ``format``, ``version``, ``step`` (optimizer steps done);
* ``config``: :meth:`TrainConfig.to_dict` (every option of the run);
* ``model_class`` (``"EquilibriumTransformer"`` or ``"BackpropTransformer"``), ``model_config``
  (the model's constructor arguments), ``model`` (its ``state_dict``);
* ``optimizer`` (its ``state_dict``), ``rng`` (``data``, ``noise``: generator states;
  ``torch``: the global CPU RNG state), ``counters`` (skipped steps, consecutive failed steps up to
  this one, phases, unconverged phases; a missing counter reads as 0);
* ``corpus``: ``name``, ``sha256``, ``vocab`` of the training text.
* ``world_size``: ranks of the process group that trained it (1: a single process; absent in
  older checkpoints, read as 1). Under W ranks the checkpoint is written by rank 0 only; every
  rank holds the same weights and generator states, and a resume needs the same W.

Writes are atomic (a temporary file renamed over the old one), so an interrupted or failed run
always leaves the last complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradstats.eqprop.models.baseline import BackpropTransformer
from gradstats.eqprop.models.transformer import EquilibriumTransformer

__all__ = ["FORMAT", "VERSION", "build_from_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT, VERSION = "gradstats.eqprop.train", 1
CHECKPOINT = "checkpoint.pt"
_CLASSES = {
    "EquilibriumTransformer": EquilibriumTransformer,
    "BackpropTransformer": BackpropTransformer,
}


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (plus format/version) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a run checkpoint (a file, or a run folder holding ``checkpoint.pt``).

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the file is not a readable gradstats training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say so in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gradstats training checkpoint (format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint version {state.get('version')!r}; this gradstats reads "
            f"version {VERSION}"
        )
    missing = [
        k for k in ("config", "model_class", "model_config", "model", "step") if k not in state
    ]
    if missing:
        raise ValueError(f"{path} is missing {missing}")
    return state


def build_from_checkpoint(state: dict) -> torch.nn.Module:
    """The model of a checkpoint, with its weights loaded, in the run's dtype (bitwise).

    The dtype is that of the saved floating-point weights (a float64 run stays float64), not
    torch's default dtype.
    """
    name = state["model_class"]
    if name not in _CLASSES:
        raise ValueError(f"unknown model class {name!r} in the checkpoint")
    model = _CLASSES[name](**state["model_config"])
    dtypes = {t.dtype for t in state["model"].values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the checkpoint's weights mix dtypes {sorted(map(str, dtypes))}")
    if dtypes:
        model.to(dtypes.pop())
    model.load_state_dict(state["model"])
    return model
