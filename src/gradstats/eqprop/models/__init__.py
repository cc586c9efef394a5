"""Equilibrium models: the equilibrium transformer LM and the reference models (closed-form
linear, Hopfield energy, non-symmetric tanh); :func:`generate` samples text from the
transformer (or its backprop baseline) with a KV cache of the converged prefix."""

from gradstats.eqprop.models._generate import generate
from gradstats.eqprop.models.baseline import BackpropTransformer
from gradstats.eqprop.models.hopfield import HopfieldModel
from gradstats.eqprop.models.linear import LinearModel
from gradstats.eqprop.models.tanh import TanhModel
from gradstats.eqprop.models.transformer import EquilibriumTransformer

__all__ = [
    "BackpropTransformer",
    "EquilibriumTransformer",
    "HopfieldModel",
    "LinearModel",
    "TanhModel",
    "generate",
]
