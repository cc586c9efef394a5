"""Resuming a run: which options may change, and a checkpoint checked in full before it is used.

A resumed run keeps its configuration. Only :data:`RESUMABLE` options (where to write, how long
to run, how to show progress, the device, threads and the process-group timeout) may differ; any
*other* option the caller gave explicitly must equal the checkpoint's value, or the resume is
refused with a :class:`~gradstats.errors.ConfigurationError` naming the option and both values.
"Explicitly given" is what the caller says it is (``explicit``: the command line passes the
options typed on it, equal to the default or not); without ``explicit`` (the Python API) an
option counts as given when it differs from its default.

:func:`check_resume_state` validates everything a resume reads from the checkpoint against the
freshly built model and optimizer — step, weights (keys, shapes, dtype), optimizer state
(groups, per-parameter shapes), generator states, counters — and raises
:class:`~gradstats.errors.StateError` before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from gradstats.eqprop.train._checkpoint import check_fit
from gradstats.eqprop.train._config import TrainConfig
from gradstats.eqprop.train._controller import ContractionController, check_controller_state
from gradstats.eqprop.train._ema import ParameterEMA, check_ema_state
from gradstats.errors import ConfigurationError, StateError

__all__ = ["COUNTERS", "RESUMABLE", "check_resume_state", "merge_resume"]

#: Options a resumed run may change; every other one comes from the checkpoint.
RESUMABLE = (
    "steps", "out", "resume", "progress", "threads", "device", "precision", "timeout"
)  # fmt: skip
#: The trainer's counters (checkpoint key ``counters``).
COUNTERS = ("skipped", "consecutive", "phases", "unconverged")


def merge_resume(
    given: TrainConfig, saved: TrainConfig, explicit: Iterable[str] | None = None
) -> TrainConfig:
    """The resumed run's config: ``saved`` with the :data:`RESUMABLE` options of ``given``.

    Args:
        given: the options of this call.
        saved: the checkpoint's configuration.
        explicit: names of the options the caller gave explicitly (``None``: those that differ
            from their defaults).

    Raises:
        ConfigurationError: an explicitly given option (not resumable) differs from the run's,
            or ``explicit`` names an unknown option.
    """
    names = [f.name for f in fields(TrainConfig)]
    if explicit is None:
        defaults = TrainConfig()
        chosen = [n for n in names if getattr(given, n) != getattr(defaults, n)]
    else:
        chosen = list(explicit)
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ConfigurationError(f"explicit names unknown training option(s) {unknown}")
    chosen = [n for n in chosen if n not in RESUMABLE]
    clash = [n for n in names if n in chosen and getattr(given, n) != getattr(saved, n)]
    if clash:
        detail = ", ".join(f"{n}={getattr(given, n)!r} (run: {getattr(saved, n)!r})" for n in clash)
        raise ConfigurationError(
            f"a resumed run keeps its configuration; given options differ from the run's: "
            f"{detail}. Drop them, or start a new run with another --out"
        )
    return replace(saved, **{name: getattr(given, name) for name in RESUMABLE})


def _check_generator(name: str, value: object, device: torch.device | str = "cpu") -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        raise StateError(f"the checkpoint's rng.{name} is not a generator state (a uint8 vector)")
    try:
        torch.Generator(device=device).set_state(value)
    except (RuntimeError, ValueError, TypeError):
        raise StateError(f"the checkpoint's rng.{name} is not a valid generator state") from None


def _check_optimizer(opt: torch.optim.Optimizer, saved: object) -> None:
    if not isinstance(saved, Mapping) or not {"state", "param_groups"} <= set(saved):
        raise StateError("the checkpoint's optimizer state is not an optimizer state_dict")
    groups = saved["param_groups"]
    ours = opt.param_groups
    if not isinstance(groups, list) or len(groups) != len(ours):
        raise StateError("the checkpoint's optimizer has another number of parameter groups")
    params: dict[object, torch.Tensor] = {}
    for group, mine in zip(groups, ours, strict=True):
        ids = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            raise StateError("the checkpoint's optimizer holds another number of parameters")
        params.update(zip(ids, mine["params"], strict=True))
    state = saved["state"]
    if not isinstance(state, Mapping):
        raise StateError("the checkpoint's optimizer state is not a mapping")
    for key, entry in state.items():
        if key not in params or not isinstance(entry, Mapping):
            raise StateError(f"the checkpoint's optimizer state has an unknown entry {key!r}")
        param = params[key]
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # step counters
            if value.shape != param.shape or value.dtype != param.dtype:
                raise StateError(
                    f"the checkpoint's optimizer state {name} of parameter {key} is "
                    f"{value.dtype} {list(value.shape)}; the parameter is {param.dtype} "
                    f"{list(param.shape)}"
                )


def check_resume_state(
    state: Mapping[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    out: Path,
    *,
    controller: ContractionController | None = None,
    ema: ParameterEMA | None = None,
) -> None:
    """Raise a :class:`~gradstats.errors.StateError` unless ``state`` fits ``model``/``opt``
    (and the run's contraction ``controller`` and parameter ``ema``, when it has them).

    Nothing is loaded here; a passing check means ``load_state_dict`` and the generators'
    ``set_state`` cannot fail half-way.
    """
    step = state["step"]
    if step < 0:
        raise StateError(f"the checkpoint in {out} is at step {step}: a step is >= 0")
    weights = state["model"]
    if not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise StateError("the checkpoint's model weights are not all tensors")
    check_fit(type(model).__name__, model.state_dict(), weights)
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    wrong = [f"{k} ({t.dtype})" for k, t in weights.items() if t.dtype != expected[k]]
    if wrong:
        dtype = next(iter(expected.values()))
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise StateError(
            f"the checkpoint's weights are not in the run's dtype {dtype}: "
            f"{', '.join(wrong[:3])}{more}"
        )
    _check_optimizer(opt, state["optimizer"])
    for key, part in (("controller", controller), ("ema", ema)):
        if part is not None and key not in state:
            raise StateError(f"the checkpoint in {out} misses its {key} state")
    if controller is not None:
        check_controller_state(state["controller"])
    if ema is not None:
        check_ema_state(state["ema"], ema.params)
        if state["ema"]["decay"] != ema.decay:
            raise StateError("the checkpoint's EMA decay differs from the run's ema_decay")
    rng = state["rng"]
    device = next(model.parameters()).device
    _check_generator("data", rng["data"])
    _check_generator("noise", rng["noise"], device)
    _check_generator("torch", rng["torch"])
    counters = state["counters"]
    if not isinstance(counters, Mapping):
        raise StateError("the checkpoint's counters are not a mapping")
    bad = [
        f"{k}={v!r}"
        for k, v in counters.items()
        if k not in COUNTERS or isinstance(v, bool) or not isinstance(v, int) or v < 0
    ]
    if bad:
        raise StateError(
            f"the checkpoint's counters are not counts: {', '.join(bad)} (valid keys: "
            f"{', '.join(COUNTERS)}, each an int >= 0)"
        )
