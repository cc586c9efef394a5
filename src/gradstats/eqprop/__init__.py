"""Equilibrium propagation for fixed-point models, checked against the exact implicit gradient.

A model is an :class:`EquilibriumModule` (``init_state``, ``force``, ``loss``); :func:`relax`
finds its fixed point; :func:`estimate_gradient` estimates dL/dθ with ``implicit``, ``bptt``,
``ep``, ``ep_symmetric``, ``aep`` or ``holomorphic`` and reports the residual of every phase;
each estimator is one :class:`Estimator` object in :data:`ESTIMATORS` (``get_estimator(name)``)
declaring its phases, its own settings dataclass, the models it supports and its probe sweeps,
beside the shared :class:`SolverSettings`;
:func:`probe` compares estimators with the exact gradient per parameter group and
:func:`diagnose` names what limits them.

Errors follow the library's family (:mod:`gradstats.errors`): bad arguments raise
``ConfigurationError`` / ``ConfigurationTypeError`` naming the argument and its valid values; a
diverged phase raises ``DivergenceError`` (``phase``, ``step``, ``samples``), or, with
``estimate_gradient(..., nonfinite="skip")``, the estimate is dropped whole (``skipped=True``,
zero gradients). Warnings (``ConvergenceWarning``, ``AnalyticityWarning``) name the caller's line.
"""

from gradstats.eqprop._autodiff import Linearization, per_sample_norm, transpose_vjp
from gradstats.eqprop._diagnose import FINDINGS, Finding, diagnose
from gradstats.eqprop._estimators import (
    ESTIMATORS,
    LIBRARY_DEFAULTS,
    METHODS,
    AnalyticityWarning,
    check_method_supported,
    estimate_gradient,
    get_estimator,
    supported_estimators,
)
from gradstats.eqprop._holo_ops import (
    holo_cross_entropy,
    holo_gelu,
    holo_layer_norm,
    holo_logsumexp,
    holo_masked_softmax,
)
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization, model_fingerprint
from gradstats.eqprop._penalties import (
    JACOBIAN_NORMS,
    PENALTIES,
    add_penalties,
    free_tolerance,
    penalty_value,
)
from gradstats.eqprop._probe import SWEEPS, ProbeReport, ProbeRow, probe
from gradstats.eqprop._problem import relax
from gradstats.eqprop._registry import Estimator, Options
from gradstats.eqprop._settings import Settings, SolverSettings
from gradstats.eqprop._solvers import fixed_point, solve_adjoint
from gradstats.eqprop._stats import (
    ConvergenceWarning,
    DivergenceError,
    GradientEstimate,
    SolveStats,
    write_grads,
)
from gradstats.eqprop.models._generate import generate

__all__ = [
    "ESTIMATORS",
    "FINDINGS",
    "JACOBIAN_NORMS",
    "LIBRARY_DEFAULTS",
    "METHODS",
    "PENALTIES",
    "SWEEPS",
    "AnalyticityWarning",
    "ConvergenceWarning",
    "DivergenceError",
    "EquilibriumModule",
    "Estimator",
    "Finding",
    "GradientEstimate",
    "Linearization",
    "NoiseRealization",
    "Options",
    "ProbeReport",
    "ProbeRow",
    "Settings",
    "SolveStats",
    "SolverSettings",
    "add_penalties",
    "check_method_supported",
    "diagnose",
    "estimate_gradient",
    "fixed_point",
    "free_tolerance",
    "generate",
    "get_estimator",
    "holo_cross_entropy",
    "holo_gelu",
    "holo_layer_norm",
    "holo_logsumexp",
    "holo_masked_softmax",
    "model_fingerprint",
    "penalty_value",
    "per_sample_norm",
    "probe",
    "relax",
    "solve_adjoint",
    "supported_estimators",
    "transpose_vjp",
    "write_grads",
]
