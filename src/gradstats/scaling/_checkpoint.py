"""Scaler checkpoints keyed by parameter name, with version and config: saving and loading.

Format (``torch.save``-able, loads with ``weights_only=True``)::

    {"format": "gradstats.VarianceGradientScaler", "version": 1,
     "config": {...ScalerConfig...}, "updates": int,
     "counters": {"nonfinite": t, "consecutive": t, "skipped": t}, "factor": t[groups],
     "tensors": {name: {"shape": [...], "dtype": "float32", "count": t, <statistic state>}}}

Loading is two phases: :func:`plan_load` checks the *whole* dict (every key present, every value
possible: ``_state_checks``) and decides what to load, raising a
:class:`~gradstats.errors.StateError` before anything changes; :func:`commit_load` then writes
the plan into a :class:`~gradstats.scaling.ScalerState`. Both read and write the state's
public fields only (its ``statistics``' ``tensor_state``/``load_tensor_state``, counters,
factor, clock). A checkpoint of the reference implementation (``foreach=False``) loads
into the fast one (its per-coordinate variances are summed into ``var_sum`` = Σ_i v_i), and so
does one of the earlier fast format (``sq_ema`` = q only: Σ_i v_i = q − ‖m‖², as precise as that
format was); the other way is impossible and is reported as a mismatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch

from gradstats._validation import check_state_header
from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, StateError
from gradstats.scaling._config import ScalerConfig
from gradstats.scaling._rules import factor_bounds, make_rule
from gradstats.scaling._scaler_state import ScalerState
from gradstats.scaling._state_checks import (
    check_counters,
    check_entry,
    check_factor,
    check_progress,
    check_updates,
    need,
)
from gradstats.scaling._statistic import get_statistic

__all__ = [
    "FORMAT", "VERSION", "LoadPlan", "LoadReport", "commit_load", "load", "plan_load", "save"
]  # fmt: skip

FORMAT = "gradstats.VarianceGradientScaler"
VERSION = 1
# Settings a checkpoint may carry over with use_checkpoint_config=True (the rest shape the state).
_ADOPTABLE = (
    "alpha", "beta", "eps", "warmup_steps", "min_scale", "max_rate", "apply_to", "confidence",
    "enabled", "batch_size", "log_every", "max_nonfinite_steps", "nonfinite", "rule", "scale",
    "base_batch_size",
)  # fmt: skip


@dataclass(frozen=True)
class LoadReport:
    """What a load or rebind did, by parameter name."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # in the scaler but not in the checkpoint: fresh statistics
    unexpected: tuple[str, ...]  # in the checkpoint but not in the scaler: dropped
    mismatched: tuple[str, ...]  # same name, other shape or incompatible state: dropped
    config_differences: dict[str, tuple[object, object]]  # key -> (checkpoint, scaler)


@dataclass(frozen=True)
class LoadPlan:
    """Everything a checked checkpoint will change, ready to be written."""

    config: ScalerConfig
    tensors: tuple[tuple[int, int, dict[str, torch.Tensor]], ...]  # (block, index, state)
    counters: dict[str, torch.Tensor]
    factor: torch.Tensor | None  # None: other number of aggregates, not loaded
    progress: torch.Tensor
    overall_factor: torch.Tensor | None  # None: checkpoints written before it (start at 1)
    updates: int
    consecutive: int  # the loaded counters, on the host
    nonfinite: int
    report: LoadReport
    saved_beta: object


def _positions(state: ScalerState) -> list[tuple[int, int, int]]:
    return [
        (block, local, start + local)
        for block, (start, stop) in enumerate(state.layout.blocks)
        for local in range(stop - start)
    ]


def save(state: ScalerState, config: ScalerConfig) -> dict[str, object]:
    """The checkpoint of ``state`` (copies; later updates do not change it)."""
    tensors = {}
    for block, local, j in _positions(state):
        tensor = state.layout.tensors[j]
        tensors[state.layout.names[j]] = {
            "shape": list(state.shapes[j]),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            **state.statistics[block].tensor_state(local),
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "updates": state.updates,
        "counters": {
            "nonfinite": state.nonfinite.clone(),
            "consecutive": state.consecutive.clone(),
            "skipped": state.skipped.clone(),
        },
        "factor": state.factor.clone(),
        "progress": state.progress.clone(),
        "overall_factor": state.overall_factor.clone(),
        "tensors": tensors,
    }


