r"""What a collector estimates: the choices of its options, the estimands, the parameter
fingerprint, and the validation of a specification read back from a file.

Nothing here imports the collector, so every other module of the pillar (reads, files, passes)
can use it without an import cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from gradstats.errors import NONFINITE_POLICIES, StateError
from gradstats.fisher._likelihood_base import REDUCTIONS

__all__ = [
    "ESTIMANDS",
    "KINDS",
    "MODES",
    "UNITS",
    "SavedSpec",
    "check_spec",
    "fingerprint",
]

KINDS = ("empirical", "mc", "exact", "batch_grad_sq")
UNITS = ("sample", "token")
MODES = ("cumulative", "ema")
BUILTIN_LIKELIHOODS = ("classification", "regression", "causal_lm")

ESTIMANDS = {
    "empirical": "EF_jj = (1/N) Σ_i g_ij² at the data labels",
    "mc": "F_jj ≈ (1/N) Σ_i (1/K) Σ_k g_ikj², labels y_ik ~ p_θ(·|x_i)",
    "exact": "F_jj = (1/N) Σ_i diag(J_iᵀ Λ_i J_i)_j (expectation over labels in closed form)",
    "batch_grad_sq": "(1/#batches) Σ_B (ḡ_B)_j²: mistaken, E = μ² + σ²/m, not the Fisher",
}


def fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A short hash of the collected parameters' names and shapes.

    >>> fingerprint({"weight": (2, 3)}) == fingerprint({"weight": (2, 3)})
    True
    """
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SavedSpec:
    """The validated specification of a saved collector (what :func:`check_spec` returns)."""

    kind: str
    unit: str
    mc_samples: int
    seed: int
    beta: float
    signal: bool
    element_se: bool
    nonfinite: str
    fingerprint: str
    likelihood_config: dict[str, object]


def _field(spec: Mapping[str, object], key: str, where: str) -> object:
    if key not in spec:
        raise StateError(f"{where}: the spec lacks {key!r}")
    return spec[key]


def _choice(spec: Mapping[str, object], key: str, choices: tuple[str, ...], where: str) -> str:
    value = _field(spec, key, where)
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise StateError(f"{where}: spec {key!r} must be one of {valid}; got {value!r}")
    return value


def _flag(spec: Mapping[str, object], key: str, where: str) -> bool:
    value = _field(spec, key, where)
    if not isinstance(value, bool):
        raise StateError(f"{where}: spec {key!r} must be true or false; got {value!r}")
    return value


def _integer(spec: Mapping[str, object], key: str, minimum: int | None, where: str) -> int:
    value = _field(spec, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where}: spec {key!r} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise StateError(f"{where}: spec {key!r} must be >= {minimum}; got {value}")
    return value


def check_spec(spec: object, where: str) -> SavedSpec:
    """Validate a specification read from a file (every field a live collector could have).

    Raises:
        StateError: naming the field and its valid values (``where`` names the file).
    """
    if not isinstance(spec, Mapping):
        raise StateError(f"{where}: the spec must be a JSON object; got {type(spec).__name__}")
    kind = _choice(spec, "kind", KINDS, where)
    unit = _choice(spec, "unit", UNITS, where)
    mode = _choice(spec, "mode", MODES, where)
    if mode != "cumulative":
        raise StateError(f"{where}: only mode='cumulative' collectors are saved; got {mode!r}")
    mc_samples = _integer(spec, "mc_samples", 1, where)
    if mc_samples != 1 and kind != "mc":
        raise StateError(f"{where}: mc_samples={mc_samples} with kind={kind!r} (mc only)")
    seed = _integer(spec, "seed", None, where)
    beta = _field(spec, "beta", where)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise StateError(f"{where}: spec 'beta' must be a number in (0, 1); got {beta!r}")
    signal = _flag(spec, "signal", where)
    if signal and kind not in ("empirical", "mc"):
        raise StateError(f"{where}: signal=true is impossible with kind={kind!r}")
    element_se = _flag(spec, "element_se", where)
    if element_se and kind != "empirical":
        raise StateError(f"{where}: element_se=true is impossible with kind={kind!r}")
    print_ = _field(spec, "fingerprint", where)
    if not isinstance(print_, str):
        raise StateError(f"{where}: spec 'fingerprint' must be a string")
    nonfinite = spec.get("nonfinite", "skip")
    if nonfinite not in NONFINITE_POLICIES:
        valid = ", ".join(repr(p) for p in NONFINITE_POLICIES)
        raise StateError(f"{where}: spec 'nonfinite' must be one of {valid}; got {nonfinite!r}")
    config = _field(spec, "likelihood_config", where)
    if not isinstance(config, Mapping) or not isinstance(config.get("likelihood"), str):
        raise StateError(f"{where}: spec 'likelihood_config' must name the likelihood")
    name = str(config["likelihood"])
    if name.startswith("callable:"):
        if kind not in ("empirical", "batch_grad_sq"):
            raise StateError(f"{where}: kind={kind!r} is impossible with a callable likelihood")
        reduction = config.get("loss_reduction", "sum")
        if reduction not in REDUCTIONS:
            raise StateError(f"{where}: loss_reduction must be 'sum' or 'mean'; got {reduction!r}")
    elif name not in BUILTIN_LIKELIHOODS:
        valid = ", ".join(repr(c) for c in BUILTIN_LIKELIHOODS)
        raise StateError(
            f"{where}: likelihood must be one of {valid} or 'callable:<name>'; got {name!r}"
        )
    if unit == "token" and name in ("classification", "regression"):
        raise StateError(f"{where}: unit='token' is impossible with likelihood {name!r}")
    return SavedSpec(
        kind=kind,
        unit=unit,
        mc_samples=mc_samples,
        seed=seed,
        beta=float(beta),
        signal=signal,
        element_se=element_se,
        nonfinite=str(nonfinite),
        fingerprint=print_,
        likelihood_config={str(k): v for k, v in config.items()},
    )
