r"""The read side of a :class:`~gradstats.fisher.FisherCollector`: its options and every read,
delegated to the :class:`~gradstats.fisher.FisherResult` it holds (``fc.result``).

The collector adds batches to ``fc.result``; every read here is the result's read of the same
name and signature (see :mod:`gradstats.fisher._element_reads` for the checks each read makes:
a collector without data raises a ``StateError``, reads after skipped batches warn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gradstats.fisher._element_reads import Counts
from gradstats.fisher._estimands import Estimand
from gradstats.fisher._groups import GroupFamily, GroupMap
from gradstats.fisher._result import FisherResult
from gradstats.fisher._spec import FisherSpec
from gradstats.fisher._state import FisherState

if TYPE_CHECKING:
    from torch import nn

    from gradstats.fisher._engine import Engine
    from gradstats.fisher._likelihood_base import Likelihood

__all__ = ["FisherReads"]


class FisherReads:
    """Options and reads of a collector, from ``self.result`` (see the module docstring)."""

    model: nn.Module | None
    likelihood: Likelihood | None
    result: FisherResult
    _engine: Engine | None

    # ------------------------------------------------------------- options
    @property
    def config(self) -> FisherSpec:
        """The validated options, a frozen :class:`~gradstats.fisher.FisherSpec` (``spec()`` is
        the dict stored in files)."""
        return self.result.config

    @property
    def estimand(self) -> Estimand:
        return self.result.estimand

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def unit(self) -> str:
        return self.config.unit

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def beta(self) -> float:
        return self.config.beta

    @property
    def mc_samples(self) -> int:
        return self.config.mc_samples

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def nonfinite(self) -> str:
        return self.config.nonfinite

    @property
    def collect_signal(self) -> bool:
        """Whether the mean gradient is collected (``signal=True`` and the kind has one)."""
        return self.config.signal

    @property
    def element_se(self) -> bool:
        return self.config.element_se

    @property
    def chunk_bytes(self) -> int:
        return self.config.chunk_bytes

    @property
    def max_exact_passes(self) -> int:
        return self.config.max_exact_passes

    @property
    def group_map(self) -> GroupMap | None:
        return self.result.group_map

    @property
    def _state(self) -> FisherState:
        return self.result.state

    @property
    def _unit_families(self) -> list[GroupFamily]:
        return self.result.unit_families

    @property
    def _dtypes(self) -> dict[str, torch.dtype]:
        return self.result.dtypes

    # ------------------------------------------------------------- reads
    def spec(self) -> dict[str, object]:
        """What was estimated, how, and on which parameters (stored in every saved file)."""
        return self.result.spec()

    @property
    def names(self) -> list[str]:
        return self.result.names

    @property
    def counts(self) -> Counts:
        """{"samples", "tokens", "units", "batches", "skipped"} as Python ints (host read)."""
        return self.result.counts

    @property
    def skipped(self) -> torch.Tensor:
        """Batches skipped as non-finite, an int64 scalar on the collector's device (no sync)."""
        return self.result.skipped

    @property
    def families(self) -> list[GroupFamily]:
        return self.result.families

    def fisher(
        self, normalization: str = "unit", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """{parameter name: F}: :meth:`FisherResult.fisher`."""
        return self.result.fisher(normalization, dtype)

    def mean_gradient(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ}: :meth:`FisherResult.mean_gradient`."""
        return self.result.mean_gradient(dtype)

    def signal(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ²}: :meth:`FisherResult.signal`."""
        return self.result.signal(dtype)

    def variance(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: F − ḡ²}: :meth:`FisherResult.variance`."""
        return self.result.variance(dtype)

    def standard_error(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: SE(F_jj)}: :meth:`FisherResult.standard_error`."""
        return self.result.standard_error(dtype)

    def mean_gradient_standard_error(self) -> dict[str, torch.Tensor]:
        """{name: SE(ḡ)}: :meth:`FisherResult.mean_gradient_standard_error`."""
        return self.result.mean_gradient_standard_error()

    def score_check(self) -> dict[str, float]:
        """The sampled-label self-check: :meth:`FisherResult.score_check`."""
        return self.result.score_check()

    def group_names(self) -> dict[str, list[str]]:
        """{family: group names}: :meth:`FisherResult.group_names`."""
        return self.result.group_names()

    def group_fisher(
        self, kind: str = "trace", normalization: str = "unit"
    ) -> dict[str, torch.Tensor]:
        """{family: tensor [G]}: :meth:`FisherResult.group_fisher`."""
        return self.result.group_fisher(kind, normalization)

    def group_standard_error(self, kind: str = "trace") -> dict[str, torch.Tensor]:
        """{family: SE [G]}: :meth:`FisherResult.group_standard_error`."""
        return self.result.group_standard_error(kind)

    def relative_standard_error(
        self, kind: str = "trace", families: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """{family: SE / mean [G]}: :meth:`FisherResult.relative_standard_error`."""
        return self.result.relative_standard_error(kind, families)

    def state_dict(self) -> dict[str, object]:
        """A snapshot of the statistics: :meth:`FisherResult.state_dict`."""
        return self.result.state_dict()