def _converted(
    entry: dict[str, torch.Tensor], keys: tuple[str, ...]
) -> dict[str, torch.Tensor] | None:
    """The entry's state under ``keys``, converting reference -> fast; None if impossible."""
    if all(k in entry for k in keys):
        return {k: entry[k] for k in keys}
    if "var_sum" in keys and "mean" in entry:
        mean = entry["mean"]
        mean_sq = entry.get("mean_sq", mean.double().square().sum())
        if "var_sum" in entry:
            var_sum = entry["var_sum"]
        elif "var" in entry:  # the reference implementation's per-coordinate variances
            var_sum = entry["var"].double().sum()
        elif "sq_ema" in entry:  # earlier fast format: q = Σ_k w_k‖g_k‖², Σ_i v_i = q − ‖m‖²
            var_sum = (entry["sq_ema"].double() - mean_sq).clamp(min=0.0)
        else:
            return None
        return {"count": entry["count"], "mean": mean, "var_sum": var_sum, "mean_sq": mean_sq}
    return None


def _header(state_dict: object, ours: ScalerConfig) -> tuple[dict[str, object], dict[str, object]]:
    if isinstance(state_dict, dict) and "vgs_version" in state_dict:
        raise StateError(
            f"state_dict is a checkpoint of the original scaler (vgs_version "
            f"{state_dict['vgs_version']}); convert it with "
            "gradstats.scaling.import_legacy_state_dict(state_dict, params)"
        )
    checked = check_state_header(state_dict, FORMAT, VERSION)
    saved = need(checked, "config", "")
    if not isinstance(saved, dict):
        raise StateError(f"state_dict['config'] must be a dict; got {type(saved).__name__}")
    statistic = need(saved, "statistic", "['config']")
    if statistic != ours.statistic:
        hint = (  # checkpoints saved under the former defaults, into a default scaler
            " (statistic='temporal', rule='shrink' were the defaults before 'auto', 'adascale')"
            if statistic == "temporal"
            else ""
        )
        raise StateError(
            f"state_dict tracks statistic={statistic!r} but this scaler tracks "
            f"statistic={ours.statistic!r}; construct it with the checkpoint's statistic{hint}"
        )
    return checked, saved


