r"""What a collection estimates and how: :class:`FisherSpec`, validated once, and the parameter
fingerprint.

Every option of :class:`~gradstats.fisher.FisherCollector` (bar the model, its parameters and
groups, and the generator) is a field of the frozen :class:`FisherSpec`; the collector's defaults
are the dataclass's. A spec read back from a file is validated by :meth:`FisherSpec.from_saved`
(``StateError`` naming the file and the field).

Nothing here imports the collector or a result, so every module of the pillar can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from gradstats._validation import check_choice, check_open_unit, check_positive_int
from gradstats.errors import (
    NONFINITE_POLICIES,
    ConfigurationError,
    ConfigurationTypeError,
    StateError,
    check_nonfinite,
)
from gradstats.fisher._estimands import ESTIMANDS, KINDS, Estimand, estimand
from gradstats.fisher._likelihood_base import REDUCTIONS, Likelihood
from gradstats.fisher._likelihoods import LIKELIHOODS, CallableLikelihood, make_likelihood

__all__ = ["DEFAULT", "ESTIMANDS", "KINDS", "MODES", "UNITS", "FisherSpec", "fingerprint"]

UNITS = ("sample", "token")
MODES = ("cumulative", "ema")
CALLABLE = "callable:"  # a saved callable likelihood is recorded by name: "callable:<name>"


class _Default:
    """The default of a collector option: the :class:`FisherSpec` field's (so that an option
    that was passed can be told from one that was not)."""

    def __repr__(self) -> str:
        return "<FisherSpec default>"


#: The signature default of every :class:`~gradstats.fisher.FisherCollector` option held by a
#: :class:`FisherSpec`: "not passed", i.e. the dataclass field's default.
DEFAULT: Any = _Default()


def fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A short hash of the collected parameters' names and shapes.

    >>> fingerprint({"weight": (2, 3)}) == fingerprint({"weight": (2, 3)})
    True
    """
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationTypeError(f"{name} must be True or False; got {value!r}")
    return value


