r"""Group reads of a :class:`~gradstats.fisher.FisherResult`: group traces and mask Fisher, their
standard errors.

For a family of G groups and a group k with parameter elements j ∈ k:

* trace_k = Σ_{j ∈ k} F_jj (square, then sum), from the elementwise Fisher;
* mask_k = E_units[(Σ_{j ∈ mask set of k} θ_j g_j)²] (sum, then square): the Fisher of a
  multiplicative mask on the group's output;
* SE_k = sqrt(Var_units(value_k) / N) with the units as observations.

Every read checks what was accumulated as described in :mod:`gradstats.fisher._element_reads`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradstats._validation import check_choice
from gradstats.errors import ConfigurationError
from gradstats.fisher._element_reads import ElementReads
from gradstats.fisher._groups import GroupFamily, GroupMap

__all__ = ["GroupReads"]

GROUP_KINDS = ("trace", "mask")


class GroupReads(ElementReads):
    """Group-level reads (see the module docstring)."""

    def _need_groups(self) -> GroupMap:
        if self.group_map is None:
            raise ConfigurationError("no group map: construct with groups='auto' or a GroupMap")
        return self.group_map

    def group_names(self) -> dict[str, list[str]]:
        groups = self._need_groups()
        out = {f.name: f.group_names() for f in groups.families}
        if groups.unmapped:
            out["unmapped"] = list(groups.unmapped)
        return out

    def group_fisher(
        self, kind: str = "trace", normalization: str = "unit"
    ) -> dict[str, torch.Tensor]:
        """{family: tensor [G]} of a group quantity (float64).

        * ``"trace"``: Σ_{j ∈ k} F_jj (square, then sum), from the elementwise Fisher; an
          ``"unmapped"`` entry holds the trace of every parameter no family covers.
        * ``"mask"``: E[(Σ_{j ∈ mask set of k} θ_j g_j)²] over units (sum, then square): the
          Fisher of a multiplicative mask on the group's output. Families without per-unit
          values (token rows) are omitted.

        ``normalization`` as in :meth:`fisher` (the same restriction in ``mode="ema"``).
        """
        check_choice("kind", kind, GROUP_KINDS)
        self._check_normalization(normalization)
        self._need_groups()
        if kind == "mask" and not self.estimand.per_unit:
            raise ConfigurationError(
                f"kind={self.kind!r} has no per-unit values: no 'mask' quantity (use 'trace')"
            )
        self._checked()
        return self._group_fisher(kind, normalization)

    def _group_fisher(self, kind: str, normalization: str) -> dict[str, torch.Tensor]:
        groups = self._need_groups()
        if kind == "trace":
            fisher = self._fisher(normalization, torch.float64)
            out = {f.name: _family_trace(f, fisher) for f in groups.families}
            if groups.unmapped:
                out["unmapped"] = torch.stack([fisher[n].sum() for n in groups.unmapped])
            return out
        state = self.state
        out = {}
        for fam in self.unit_families:
            if self.mode == "cumulative":
                out[fam.name] = state.mask[fam.name].mean * (
                    state.units / state.norm(normalization)
                )
            else:
                out[fam.name] = state.mask_ema[fam.name].mean
        return out

    def group_standard_error(self, kind: str = "trace") -> dict[str, torch.Tensor]:
        """{family: SE [G]} of the per-unit group values (units are the observations)."""
        self._check_group_se(kind)
        self._checked()
        return self._group_standard_error(kind)

    def _check_group_se(self, kind: str) -> None:
        check_choice("kind", kind, GROUP_KINDS)
        self._need_groups()
        if self.mode != "cumulative" or not self.estimand.per_unit:
            raise ConfigurationError(
                "group standard errors need mode='cumulative' per-unit statistics; got "
                f"mode={self.mode!r}, kind={self.kind!r}"
            )

    def _group_standard_error(self, kind: str) -> dict[str, torch.Tensor]:
        stats = self.state.trace if kind == "trace" else self.state.mask
        return {f.name: stats[f.name].standard_error() for f in self.unit_families}

    def relative_standard_error(
        self, kind: str = "trace", families: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """{family: SE / mean [G]}; 0/0 (a group never active) reads 0, x/0 reads inf."""
        self._check_relative(kind, families)
        self._checked()
        return self._relative_standard_error(kind, families)

    def _check_relative(self, kind: str, families: Sequence[str] | None) -> None:
        self._check_group_se(kind)
        if families is not None and (isinstance(families, str) or not _is_seq(families)):
            raise ConfigurationError(
                f"families must be a list of family names or None; got {families!r}"
            )
        known = [f.name for f in self.unit_families]
        unknown = [n for n in (families or ()) if n not in known]
        if unknown:
            raise ConfigurationError(
                f"families: unknown or without per-unit values: {unknown[:3]}; families with "
                f"per-unit values: {known[:6]}"
            )

    def _relative_standard_error(
        self, kind: str, families: Sequence[str] | None
    ) -> dict[str, torch.Tensor]:
        se = self._group_standard_error(kind)
        stats = self.state.trace if kind == "trace" else self.state.mask
        names = list(se) if families is None else list(families)
        out = {}
        for name in names:
            mean = stats[name].mean.abs()
            rel = torch.where(mean > 0, se[name] / mean.clamp(min=1e-300), math.inf)
            out[name] = torch.where((mean == 0) & (se[name] == 0), 0.0, rel)
        return out


def _is_seq(value: object) -> bool:
    return isinstance(value, (list, tuple))


def _family_trace(fam: GroupFamily, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    value = torch.zeros(
        fam.size + 1, dtype=torch.float64, device=next(iter(fisher.values())).device
    )
    for m in fam.members:
        f = fisher[m.param]
        dims = [d for d in range(f.dim()) if d != m.axis]
        marginal = f.sum(dims) if dims else f
        assign = torch.tensor(m.assign, dtype=torch.long, device=f.device)
        value.index_add_(0, torch.where(assign < 0, fam.size, assign), marginal)
    return value[: fam.size]
