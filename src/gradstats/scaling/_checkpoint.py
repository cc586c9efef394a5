"""Scaler checkpoints keyed by parameter name, with version and config; loading and rebinding.

Format (``torch.save``-able, loads with ``weights_only=True``)::

    {"format": "gradstats.VarianceGradientScaler", "version": 1,
     "config": {...ScalerConfig...}, "updates": int,
     "counters": {"nonfinite": t, "consecutive": t, "skipped": t}, "factor": t[groups],
     "tensors": {name: {"shape": [...], "dtype": "float32", "count": t, <statistic state>}}}

A checkpoint of the reference implementation (``foreach=False``) loads into the fast one (its
per-coordinate variances are summed into q = Σ_i v_i + ‖m‖²); the other way is impossible and
is reported as a mismatch.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradstats._validation import check_state_header

if TYPE_CHECKING:
    from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = ["FORMAT", "VERSION", "LoadReport", "load_scaler_state", "scaler_state"]

FORMAT = "gradstats.VarianceGradientScaler"
VERSION = 1
# Settings a checkpoint may carry over with use_checkpoint_config=True (the rest shape the state).
_ADOPTABLE = (
    "alpha", "beta", "eps", "warmup_steps", "min_scale", "max_rate", "apply_to", "confidence",
    "enabled", "batch_size", "log_every", "max_nonfinite_steps",
)  # fmt: skip


@dataclass(frozen=True)
class LoadReport:
    """What a load or rebind did, by parameter name."""

    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # in the scaler but not in the checkpoint: fresh statistics
    unexpected: tuple[str, ...]  # in the checkpoint but not in the scaler: dropped
    mismatched: tuple[str, ...]  # same name, other shape or incompatible state: dropped
    config_differences: dict[str, tuple[object, object]]  # key -> (checkpoint, scaler)


def _positions(scaler: VarianceGradientScaler):
    for block, (start, stop) in enumerate(scaler.layout.blocks):
        for local in range(stop - start):
            yield block, local, start + local


def scaler_state(scaler: VarianceGradientScaler) -> dict[str, object]:
    tensors = {}
    for block, local, j in _positions(scaler):
        tensor = scaler.layout.tensors[j]
        tensors[scaler.layout.names[j]] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            **scaler._states[block].tensor_state(local),
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": scaler.config.to_dict(),
        "updates": scaler.updates,
        "counters": {
            "nonfinite": scaler._nonfinite.clone(),
            "consecutive": scaler._consecutive.clone(),
            "skipped": scaler._skipped.clone(),
        },
        "factor": scaler._previous.clone(),
        "tensors": tensors,
    }


def _converted(entry: dict, keys: tuple[str, ...]) -> dict | None:
    """The entry's state under ``keys``, converting reference -> fast; None if impossible."""
    if all(k in entry for k in keys):
        return {k: entry[k] for k in keys}
    if "sq_ema" in keys and "var" in entry and "mean" in entry:
        mean = entry["mean"]
        sq = entry["var"].double().sum() + mean.double().square().sum()
        return {"count": entry["count"], "mean": mean, "sq_ema": sq}
    return None


def load_scaler_state(
    scaler: VarianceGradientScaler,
    state_dict: dict,
    *,
    strict: bool,
    use_checkpoint_config: bool,
    quiet: bool = False,
) -> LoadReport:
    if isinstance(state_dict, dict) and "vgs_version" in state_dict:
        raise ValueError(
            f"state_dict is a checkpoint of the original scaler (vgs_version "
            f"{state_dict['vgs_version']}); convert it with "
            "gradstats.scaling.import_legacy_state_dict(state_dict, params)"
        )
    check_state_header(state_dict, FORMAT, VERSION)
    saved = state_dict["config"]
    ours = scaler.config
    if saved["statistic"] != ours.statistic:
        raise ValueError(
            f"state_dict tracks statistic={saved['statistic']!r} but this scaler tracks "
            f"statistic={ours.statistic!r}; construct it with the checkpoint's statistic"
        )
    differences = {
        k: (saved[k], v) for k, v in ours.to_dict().items() if k in saved and saved[k] != v
    }
    entries = state_dict["tensors"]
    names = scaler.layout.names
    keys = type(scaler._states[0]).state_keys(ours.foreach)
    loaded, mismatched, plan = [], [], []
    for block, local, j in _positions(scaler):
        name = names[j]
        if name not in entries:
            continue
        entry = entries[name]
        state = _converted(entry, keys)
        if list(entry["shape"]) != list(scaler.layout.tensors[j].shape) or state is None:
            mismatched.append(name)
            continue
        plan.append((block, local, state))
        loaded.append(name)
    missing = [n for n in names if n not in entries]
    unexpected = [n for n in entries if n not in names]
    if strict and (missing or unexpected or mismatched):
        raise ValueError(
            "state_dict does not match the scaler's parameters: "
            f"missing {missing}, unexpected {unexpected}, shape/state mismatch {mismatched} "
            "(load_state_dict(..., strict=False) skips them)"
        )
    if use_checkpoint_config:
        adopted = {k: saved[k] for k in _ADOPTABLE if k in saved}
        scaler.config = dataclasses.replace(ours, **adopted)
    elif "beta" in differences and not quiet:
        warnings.warn(
            f"continuing EMA statistics saved with beta={saved['beta']} under beta={ours.beta}",
            stacklevel=3,
        )
    for block, local, state in plan:
        target = scaler._states[block]
        device = target.count.device
        target.load_tensor_state(local, {k: v.to(device) for k, v in state.items()})
    home = scaler._home
    counters = state_dict["counters"]
    scaler._nonfinite = counters["nonfinite"].to(home)
    scaler._consecutive = counters["consecutive"].to(home)
    scaler._skipped = counters["skipped"].to(home)
    factor = state_dict["factor"]
    if factor.shape == scaler._previous.shape:
        scaler._previous = factor.to(home, torch.float64)
    scaler.updates = int(state_dict["updates"])
    report = LoadReport(
        tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), differences
    )
    if not strict and not quiet and (missing or unexpected or mismatched):
        warnings.warn(
            f"scaler checkpoint partially loaded: missing {missing}, unexpected {unexpected}, "
            f"mismatched {mismatched}",
            stacklevel=3,
        )
    return report
