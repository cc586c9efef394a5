"""gradstats: gradient estimators and statistics, each checked against its exact reference."""

from gradstats._version import __version__
from gradstats.fisher import FisherCollector
from gradstats.moments import EMAMoments, RunningMoments
from gradstats.scaling import VarianceGradientScaler

__all__ = [
    "EMAMoments",
    "FisherCollector",
    "RunningMoments",
    "VarianceGradientScaler",
    "__version__",
]