def plan_load(
    state: ScalerState,
    ours: ScalerConfig,
    state_dict: object,
    *,
    strict: bool,
    use_checkpoint_config: bool,
) -> LoadPlan:
    """Check ``state_dict`` completely and decide what to load; raises before any change."""
    state_dict, saved = _header(state_dict, ours)
    updates = check_updates(need(state_dict, "updates", ""))
    counters = check_counters(need(state_dict, "counters", ""), updates)  # host int64 tensors
    factor = check_factor(need(state_dict, "factor", ""))
    progress = check_progress(state_dict.get("progress"), updates, counters["skipped"])
    overall = state_dict.get("overall_factor")
    overall = None if overall is None else check_factor(overall, "overall_factor")
    entries = need(state_dict, "tensors", "")
    if not isinstance(entries, dict):
        raise StateError(f"state_dict['tensors'] must be a dict; got {type(entries).__name__}")
    checked = {name: check_entry(str(name), entry) for name, entry in entries.items()}
    differences = {
        k: (saved[k], v) for k, v in ours.to_dict().items() if k in saved and saved[k] != v
    }
    config = ours
    if use_checkpoint_config:
        adopted: dict[str, Any] = {k: saved[k] for k in _ADOPTABLE if k in saved}
        try:
            config = dataclasses.replace(ours, **adopted)
        except (ConfigurationError, TypeError) as error:
            raise StateError(
                f"state_dict['config'] is not a valid configuration: {error}"
            ) from error
    bounds = factor_bounds(make_rule(config))
    if bounds is not None and not bool(  # sync-ok: loading a checkpoint
        ((factor >= bounds[0]) & (factor <= bounds[1])).all()
    ):
        raise StateError(
            f"state_dict['factor'] holds factors outside [{bounds[0]}, {bounds[1]}], the range "
            f"of rule={config.rule!r}: it was saved under another rule (construct the scaler "
            "with the checkpoint's rule, or pass use_checkpoint_config=True)"
        )
    names = state.layout.names
    keys = get_statistic(ours.statistic).state_keys(ours.foreach)
    loaded, mismatched, plan = [], [], []
    for block, local, j in _positions(state):
        name = names[j]
        if name not in checked:
            continue
        shape, entry = checked[name]
        converted = _converted(entry, keys)
        if shape != state.shapes[j] or converted is None:
            mismatched.append(name)
            continue
        device = state.layout.devices[block]
        plan.append((block, local, {k: v.to(device) for k, v in converted.items()}))
        loaded.append(name)
    missing = [n for n in names if n not in checked]
    unexpected = [str(n) for n in checked if n not in names]
    if strict and (missing or unexpected or mismatched):
        raise StateError(
            "state_dict does not match the scaler's parameters: "
            f"missing {missing}, unexpected {unexpected}, shape/state mismatch {mismatched} "
            "(load_state_dict(..., strict=False) skips them)"
        )
    report = LoadReport(
        tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), differences
    )
    home = state.home
    return LoadPlan(
        config=config,
        tensors=tuple(plan),
        counters={k: v.to(home) for k, v in counters.items()},
        factor=factor.to(home, torch.float64) if factor.shape == state.factor.shape else None,
        progress=progress.to(home),
        overall_factor=None
        if overall is None or overall.shape != (1,)
        else overall.to(home, torch.float64),
        updates=updates,
        consecutive=int(counters["consecutive"]),  # sync-ok: host tensors (check_counters)
        nonfinite=int(counters["nonfinite"]),  # sync-ok: host tensors
        report=report,
        saved_beta=saved.get("beta"),
    )


def commit_load(state: ScalerState, plan: LoadPlan) -> ScalerState:
    """The state with a checked plan written into it (nothing here can fail on a valid plan).
    In place: ``state``'s statistic buffers receive the loaded values and become the result's."""
    for statistic in state.statistics:
        statistic.beta = plan.config.beta
    for block, local, tensors in plan.tensors:
        state.statistics[block].load_tensor_state(local, tensors)
    return replace(
        state,
        nonfinite=plan.counters["nonfinite"],
        consecutive=plan.counters["consecutive"],
        skipped=plan.counters["skipped"],
        factor=state.factor if plan.factor is None else plan.factor,
        progress=plan.progress,
        overall_factor=state.overall_factor if plan.overall_factor is None else plan.overall_factor,
        updates=plan.updates,
    )


def load(
    state: ScalerState,
    config: ScalerConfig,
    state_dict: object,
    strict: bool,
    use_checkpoint_config: bool,
    quiet: bool,
) -> tuple[ScalerState, LoadPlan]:
    """Check, then write ``state_dict`` into ``state`` (in place, :func:`commit_load`); warn
    about what did not carry over. Returns the loaded state and the plan (its ``config`` is the
    scaler's configuration from now on)."""
    plan = plan_load(
        state, config, state_dict, strict=strict, use_checkpoint_config=use_checkpoint_config
    )
    loaded = commit_load(state, plan)
    report = plan.report
    if quiet:
        return loaded, plan
    if "beta" in report.config_differences and not use_checkpoint_config:
        warn(
            f"continuing EMA statistics saved with beta={plan.saved_beta} under beta={config.beta}"
        )
    if not strict and (report.missing or report.unexpected or report.mismatched):
        warn(
            f"scaler checkpoint partially loaded: missing {list(report.missing)}, "
            f"unexpected {list(report.unexpected)}, mismatched {list(report.mismatched)}"
        )
    return loaded, plan
