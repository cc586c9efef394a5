r"""Import checkpoints of the original scaler (``vgs_version`` "1.0" … "3.2").

The original saved zero-initialised EMAs, not debiased, with ``step_count`` updates
(w_k ∝ (1 − β)β^(t−k)), as positional lists over its parameter list:

==========  ===============================================  ===========================
version     saved statistics                                 converts to
==========  ===============================================  ===========================
1.x, 2.x    ``grad_mean_ema`` = EMA of mean|g| and           nothing: one spread over the
            ``grad_var_ema`` = EMA of Var(g), both over all  whole model, no per-tensor
            parameters concatenated                          or per-coordinate history
3.0         ``param_grad_mean_ema[i]`` = EMA of μ_i and      ``tensor_mean`` (exact:
            ``param_grad_sq_ema[i]`` = EMA of μ_i²           Var_w(μ) = E_w μ² − (E_w μ)²)
            (μ_i = mean of tensor i's gradient)
3.1, 3.2    ``param_grad_mean_ema[i]`` = EMA of μ_i and      ``mixed`` (its value
            ``param_grad_sq_ema[i]`` = EMA of mean(g_i²);    E_w mean(g²) − (E_w μ)²; the split
            3.2 may add ``param_step_counts``                into spatial and tensor-mean
                                                             parts is unknown and is
                                                             attributed to the spatial part)
==========  ===============================================  ===========================

``temporal`` and ``same_point`` need per-coordinate or per-micro-batch history that no original
checkpoint holds: their statistics start fresh, and the import report says so. The settings
``alpha``, ``beta``, ``warmup_steps`` and ``enabled`` carry over (``eps`` does not: the original
divided by it, gradstats never does). The imported scaler keeps the original's
``rule="shrink"`` and, unless told otherwise, ``statistic="temporal"`` (not the library's
defaults, ``"auto"`` and ``"adascale"``). ``step_count`` is taken as the number of EMA updates (the
original's ``get_normalized_variance`` debiased with step_count + 1, an off-by-one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradstats.errors import StateError
from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = ["LegacyImport", "import_legacy_state_dict"]

_VERSIONS = ("1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "3.2")
_CONVERTS = {"3.0": "tensor_mean", "3.1": "mixed", "3.2": "mixed"}


@dataclass(frozen=True)
class LegacyImport:
    """What the import kept and what it dropped, in words."""

    version: str
    converted: tuple[str, ...]  # parameter names whose statistics were converted
    dropped: dict[str, str]  # legacy key -> why it was not converted
    settings: dict[str, object]  # settings carried over

    def __str__(self) -> str:
        lines = [f"original scaler checkpoint, vgs_version {self.version}"]
        lines.append(f"  carried over: {self.settings}")
        if self.converted:
            lines.append(f"  converted statistics of {len(self.converted)} tensors")
        lines.extend(f"  dropped {key}: {why}" for key, why in self.dropped.items())
        return "\n".join(lines)


def _version(legacy: object) -> str:
    if not isinstance(legacy, dict) or "vgs_version" not in legacy:
        raise StateError("legacy must be a state dict of the original scaler (with 'vgs_version')")
    version = str(legacy["vgs_version"])
    if version not in _VERSIONS:
        raise StateError(f"vgs_version must be one of {', '.join(_VERSIONS)}; got {version!r}")
    return version


def import_legacy_state_dict(
    legacy: dict,
    params: object,
    *,
    statistic: str = "temporal",
    **scaler_kwargs: object,
) -> tuple[VarianceGradientScaler, LegacyImport]:
    """Build a :class:`VarianceGradientScaler` from an original checkpoint.

    Args:
        legacy: the original ``state_dict()`` (``vgs_version`` "1.0" … "3.2").
        params: the parameters in the original's order (its lists are positional), ideally
            ``model.named_parameters()`` so the new checkpoints are keyed by name.
        statistic: the statistic of the new scaler. ``"tensor_mean"`` (from 3.0) or ``"mixed"``
            (from 3.1/3.2) continue the original's statistic; the default ``"temporal"``
            measures gradient noise and starts fresh.
        scaler_kwargs: further :class:`VarianceGradientScaler` arguments; they win over the
            checkpoint's settings. The scaler keeps the original's ``rule="shrink"`` (and its
            ``alpha``) unless ``rule=`` is given here.

    Returns:
        The scaler and a :class:`LegacyImport` report (``print`` it).
    """
    version = _version(legacy)
    settings = {k: legacy[k] for k in ("alpha", "beta", "warmup_steps", "enabled") if k in legacy}
    dropped: dict[str, str] = {}
    if "eps" in legacy:
        dropped["eps"] = "the original divided by eps; gradstats reports 'no signal' instead"
    options = {"rule": "shrink", **settings, **scaler_kwargs}  # the original's rule
    scaler = VarianceGradientScaler(params, statistic=statistic, **options)
    mean_key, sq_key = "param_grad_mean_ema", "param_grad_sq_ema"
    converted: tuple[str, ...] = ()
    if version.startswith(("1.", "2.")):
        for key in ("grad_mean_ema", "grad_var_ema"):
            if key in legacy:
                dropped[key] = "a spread over all parameters at once: no per-tensor noise history"
    elif _CONVERTS[version] != statistic:
        for key in (mean_key, sq_key):
            dropped[key] = (
                f"vgs {version} tracked what gradstats calls '{_CONVERTS[version]}'; it cannot "
                f"seed statistic={statistic!r} (construct with statistic='{_CONVERTS[version]}' "
                "to continue it)"
            )
    else:
        converted = _convert(legacy, scaler, version, mean_key, sq_key)
    return scaler, LegacyImport(version, converted, dropped, settings)


def _convert(
    legacy: dict, scaler: VarianceGradientScaler, version: str, mean_key: str, sq_key: str
):
    names = scaler.layout.names
    means, squares = legacy[mean_key], legacy[sq_key]
    if len(means) != len(names) or len(squares) != len(names):
        raise StateError(
            f"the checkpoint has statistics for {len(means)} parameters but params has "
            f"{len(names)} tensors requiring gradients; pass the original's parameter list"
        )
    steps = int(legacy.get("step_count", 0))
    counts = legacy.get("param_step_counts", [steps] * len(names))
    beta = scaler.config.beta
    state = scaler.state_dict()
    tensors = state["tensors"]
    assert isinstance(tensors, dict)  # state_dict() builds it
    for name, mean, square, count in zip(names, means, squares, counts, strict=True):
        count = int(count)
        debias = 1.0 - beta**count if count > 0 else 1.0
        mu = float(mean) / debias
        second = float(square) / debias
        spread = max(second - mu * mu, 0.0)
        entry = tensors[name]
        entry["count"] = torch.tensor(count, dtype=torch.int64)
        entry["mu_mean"] = torch.tensor(mu, dtype=torch.float64)
        if version == "3.0":  # second = E_w μ²: all of it is the tensor-mean variance
            entry["mu_var"] = torch.tensor(spread, dtype=torch.float64)
            entry["spatial"] = torch.tensor(0.0, dtype=torch.float64)
        else:  # second = E_w mean(g²): mixed value, attributed to the spatial part
            entry["mu_var"] = torch.tensor(0.0, dtype=torch.float64)
            entry["spatial"] = torch.tensor(spread, dtype=torch.float64)
    state["updates"] = steps
    scaler.load_state_dict(state)
    return names
