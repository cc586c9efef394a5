"""The variance gradient scaler: gradient-noise statistics and a noise-aware step factor.

:class:`VarianceGradientScaler` measures the inverse signal-to-noise ratio ρ of the gradient
each step applies and turns it into a step factor by a rule (``_rules``: the original's shrink
c = 1/(1 + αρ), or AdaScale's gain for a batch larger than the lr was tuned for — the default,
at S = 1 the unscaled step). See ``_per_sample`` (one backward) and ``_same_point``
(micro-batches / DDP ranks), what the default ``statistic="auto"`` resolves to, ``_temporal``
(noise over time, the original's idea), ``_diagnostics`` (the original's statistics, kept as
labelled diagnostics) and ``_factor`` (aggregation, gates, bounds).

Underneath, the scaler is a pure init/update pair over one value, :class:`ScalerState`
(``_scaler_state``, ``_engine``), like an optax ``GradientTransformation``; the scaler object
is the stateful shell (hooks, the non-finite limit, logging, applying the factor). Statistics
and rules are looked up in registries (:class:`Statistic`, :func:`register_statistic`;
:class:`Rule`, :func:`register_rule`)::

    config = ScalerConfig(statistic="temporal")      # "auto" is resolved by the scaler
    state = init(config, model.named_parameters())
    loss.backward()
    state = update(state, observe(state), config)   # the argument is left unchanged
"""

from gradstats.scaling._checkpoint import LoadReport
from gradstats.scaling._config import AGGREGATES, APPLY_TO, STATISTICS, ScalerConfig
from gradstats.scaling._engine import Observation, observe, refresh, update, update_
from gradstats.scaling._integrations import Attachment, attach, optimizer_step
from gradstats.scaling._legacy import LegacyImport, import_legacy_state_dict
from gradstats.scaling._report import TensorStatistics
from gradstats.scaling._rules import (
    AdaScaleRule,
    Rule,
    ShrinkRule,
    register_rule,
    registered_rules,
)
from gradstats.scaling._same_point import two_batch_estimates
from gradstats.scaling._scaler import VarianceGradientScaler
from gradstats.scaling._scaler_state import ScalerState, init
from gradstats.scaling._statistic import (
    Statistic,
    StatisticSpec,
    get_statistic,
    register_statistic,
    registered_statistics,
    resolve_statistic,
    statistic_choices,
)

__all__ = [
    "AGGREGATES",
    "APPLY_TO",
    "STATISTICS",
    "AdaScaleRule",
    "Attachment",
    "LegacyImport",
    "LoadReport",
    "Observation",
    "Rule",
    "ScalerConfig",
    "ScalerState",
    "ShrinkRule",
    "Statistic",
    "StatisticSpec",
    "TensorStatistics",
    "VarianceGradientScaler",
    "attach",
    "get_statistic",
    "import_legacy_state_dict",
    "init",
    "observe",
    "optimizer_step",
    "refresh",
    "register_rule",
    "register_statistic",
    "registered_rules",
    "registered_statistics",
    "resolve_statistic",
    "statistic_choices",
    "two_batch_estimates",
    "update",
    "update_",
]
