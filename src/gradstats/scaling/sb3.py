"""Deprecated location of the stable-baselines3 callback: use :mod:`gradstats.integrations.sb3`.

``from gradstats.scaling.sb3 import VarianceScalingCallback`` keeps working (with a
FutureWarning); the callback lives beside the other adapters now.
"""

from gradstats._warnings import warn
from gradstats.integrations.sb3 import VarianceScalingCallback

__all__ = ["VarianceScalingCallback"]

warn(
    "gradstats.scaling.sb3 moved to gradstats.integrations.sb3; import VarianceScalingCallback "
    "from there",
    FutureWarning,
)
