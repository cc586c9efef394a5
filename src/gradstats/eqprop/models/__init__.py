"""Reference equilibrium models: closed-form linear, Hopfield energy, non-symmetric tanh."""

from gradstats.eqprop.models.hopfield import HopfieldModel
from gradstats.eqprop.models.linear import LinearModel
from gradstats.eqprop.models.tanh import TanhModel

__all__ = ["HopfieldModel", "LinearModel", "TanhModel"]
