"""Type and number checks of the trainer's options.

(:class:`~gradstats.eqprop.train.TrainConfig` calls them in its constructor.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradstats._validation import check_positive_int
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "PRECISIONS",
    "check_feedback",
    "check_float",
    "check_jacobian_options",
    "check_types",
]

#: ``--precision``: plain float32 matmuls, or TF32 tensor-core matmuls (CUDA only).
PRECISIONS = ("float32", "tf32")

#: Options whose type the constructor checks (numbers are checked by value below).
_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "out": (Path,),
    "data": (str, type(None)),
    "attn_mode": (str,),
    "qk_norm": (bool,),
    "optimizer": (str,),
    "anchor": (str, type(None)),
    "device": (str,),
    "dtype": (str,),
    "precision": (str,),
    "jac_norm": (str,),
    "resume": (bool,),
    "progress": (bool,),
}


def check_types(config: Any) -> None:
    """Type checks of a TrainConfig's options (paths normalised: out a Path, data a str)."""
    # paths may be given as str or os.PathLike: stored as Path (out) and str (data)
    if isinstance(config.out, (str, os.PathLike)) and not isinstance(config.out, Path):
        object.__setattr__(config, "out", Path(config.out))
    if isinstance(config.data, os.PathLike):
        object.__setattr__(config, "data", os.fspath(config.data))
    for name, types in _TYPES.items():
        value = getattr(config, name)
        if not isinstance(value, types):
            valid = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise ConfigurationTypeError(f"{name} must be {valid}; got {type(value).__name__}")


def check_float(name: str, value: object, positive: bool = False) -> None:
    """``value`` a finite number >= 0 (> 0 with ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(f"{name} must be a number; got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0 or (positive and value == 0):
        raise ConfigurationError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}; got {value}"
        )


def check_jacobian_options(config: Any, defaults: Mapping[str, object]) -> None:
    """``power_iterations`` (an int >= 0) and ``jac_bound`` (a number >= 0) apply only with
    ``jac_norm='spectral'``, and none of the three while no Jacobian penalty acts
    (``jac_penalty`` 0): set otherwise they would be silently ignored."""
    check_positive_int("power_iterations", config.power_iterations, minimum=0)
    check_float("jac_bound", config.jac_bound)
    given = [
        f"{name}={getattr(config, name)!r}"
        for name in ("jac_norm", "power_iterations", "jac_bound")
        if getattr(config, name) != defaults[name]
    ]
    spectral_only = [g for g in given if not g.startswith("jac_norm=")]
    if config.jac_norm != "spectral" and spectral_only:
        raise ConfigurationError(
            f"{spectral_only[-1]} applies only with jac_norm='spectral'; "
            f"got jac_norm={config.jac_norm!r}"
        )
    if given and config.jac_penalty == 0:
        raise ConfigurationError(
            f"{', '.join(given)} set the Jacobian penalty, which is off: give --jac-penalty > 0"
        )


def check_feedback(config: Any) -> None:
    """``feedback`` γ ∈ [0, 1], set (≠ 0) only with ``attn_mode='layered'``, whose parameter it
    is, and not for the backprop baseline."""
    check_float("feedback", config.feedback)
    if config.feedback > 1:
        raise ConfigurationError(f"feedback must be in [0, 1]; got {config.feedback}")
    if config.feedback and (config.attn_mode != "layered" or config.method == "backprop"):
        raise ConfigurationError(
            f"feedback={config.feedback!r} is a parameter of the layered block: give "
            "--attn-mode layered (an equilibrium method), or leave --feedback unset"
        )
