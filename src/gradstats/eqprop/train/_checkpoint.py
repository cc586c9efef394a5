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
* ``controller`` (runs with ``contraction_target``): the contraction controller's state
  (``_controller``); ``ema`` (runs with ``ema_decay``): the parameter EMA's raw buffer and
  count (``_ema``). Both are absent otherwise (and in older checkpoints: controller off, no EMA).

:data:`REQUIRED` keys are needed to rebuild the model; a resume also needs :data:`RESUME_KEYS`
(dotted names reach into nested dicts). A file that misses any of the keys asked for raises a
:class:`~gradstats.errors.StateError` naming them, before anything is built.

Writes are atomic (a temporary file renamed over the old one; the temporary file is removed when
the write fails, e.g. on a full disk), so an interrupted or failed run always leaves the last
complete checkpoint and nothing else.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gradstats._validation import check_choice
from gradstats.eqprop.models.baseline import BackpropTransformer
from gradstats.eqprop.models.transformer import EquilibriumTransformer
from gradstats.eqprop.train._ema import ema_weights
from gradstats.errors import StateError

__all__ = [
    "FORMAT",
    "REQUIRED",
    "RESUME_KEYS",
    "VERSION",
    "build_from_checkpoint",
    "check_fit",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT, VERSION = "gradstats.eqprop.train", 1
CHECKPOINT = "checkpoint.pt"
REQUIRED = ("config", "model_class", "model_config", "model", "step")
RESUME_KEYS = ("optimizer", "rng.data", "rng.noise", "rng.torch", "counters", "corpus.sha256")
_CLASSES: dict[str, type[torch.nn.Module]] = {
    "EquilibriumTransformer": EquilibriumTransformer,
    "BackpropTransformer": BackpropTransformer,
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "model_class": str,
    "model_config": dict,
    "model": dict,
    "step": int,
}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format/version) atomically to ``path``.

    The bytes go through a Python file handle, so a full disk raises ``OSError`` (``ENOSPC``)
    naming ``path`` rather than torch's ``RuntimeError`` from its zip writer; the temporary file
    is removed on any failure.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, handle)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        reason = error.strerror or str(error) or type(error).__name__
        raise type(error)(error.errno, f"cannot write the checkpoint {path}: {reason}") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _lookup(state: dict[str, Any], dotted: str) -> bool:
    node: object = state
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _what(path: Path) -> str:
    """What a file that torch cannot read looks like, from its first bytes."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head:
        return "an empty file"
    if head == b"PK\x03\x04":
        return "a damaged or truncated torch file, or one holding objects other than tensors"
    if head[:1] == b"\x80":
        return "a pickle of objects other than tensors"
    return "not a torch file"


def load_checkpoint(path: str | Path, *, require: Iterable[str] = ()) -> dict[str, Any]:
    """Read a run checkpoint (a file, or a run folder holding ``checkpoint.pt``).

    Args:
        path: the checkpoint file or its run folder.
        require: keys needed beyond :data:`REQUIRED` (dotted for nested keys, e.g.
            :data:`RESUME_KEYS` for a resume).

    Raises:
        FileNotFoundError: no checkpoint there.
        StateError: the file is not a gradstats training checkpoint (not a torch file, a
            truncated one, foreign objects, another format or version), misses keys (named), or
            holds keys of the wrong type or a negative step.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, ImportError, UnicodeDecodeError):  # fmt: skip
        # a text file, a truncated file or a pickle of arbitrary objects; torch's own message
        # ("re-run with weights_only=False") is the wrong advice for a file that is not ours
        raise StateError(
            f"{path} is not a readable checkpoint: not a gradstats checkpoint ({_what(path)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"{path} is not a gradstats training checkpoint (format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise StateError(
            f"{path} has checkpoint version {state.get('version')!r}; this gradstats reads "
            f"version {VERSION}"
        )
    missing = [k for k in (*REQUIRED, *require) if not _lookup(state, k)]
    if missing:
        raise StateError(f"{path} is an incomplete checkpoint: it misses {', '.join(missing)}")
    wrong = [
        f"{k} ({type(state[k]).__name__}, not {getattr(t, '__name__', t)})"
        for k, t in _TYPES.items()
        if not isinstance(state[k], t) or (k == "step" and isinstance(state[k], bool))
    ]
    if wrong:
        raise StateError(f"{path} holds keys of the wrong type: {', '.join(wrong)}")
    if state["step"] < 0:
        raise StateError(f"{path} is at step {state['step']}: a checkpoint's step is >= 0")
    return state


def check_fit(name: str, expected: dict[str, torch.Tensor], weights: dict[str, Any]) -> None:
    """Raise a StateError (one line) unless ``weights`` has exactly the model's keys and shapes."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {list(weights[k].shape)} (model: {list(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise StateError(f"the checkpoint's weights do not fit its {name}: {'; '.join(problems)}")


def build_from_checkpoint(state: dict[str, Any], *, weights: str = "ema") -> torch.nn.Module:
    """The model of a checkpoint, with its weights loaded, in the run's dtype (bitwise).

    The dtype is that of the saved floating-point weights (a float64 run stays float64), not
    torch's default dtype. ``weights="ema"`` (the default): a run trained with ``ema_decay``
    gets its debiased parameter EMA θ_ema (what probing, sampling and Fisher evaluate); a run
    without one its trained weights. ``weights="raw"``: always the trained weights.

    Raises:
        StateError: an unknown model class, constructor arguments the class does not take,
            mixed dtypes, a dtype other than float32/float64, or weights that do not fit the
            model (missing, unexpected or wrongly shaped tensors). Nothing is returned half-loaded.
    """
    name = state["model_class"]
    if name not in _CLASSES:
        known = ", ".join(sorted(_CLASSES))
        raise StateError(f"unknown model class {name!r} in the checkpoint (known: {known})")
    try:
        model = _CLASSES[name](**state["model_config"])
    except (TypeError, ValueError) as error:
        raise StateError(
            f"the checkpoint's model_config does not build a {name}: {error}"
        ) from None
    check_choice("weights", weights, ("ema", "raw"))
    saved = state["model"]
    if not all(isinstance(t, torch.Tensor) for t in saved.values()):
        raise StateError("the checkpoint's model weights are not all tensors")
    dtypes = {t.dtype for t in saved.values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise StateError(f"the checkpoint's weights mix dtypes {sorted(map(str, dtypes))}")
    if dtypes - {torch.float32, torch.float64}:
        raise StateError(
            f"the checkpoint's weights are {dtypes.pop()}: a run trains in float32 or float64"
        )
    if dtypes:
        model.to(dtypes.pop())
    check_fit(name, model.state_dict(), saved)
    model.load_state_dict(saved)
    averaged = ema_weights(state) if weights == "ema" else None
    if averaged is not None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(averaged) != set(params) or any(
            t.shape != params[k].shape for k, t in averaged.items()
        ):
            raise StateError("the checkpoint's EMA weights do not fit its model")
        model.load_state_dict(averaged, strict=False)
    return model
