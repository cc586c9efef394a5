"""gradstats: gradient estimators and statistics, each checked against its exact reference."""

from gradstats import errors
from gradstats._version import __version__
from gradstats.errors import (
    ConfigurationError,
    DivergenceError,
    GradstatsError,
    NonFiniteError,
    StateError,
)
from gradstats.fisher import FisherCollector
from gradstats.moments import EMAMoments, RunningMoments
from gradstats.scaling import VarianceGradientScaler

__all__ = [
    "ConfigurationError",
    "DivergenceError",
    "EMAMoments",
    "FisherCollector",
    "GradstatsError",
    "NonFiniteError",
    "RunningMoments",
    "StateError",
    "VarianceGradientScaler",
    "__version__",
    "errors",
]
