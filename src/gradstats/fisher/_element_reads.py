r"""The base of :class:`~gradstats.fisher.FisherResult`: what a result holds, and its elementwise
reads (the Fisher, its decomposition EF = ḡ² + Var and standard errors, counts, the spec).

Everything returned is a fresh tensor; values are float64 internally and returned in the
parameter's dtype (float32 for bf16/fp16 parameters — never fp16, where values below 6e-8
underflow) unless ``dtype`` says otherwise. Reads that return Python numbers (``counts``,
``score_check``) are explicit host reads.

**Reads check what was accumulated** (one host read of two counters per read, marked
``# sync-ok``; reads are never on a per-step hot path): a read of a result that holds no unit
(nothing collected yet, or every batch skipped as non-finite) raises a
:class:`~gradstats.errors.StateError` instead of returning NaN tensors, and a read after batches
were skipped (``nonfinite="skip"``) warns once per read (``RuntimeWarning``, attributed to the
caller's line): the result covers the accepted batches only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from gradstats._validation import check_choice
from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, StateError
from gradstats.fisher._estimands import Estimand
from gradstats.fisher._groups import GroupFamily, GroupMap
from gradstats.fisher._spec import FisherSpec, fingerprint
from gradstats.fisher._state import FisherState

__all__ = ["Counts", "ElementReads"]

NORMALIZATIONS = ("unit", "sample", "token", "none")


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class Counts(dict[str, int]):
    """``{"samples", "tokens", "units", "batches", "skipped"}`` as Python ints; ``"rejected"`` is a
    deprecated alias of ``"skipped"`` (reading it warns with a ``FutureWarning``)."""

    def __missing__(self, key: str) -> int:
        if key == "rejected":
            warn('counts["rejected"] is deprecated; use counts["skipped"]', FutureWarning)
            return int(self["skipped"])
        raise KeyError(key)


class ElementReads:
    """Statistics of one collection, and their elementwise reads.

    Args:
        config: what was estimated and how.
        shapes: parameter name -> shape of every collected parameter.
        dtypes: parameter name -> the parameter's dtype (reads return it, fp16/bf16 as float32).
        group_map: the groups (None: no group reads).
        device: where the float64 statistics live.
    """

    def __init__(
        self,
        config: FisherSpec,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype],
        *,
        group_map: GroupMap | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(config, FisherSpec):
            raise ConfigurationError(f"config must be a FisherSpec; got {type(config).__name__}")
        if not shapes or set(shapes) != set(dtypes):
            raise ConfigurationError("shapes and dtypes must name the same parameters")
        self.config = config
        self.group_map = group_map
        self.dtypes = dict(dtypes)
        self.fingerprint = fingerprint(shapes)
        families = group_map.families if group_map is not None else []
        #: the families with per-unit values (group SEs, ``mask``): none for batch_grad_sq
        self.unit_families: list[GroupFamily] = (
            [f for f in families if f.per_unit] if self.estimand.per_unit else []
        )
        self.state = FisherState(
            {n: tuple(s) for n, s in shapes.items()},
            torch.device(device),
            unit=config.unit,
            mode=config.mode,
            beta=config.beta,
            signal=config.signal,
            element_se=config.element_se,
            families=[(f.name, f.size) for f in self.unit_families],
        )

    # ------------------------------------------------------------- what it is
    @property
    def estimand(self) -> Estimand:
        return self.config.estimand

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
    def names(self) -> list[str]:
        return list(self.state.shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.state.shapes)

    @property
    def device(self) -> torch.device:
        """Where the float64 statistics live (a live collector: the parameters' device)."""
        return self.state.device

    @property
    def families(self) -> list[GroupFamily]:
        return [] if self.group_map is None else list(self.group_map.families)

    def spec(self) -> dict[str, object]:
        """What was estimated, how, and on which parameters (stored in every saved file)."""
        c = self.config
        config = c.likelihood_config
        return {
            "kind": c.kind,
            "likelihood": config["likelihood"],
            "likelihood_config": config,
            "unit": c.unit,
            "mc_samples": c.mc_samples,
            "seed": c.seed,
            "mode": c.mode,
            "beta": c.beta,
            "signal": c.signal,
            "element_se": c.element_se,
            "nonfinite": c.nonfinite,
            "groups": None if self.group_map is None else self.group_map.source,
            "fingerprint": self.fingerprint,
            "statistics_dtype": "float64",
            "storage_dtype": "float32",
            "estimand": c.estimand.formula,
        }

    @property
    def counts(self) -> Counts:
        """{"samples", "tokens", "units", "batches", "skipped"} as Python ints (host read).

        ``skipped`` counts the batches dropped as non-finite (``nonfinite="skip"``); the old name
        ``"rejected"`` still reads it (deprecated)."""
        keys = ("samples", "tokens", "batches", "skipped")
        read = torch.stack([self.state.counts[k] for k in keys]).tolist()  # sync-ok: host read
        values = Counts({k: round(v) for k, v in zip(keys, read, strict=True)})
        values["units"] = values["samples" if self.unit == "sample" else "tokens"]
        return values

    @property
    def skipped(self) -> torch.Tensor:
        """Batches skipped as non-finite, an int64 scalar on the result's device (no sync)."""
        return self.state.counts["skipped"].to(torch.int64)

    # ------------------------------------------------------------- checks
    def _checked(self) -> None:
        """The read check of the module docstring (one host read)."""
        counts = self.state.counts
        key = self.state.unit_key if self.estimand.per_unit else "batches"
        held, skipped = torch.stack([counts[key], counts["skipped"]]).tolist()  # sync-ok: read
        if skipped > 0:
            warn(
                f"{round(skipped)} batch(es) were skipped as non-finite (nonfinite='skip'); this "
                "read covers the accepted batches only",
                RuntimeWarning,
            )
        if held <= 0:
            what = f"no {self.state.unit_key}" if self.estimand.per_unit else "no batch"
            why = f" ({round(skipped)} batch(es) skipped as non-finite)" if skipped > 0 else ""
            raise StateError(
                f"nothing to read: the collector holds {what}{why}; collect() data first"
            )

    def _out(self, name: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigurationError(
                f"dtype must be a floating torch.dtype (torch.float32, torch.float64) or None; "
                f"got {dtype!r}"
            )
        return value.to(dtype or _result_dtype(self.dtypes[name]))

    def _check_normalization(self, normalization: str) -> None:
        check_choice("normalization", normalization, NORMALIZATIONS)
        if self.mode == "ema" and normalization not in ("unit", self.unit):
            raise ConfigurationError(
                f"normalization={normalization!r} is not available in mode='ema' (an EMA of "
                f"per-batch means over units has no sum to renormalise); use normalization="
                f"'unit' (or {self.unit!r}), or mode='cumulative'"
            )

    def _need_signal(self) -> None:
        if not self.config.signal:
            raise ConfigurationError(
                "the mean gradient was not collected: construct with signal=True and "
                "kind='empirical' or 'mc' (for kind='exact' the mean score is 0 by definition)"
            )

    # ------------------------------------------------------------- Fisher
    def fisher(
        self, normalization: str = "unit", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """{parameter name: F} with F_jj = Σ_units x_ij / (normalizer).

        ``normalization``: ``"unit"`` (the mean over units: the Fisher), ``"sample"`` (per
        sequence), ``"token"`` (per active target) or ``"none"`` (the sum Σ_units x_ij).
        ``kind="batch_grad_sq"`` is always the mean over batches of (ḡ_B)². In ``mode="ema"``
        only the mean over units exists (an EMA of per-batch means has no sum, and rescaling
        it by a ratio of total counts would mix every batch's weights): ``"unit"`` or the name
        of the unit itself; any other normalization is a ``ConfigurationError``.

        Raises:
            StateError: nothing was accumulated (see the module docstring).
        """
        self._check_normalization(normalization)
        self._checked()
        return self._fisher(normalization, dtype)

    def _fisher(self, normalization: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        state = self.state
        out = {}
        for name in state.shapes:
            if not self.estimand.per_unit:  # batches are the observations
                batches = state.counts["batches"]
                value = torch.where(batches > 0, state.g2_sum[name] / batches, 0.0)
            else:
                value = state.fisher(name, normalization)
            out[name] = self._out(name, value, dtype)
        return out

    def mean_gradient(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ} = Σ_{i,k} w_k g_ik / N, the mean per-unit gradient."""
        self._need_signal()
        self._checked()
        return self._mean_gradient(dtype)

    def _mean_gradient(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {n: self._out(n, self.state.mean_gradient(n), dtype) for n in self.names}

    def signal(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ²}: the squared mean gradient, the first term of EF = ḡ² + Var."""
        self._need_signal()
        self._checked()
        return {n: self._out(n, self.state.mean_gradient(n).square(), dtype) for n in self.names}

    def variance(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: Var} = F − ḡ²: the population variance of the per-unit gradients."""
        self._need_signal()
        self._checked()
        state = self.state
        return {
            n: self._out(n, state.fisher(n) - state.mean_gradient(n).square(), dtype)
            for n in self.names
        }

    def standard_error(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: SE(F_jj)} = sqrt(Var_i(x_ij) / N) with units as observations (NaN while
        N = 1: one unit has no spread)."""
        if not self.config.element_se:
            raise ConfigurationError(
                "elementwise standard errors need element_se=True at construction; group "
                "standard errors: group_standard_error()"
            )
        self._checked()
        return {n: self._out(n, self.state.fisher_standard_error(n), dtype) for n in self.names}

    def mean_gradient_standard_error(self) -> dict[str, torch.Tensor]:
        """{name: SE(ḡ)} with the (unit, draw) pairs as observations (float64)."""
        self._need_signal()
        self._checked()
        return self._mean_gradient_standard_error()

    def _mean_gradient_standard_error(self) -> dict[str, torch.Tensor]:
        return {n: self.state.mean_gradient_standard_error(n) for n in self.names}

    def score_check(self) -> dict[str, float]:
        """Self-check of sampled labels: z_j = ḡ_j / SE(ḡ_j) over all elements with SE > 0 and
        F_jj above rounding level (F_jj > ε · the largest F_jj of all parameters).

        For ``kind="mc"`` the score has mean zero, so ``mean_z2`` ≈ 1 and ``max_abs_z`` stays
        at the size of the largest of n standard normals (≈ sqrt(2 ln n)). A sampler that draws
        labels at the wrong position, or data labels away from an optimum, gives mean_z2 ≫ 1.
        """
        self._need_signal()
        self._checked()
        g, se = self._mean_gradient(torch.float64), self._mean_gradient_standard_error()
        fisher = self._fisher("unit", torch.float64)
        top = torch.stack([f.max() for f in fisher.values()]).max()
        parts = []
        for n in self.names:  # elements whose Fisher is at rounding level carry no information
            keep = (se[n] > 0) & (fisher[n] > torch.finfo(self.dtypes[n]).eps * top)
            parts.append((g[n] / se[n])[keep].reshape(-1))
        z = torch.cat(parts)
        if z.numel() == 0:
            return {"n": 0, "mean_z2": math.nan, "max_abs_z": math.nan}
        return {
            "n": int(z.numel()),
            "mean_z2": float(z.square().mean()),  # sync-ok: explicit read
            "max_abs_z": float(z.abs().max()),  # sync-ok: explicit read
        }
