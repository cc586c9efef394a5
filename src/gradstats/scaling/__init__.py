"""The variance gradient scaler: gradient-noise statistics and a noise-aware step factor.

:class:`VarianceGradientScaler` measures the inverse signal-to-noise ratio ρ of the gradient
each step applies and shrinks the step by c = 1/(1 + αρ). See ``_temporal`` (default
statistic), ``_same_point`` (micro-batches / DDP ranks), ``_diagnostics`` (the original's
statistics, kept as labelled diagnostics) and ``_factor`` (aggregation, gates, bounds).
"""

from gradstats.scaling._checkpoint import LoadReport
from gradstats.scaling._config import AGGREGATES, APPLY_TO, STATISTICS, ScalerConfig
from gradstats.scaling._integrations import Attachment, attach, optimizer_step
from gradstats.scaling._legacy import LegacyImport, import_legacy_state_dict
from gradstats.scaling._report import TensorStatistics
from gradstats.scaling._same_point import two_batch_estimates
from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = [
    "AGGREGATES",
    "APPLY_TO",
    "STATISTICS",
    "Attachment",
    "LegacyImport",
    "LoadReport",
    "ScalerConfig",
    "TensorStatistics",
    "VarianceGradientScaler",
    "attach",
    "import_legacy_state_dict",
    "optimizer_step",
    "two_batch_estimates",
]