@dataclass(frozen=True)
class FisherSpec:
    r"""The validated options of a Fisher collection (see
    :class:`~gradstats.fisher.FisherCollector` for each one's meaning).

    Validated once, in construction (``ConfigurationError`` / ``ConfigurationTypeError`` naming
    the argument and its valid values). ``signal`` is normalised to what is collected: True only
    where the estimand has a mean gradient (``"empirical"``, ``"mc"``). ``likelihood`` is what was
    given — a name, a :class:`~gradstats.fisher.Likelihood` or a callable — or, in a spec read
    from a file, ``"callable:<name>"``: a callable recorded by name only, which cannot collect
    until the callable is given again (``dataclasses.replace(spec, likelihood=fn)``).

    Example:
        >>> spec = FisherSpec("mc", mc_samples=4)
        >>> spec.estimand.sampled, spec.signal, spec.likelihood_config
        (True, True, {'likelihood': 'classification'})
        >>> FisherSpec("exact").signal  # the mean score is 0 by definition: not collected
        False
    """

    OPTIONS: ClassVar[tuple[str, ...]]  # the field names (set below the class)

    kind: str = "empirical"
    likelihood: object = "classification"
    unit: str = "sample"
    mc_samples: int = 1
    seed: int = 0
    mode: str = "cumulative"
    beta: float = 0.99
    signal: bool = True
    element_se: bool = False
    loss_reduction: str = "sum"
    chunk_bytes: int = 256 * 2**20
    check_first_batch: bool = True
    max_exact_passes: int = 4096
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        kind = check_choice("kind", self.kind, KINDS)
        est = estimand(kind)
        if self.recorded_callable:
            if self.loss_reduction not in REDUCTIONS:
                raise ConfigurationError(
                    f"loss_reduction must be 'sum' or 'mean'; got {self.loss_reduction!r}"
                )
            kinds: tuple[str, ...] = CallableLikelihood.kinds
            tokens, name = True, self.likelihood
        else:
            lik = make_likelihood(self.likelihood, self.loss_reduction)
            kinds, name = lik.kinds, lik.name
            tokens = lik.has_tokens or isinstance(lik, CallableLikelihood)
        if kind not in kinds:
            raise ConfigurationError(
                f"kind={kind!r} is not available for likelihood {name!r} (available: "
                f"{', '.join(kinds)}): a callable likelihood cannot sample or enumerate labels"
            )
        unit = check_choice("unit", self.unit, UNITS)
        if unit == "token" and not tokens:
            raise ConfigurationError(
                f"unit='token' needs a likelihood with token positions ('causal_lm' or a callable "
                f"returning [B, T] losses); likelihood {name!r} has none"
            )
        mc_samples = check_positive_int("mc_samples", self.mc_samples)
        if mc_samples != 1 and not est.sampled:
            raise ConfigurationError(f"mc_samples applies to kind='mc' only; got kind={kind!r}")
        signal, element_se = _flag("signal", self.signal), _flag("element_se", self.element_se)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationTypeError(f"seed must be an int; got {type(self.seed).__name__}")
        mode = check_choice("mode", self.mode, MODES)
        object.__setattr__(self, "beta", check_open_unit("beta", self.beta))
        if element_se and (not est.element_se or mode != "cumulative"):
            raise ConfigurationError(
                "element_se=True needs kind='empirical' and mode='cumulative' (one backward "
                "pass per batch); group standard errors are available for every kind"
            )
        if mode not in est.modes:
            raise ConfigurationError(
                f"kind={kind!r} supports mode={', '.join(repr(m) for m in est.modes)} only"
            )
        check_positive_int("chunk_bytes", self.chunk_bytes)
        check_positive_int("max_exact_passes", self.max_exact_passes)
        check_nonfinite("nonfinite", self.nonfinite)
        if not isinstance(self.check_first_batch, bool):
            raise ConfigurationTypeError(
                f"check_first_batch must be True or False; got {self.check_first_batch!r}"
            )
        object.__setattr__(self, "signal", signal and est.has_signal)

    # ------------------------------------------------------------- derived
    @property
    def estimand(self) -> Estimand:
        """The :class:`~gradstats.fisher._estimands.Estimand` of ``kind``."""
        return estimand(self.kind)

    @property
    def recorded_callable(self) -> bool:
        """True for a spec read from a file whose callable likelihood is known by name only."""
        return isinstance(self.likelihood, str) and self.likelihood.startswith(CALLABLE)

    @property
    def likelihood_config(self) -> dict[str, object]:
        """The likelihood as stored in files: ``{"likelihood": name, ...}``."""
        if self.recorded_callable:
            return {"likelihood": self.likelihood, "loss_reduction": self.loss_reduction}
        return self.make_likelihood().config()

    def make_likelihood(self) -> Likelihood:
        """The :class:`~gradstats.fisher.Likelihood` to collect with.

        Raises:
            ConfigurationError: the spec records a callable by name only (read from a file).
        """
        if self.recorded_callable:
            raise ConfigurationError(
                f"this was collected with a callable likelihood ({self.likelihood}), recorded by "
                "name only: pass likelihood= to load() or resume() to keep collecting"
            )
        return make_likelihood(self.likelihood, self.loss_reduction)

    # ------------------------------------------------------------- files
    @classmethod
    def from_saved(cls, spec: object, where: str) -> FisherSpec:
        """Validate a specification read from a file (``where`` names it); the options a file
        does not record (``chunk_bytes``, ``check_first_batch``, ``max_exact_passes``) take their
        defaults.

        Raises:
            StateError: naming the field and its valid values.
        """
        if not isinstance(spec, Mapping):
            raise StateError(f"{where}: the spec must be a JSON object; got {type(spec).__name__}")
        kind = _saved_choice(spec, "kind", KINDS, where)
        est = estimand(kind)
        unit = _saved_choice(spec, "unit", UNITS, where)
        mode = _saved_choice(spec, "mode", MODES, where)
        if mode != "cumulative":
            raise StateError(f"{where}: only mode='cumulative' collectors are saved; got {mode!r}")
        mc_samples = _saved_integer(spec, "mc_samples", 1, where)
        if mc_samples != 1 and not est.sampled:
            raise StateError(f"{where}: mc_samples={mc_samples} with kind={kind!r} (mc only)")
        seed = _saved_integer(spec, "seed", None, where)
        beta = _saved(spec, "beta", where)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
            raise StateError(f"{where}: spec 'beta' must be a number in (0, 1); got {beta!r}")
        signal = _saved_flag(spec, "signal", where)
        if signal and not est.has_signal:
            raise StateError(f"{where}: signal=true is impossible with kind={kind!r}")
        element_se = _saved_flag(spec, "element_se", where)
        if element_se and not est.element_se:
            raise StateError(f"{where}: element_se=true is impossible with kind={kind!r}")
        if not isinstance(_saved(spec, "fingerprint", where), str):
            raise StateError(f"{where}: spec 'fingerprint' must be a string")
        nonfinite = spec.get("nonfinite", "skip")
        if nonfinite not in NONFINITE_POLICIES:
            valid = ", ".join(repr(p) for p in NONFINITE_POLICIES)
            raise StateError(f"{where}: spec 'nonfinite' must be one of {valid}; got {nonfinite!r}")
        config = _saved(spec, "likelihood_config", where)
        if not isinstance(config, Mapping) or not isinstance(config.get("likelihood"), str):
            raise StateError(f"{where}: spec 'likelihood_config' must name the likelihood")
        name, reduction = str(config["likelihood"]), config.get("loss_reduction", "sum")
        if name.startswith(CALLABLE):
            if kind not in CallableLikelihood.kinds:
                raise StateError(f"{where}: kind={kind!r} is impossible with a callable likelihood")
            if reduction not in REDUCTIONS:
                raise StateError(
                    f"{where}: loss_reduction must be 'sum' or 'mean'; got {reduction!r}"
                )
        elif name not in LIKELIHOODS:
            valid = ", ".join(repr(c) for c in LIKELIHOODS)
            raise StateError(
                f"{where}: likelihood must be one of {valid} or 'callable:<name>'; got {name!r}"
            )
        if unit == "token" and name in ("classification", "regression"):
            raise StateError(f"{where}: unit='token' is impossible with likelihood {name!r}")
        try:
            return cls(
                kind,
                name,
                unit,
                mc_samples=mc_samples,
                seed=seed,
                beta=float(beta),
                signal=signal,
                element_se=element_se,
                loss_reduction=str(reduction) if name.startswith(CALLABLE) else "sum",
                nonfinite=str(nonfinite),
            )
        except (ConfigurationError, ConfigurationTypeError) as error:
            raise StateError(f"{where}: impossible spec: {error}") from error

    def with_likelihood(self, likelihood: object) -> FisherSpec:
        """This spec collecting with ``likelihood`` (e.g. a callable given again after a load);
        validated again."""
        return replace(self, likelihood=likelihood)


FisherSpec.OPTIONS = tuple(f.name for f in fields(FisherSpec))


def _saved(spec: Mapping[str, object], key: str, where: str) -> object:
    if key not in spec:
        raise StateError(f"{where}: the spec lacks {key!r}")
    return spec[key]


def _saved_choice(
    spec: Mapping[str, object], key: str, choices: tuple[str, ...], where: str
) -> str:
    value = _saved(spec, key, where)
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise StateError(f"{where}: spec {key!r} must be one of {valid}; got {value!r}")
    return value


def _saved_flag(spec: Mapping[str, object], key: str, where: str) -> bool:
    value = _saved(spec, key, where)
    if not isinstance(value, bool):
        raise StateError(f"{where}: spec {key!r} must be true or false; got {value!r}")
    return value


def _saved_integer(spec: Mapping[str, object], key: str, minimum: int | None, where: str) -> int:
    value = _saved(spec, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{where}: spec {key!r} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise StateError(f"{where}: spec {key!r} must be >= {minimum}; got {value}")
    return value
