"""gradstats: gradient estimators and statistics, each checked against its exact reference."""

from gradstats._version import __version__
from gradstats.moments import EMAMoments, RunningMoments
from gradstats.scaling import VarianceGradientScaler

__all__ = ["EMAMoments", "RunningMoments", "VarianceGradientScaler", "__version__"]
