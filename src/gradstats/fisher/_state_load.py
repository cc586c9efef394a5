"""Loading the collector's saved statistics into a :class:`~gradstats.fisher._state.FisherState`
(files and state dicts): validate every entry first, then commit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gradstats.errors import StateError
from gradstats.fisher._state_parts import MOMENT_KEYS, OLD_NAMES, check_values, checked_tensor
from gradstats.moments import RunningMoments

__all__ = ["load_tensors"]


def load_tensors(fs: Any, tensors: Mapping[str, object], where: str = "saved state") -> None:
    """Inverse of :meth:`tensors`. Validates every entry — present (a file that names the skip
    counter ``rejected`` loads too), a real tensor of the right shape, finite, and possible:
    counts whole and ≥ 0, sums of squares, M2 and traces ≥ 0 — before changing anything.

    Raises:
        StateError: naming the entry and what is wrong with it; nothing is changed.
    """
    expected = fs.tensors()
    checked: dict[str, torch.Tensor] = {}
    for key, template in expected.items():
        kind, _, rest = key.partition("/")
        leaf = rest.rpartition("/")[2] if kind in ("trace", "mask") else rest
        found = key
        if key not in tensors and leaf in OLD_NAMES:
            found = key[: len(key) - len(leaf)] + OLD_NAMES[leaf]
        checked[key] = checked_tensor(tensors, found, tuple(template.shape), where)
    for key, value in checked.items():
        kind, _, rest = key.partition("/")
        leaf = rest.rpartition("/")[2]
        whole = kind == "counts" and rest != "draw_weight_sq"
        whole = whole or (kind in ("trace", "mask") and leaf in ("count", "skipped"))
        # only the gradient sums are signed: the rest are counts, sums of squares, M2 or
        # means of per-unit traces and squared mask values
        check_values(value, key, where, nonnegative=kind != "g_sum", whole=whole)
    units = checked[f"counts/{fs.unit_key}"]
    if bool(checked["counts/batches"] == 0) and bool(units != 0):  # sync-ok: loading
        raise StateError(f"{where}: {fs.unit_key} without any batch is impossible")
    combined: dict[str, RunningMoments] = {}
    for label in ("trace", "mask") if fs.families else ():
        fresh = RunningMoments((sum(g for _, g in fs.families),), device=fs.device)
        state = fresh.state_dict()
        parts = {
            key: [checked[f"{label}/{f}/{key}"] for f, _ in fs.families] for key in MOMENT_KEYS
        }
        for key, values in parts.items():
            name = key if key in state else OLD_NAMES[key]
            if key in ("mean", "m2"):
                state[name] = torch.cat([v.reshape(-1).to(torch.float64) for v in values])
                continue
            if any(bool(v != values[0]) for v in values[1:]):  # sync-ok: loading
                raise StateError(
                    f"{where}: {label}/*/{key} differs between the families, which is "
                    "impossible (every family counts the same units)"
                )
            state[name] = values[0]
        try:
            fresh.load_state_dict(state)
        except (ValueError, TypeError, KeyError) as error:
            raise StateError(f"{where}: {label}: {error}") from error
        combined[label] = fresh
    # everything is valid: commit
    for key, value in checked.items():
        kind, _, rest = key.partition("/")
        value = value.to(fs.device, torch.float64, copy=True)
        if kind == "counts":
            fs.counts[rest] = value
        elif kind == "g2_sum":
            fs.g2_sum[rest] = value
        elif kind == "g_sum":
            fs.g_sum[rest] = value
        elif kind == "g2_m2":
            fs.g2_m2[rest] = value
    if fs.families:
        fs.trace_all, fs.mask_all = combined["trace"], combined["mask"]
