"""The variance gradient scaler: gradient-noise statistics and a noise-aware step factor.

:class:`VarianceGradientScaler` measures the inverse signal-to-noise ratio ρ of the gradient
each step applies and turns it into a step factor by a rule (``_rules``: the original's shrink
c = 1/(1 + αρ), or AdaScale's gain for a batch larger than the lr was tuned for). See
``_temporal`` (default statistic), ``_same_point`` (micro-batches / DDP ranks),
``_diagnostics`` (the original's statistics, kept as labelled diagnostics) and ``_factor``
(aggregation, gates, bounds).
"""

from gradstats.scaling._checkpoint import LoadReport
from gradstats.scaling._config import AGGREGATES, APPLY_TO, STATISTICS, ScalerConfig
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

__all__ = [
    "AGGREGATES",
    "APPLY_TO",
    "STATISTICS",
    "AdaScaleRule",
    "Attachment",
    "LegacyImport",
    "LoadReport",
    "Rule",
    "ScalerConfig",
    "ShrinkRule",
    "TensorStatistics",
    "VarianceGradientScaler",
    "attach",
    "import_legacy_state_dict",
    "optimizer_step",
    "register_rule",
    "registered_rules",
    "two_batch_estimates",
]
