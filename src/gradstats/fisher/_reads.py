r"""Reading a collector: the Fisher, its decomposition, group quantities and standard errors.

Everything returned is a fresh tensor; values are float64 internally and returned in the
parameter's dtype (float32 for bf16/fp16 parameters — never fp16, where values below 6e-8
underflow) unless ``dtype`` says otherwise. Reads that return Python numbers (``counts``,
``score_check``) are explicit host reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from gradstats._validation import check_choice
from gradstats.fisher._groups import GroupFamily, GroupMap
from gradstats.fisher._state import COUNT_KEYS, FisherState

__all__ = ["FisherReads"]

NORMALIZATIONS = ("unit", "sample", "token", "none")
GROUP_KINDS = ("trace", "mask")


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class FisherReads:
    """Read-side methods shared by live and loaded collectors."""

    kind: str
    unit: str
    mode: str
    group_map: GroupMap | None
    _state: FisherState
    _unit_families: list[GroupFamily]
    _dtypes: dict[str, torch.dtype]

    def _setup(self, shapes, device, per_unit: bool) -> None:
        from gradstats.fisher._collector import fingerprint

        families = self.group_map.families if self.group_map is not None else []
        self._unit_families = [f for f in families if f.per_unit] if per_unit else []
        self._state = FisherState(
            shapes,
            device,
            unit=self.unit,
            mode=self.mode,
            beta=self.beta,
            signal=self.collect_signal,
            element_se=self.element_se,
            families=[(f.name, f.size) for f in self._unit_families],
        )
        self._fingerprint = fingerprint(shapes)

    # ------------------------------------------------------------------ spec
    def spec(self) -> dict[str, object]:
        """What was estimated, how, and on which parameters (stored in every saved file)."""
        likelihood = getattr(self, "likelihood", None)
        config = likelihood.config() if likelihood is not None else dict(self._likelihood_config)
        return {
            "kind": self.kind,
            "likelihood": config["likelihood"],
            "likelihood_config": config,
            "unit": self.unit,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "mode": self.mode,
            "beta": self.beta,
            "signal": self.collect_signal,
            "element_se": self.element_se,
            "groups": None if self.group_map is None else self.group_map.source,
            "fingerprint": self._fingerprint,
            "statistics_dtype": "float64",
            "storage_dtype": "float32",
            "estimand": _ESTIMANDS[self.kind],
        }

    @property
    def names(self) -> list[str]:
        return list(self._state.shapes)

    @property
    def counts(self) -> dict[str, int]:
        """{"samples", "tokens", "units", "batches", "rejected"} as Python ints (host read)."""
        values = {k: round(self._state.counts[k].item()) for k in COUNT_KEYS[:4]}  # sync-ok
        values["units"] = values["samples" if self.unit == "sample" else "tokens"]
        return values

    def _out(self, name: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return value.to(dtype or _result_dtype(self._dtypes[name]))

    # ----------------------------------------------------------------- Fisher
    def fisher(
        self, normalization: str = "unit", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """{parameter name: F} with F_jj = Σ_units x_ij / (normalizer).

        ``normalization``: ``"unit"`` (the mean over units: the Fisher), ``"sample"`` (per
        sequence), ``"token"`` (per active target) or ``"none"`` (the sum Σ_units x_ij).
        ``kind="batch_grad_sq"`` is always the mean over batches of (ḡ_B)². In ``mode="ema"``
        only the mean over units exists (an EMA of per-batch means has no sum, and rescaling
        it by a ratio of total counts would mix every batch's weights): ``"unit"`` or the name
        of the unit itself; any other normalization is a ``ValueError``.
        """
        self._check_normalization(normalization)
        state = self._state
        out = {}
        for name in state.shapes:
            if self.kind == "batch_grad_sq":
                batches = state.counts["batches"]
                value = torch.where(batches > 0, state.g2_sum[name] / batches, float("nan"))
            else:
                value = state.fisher(name, normalization)
            out[name] = self._out(name, value, dtype)
        return out

    def _check_normalization(self, normalization: str) -> None:
        check_choice("normalization", normalization, NORMALIZATIONS)
        if self.mode == "ema" and normalization not in ("unit", self.unit):
            raise ValueError(
                f"normalization={normalization!r} is not available in mode='ema' (an EMA of "
                f"per-batch means over units has no sum to renormalise); use normalization="
                f"'unit' (or {self.unit!r}), or mode='cumulative'"
            )

    def _need_signal(self) -> None:
        if not self.collect_signal:
            raise ValueError(
                "the mean gradient was not collected: construct with signal=True and "
                "kind='empirical' or 'mc' (for kind='exact' the mean score is 0 by definition)"
            )

    def mean_gradient(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ} = Σ_{i,k} w_k g_ik / N, the mean per-unit gradient."""
        self._need_signal()
        return {n: self._out(n, self._state.mean_gradient(n), dtype) for n in self.names}

    def signal(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: ḡ²}: the squared mean gradient, the first term of EF = ḡ² + Var."""
        self._need_signal()
        return {n: self._out(n, self._state.mean_gradient(n).square(), dtype) for n in self.names}

    def variance(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: Var} = F − ḡ²: the population variance of the per-unit gradients."""
        self._need_signal()
        state = self._state
        return {
            n: self._out(n, state.fisher(n) - state.mean_gradient(n).square(), dtype)
            for n in self.names
        }

    def standard_error(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: SE(F_jj)} = sqrt(Var_i(x_ij) / N) with units as observations."""
        if not self.element_se:
            raise ValueError(
                "elementwise standard errors need element_se=True at construction; group "
                "standard errors: group_standard_error()"
            )
        return {n: self._out(n, self._state.fisher_standard_error(n), dtype) for n in self.names}

    def mean_gradient_standard_error(self) -> dict[str, torch.Tensor]:
        """{name: SE(ḡ)} with the (unit, draw) pairs as observations (float64)."""
        self._need_signal()
        return {n: self._state.mean_gradient_standard_error(n) for n in self.names}

    def score_check(self) -> dict[str, float]:
        """Self-check of sampled labels: z_j = ḡ_j / SE(ḡ_j) over all elements with SE > 0 and
        F_jj above rounding level (F_jj > ε · the largest F_jj of all parameters).

        For ``kind="mc"`` the score has mean zero, so ``mean_z2`` ≈ 1 and ``max_abs_z`` stays
        at the size of the largest of n standard normals (≈ sqrt(2 ln n)). A sampler that draws
        labels at the wrong position, or data labels away from an optimum, gives mean_z2 ≫ 1.
        """
        g, se = self.mean_gradient(torch.float64), self.mean_gradient_standard_error()
        fisher = self.fisher(dtype=torch.float64)
        top = torch.stack([f.max() for f in fisher.values()]).max()
        parts = []
        for n in self.names:  # elements whose Fisher is at rounding level carry no information
            keep = (se[n] > 0) & (fisher[n] > torch.finfo(self._dtypes[n]).eps * top)
            parts.append((g[n] / se[n])[keep].reshape(-1))
        z = torch.cat(parts)
        if z.numel() == 0:
            return {"n": 0, "mean_z2": math.nan, "max_abs_z": math.nan}
        return {
            "n": int(z.numel()),
            "mean_z2": float(z.square().mean()),  # sync-ok: explicit read
            "max_abs_z": float(z.abs().max()),  # sync-ok: explicit read
        }

    # ---------------------------------------------------------------- groups
    @property
    def families(self) -> list[GroupFamily]:
        return [] if self.group_map is None else list(self.group_map.families)

    def _need_groups(self) -> GroupMap:
        if self.group_map is None:
            raise ValueError("no group map: construct with groups='auto' or a GroupMap")
        return self.group_map

    def group_names(self) -> dict[str, list[str]]:
        out = {f.name: f.group_names() for f in self._need_groups().families}
        if self.group_map.unmapped:
            out["unmapped"] = list(self.group_map.unmapped)
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
        groups = self._need_groups()
        if kind == "trace":
            fisher = self.fisher(normalization, dtype=torch.float64)
            out = {f.name: _family_trace(f, fisher) for f in groups.families}
            if groups.unmapped:
                out["unmapped"] = torch.stack([fisher[n].sum() for n in groups.unmapped])
            return out
        if self.kind == "batch_grad_sq":
            raise ValueError("kind='batch_grad_sq' has no per-unit values: no 'mask' quantity")
        state = self._state
        scale = state.units / state.norm(normalization) if self.mode == "cumulative" else 1.0
        out = {}
        for fam in self._unit_families:
            mean = state.mask[fam.name].mean if self.mode == "cumulative" else None
            mean = state.mask_ema[fam.name].mean if mean is None else mean
            out[fam.name] = mean * scale
        return out

    def group_standard_error(self, kind: str = "trace") -> dict[str, torch.Tensor]:
        """{family: SE [G]} of the per-unit group values (units are the observations)."""
        check_choice("kind", kind, GROUP_KINDS)
        self._need_groups()
        if self.mode != "cumulative" or self.kind == "batch_grad_sq":
            raise ValueError("group standard errors need mode='cumulative' per-unit statistics")
        stats = self._state.trace if kind == "trace" else self._state.mask
        return {f.name: stats[f.name].standard_error() for f in self._unit_families}

    def relative_standard_error(
        self, kind: str = "trace", families: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """{family: SE / mean [G]}; 0/0 (a group never active) reads 0, x/0 reads inf."""
        se = self.group_standard_error(kind)
        stats = self._state.trace if kind == "trace" else self._state.mask
        names = list(se) if families is None else list(families)
        unknown = [n for n in names if n not in se]
        if unknown:
            raise ValueError(f"families: unknown or without per-unit values: {unknown[:3]}")
        out = {}
        for name in names:
            mean = stats[name].mean.abs()
            rel = torch.where(mean > 0, se[name] / mean.clamp(min=1e-300), math.inf)
            out[name] = torch.where((mean == 0) & (se[name] == 0), 0.0, rel)
        return out

    # ------------------------------------------------------------ persistence
    def save(self, path):
        """Write a safetensors file: float32 Fisher / mean gradient / group traces, the float64
        sufficient statistics, and the spec (kind, likelihood, unit, counts, dtypes, model
        fingerprint) in the metadata. Returns the path."""
        from gradstats.fisher._io import save_collector

        return save_collector(self, path)

    @classmethod
    def load(cls, path, model=None, *, likelihood=None, device=None):
        """Read a file written by :meth:`save`.

        Without ``model`` the result can be read, merged and saved; with ``model`` (whose
        parameters must match the file's fingerprint) it keeps collecting. A callable likelihood
        must be passed again as ``likelihood``.
        """
        from gradstats.fisher._io import load_collector

        return load_collector(cls, path, model, likelihood, device)

    # ------------------------------------------------------------- streaming
    def collect_loader(
        self,
        loader: Iterable,
        *,
        max_batches: int | None = None,
        until_rel_se: float | None = None,
        families: Sequence[str] | None = None,
        se_kind: str = "trace",
        min_batches: int = 2,
        progress: bool = True,
        device: torch.device | str | None = None,
        distributed: bool = False,
        group: object | None = None,
    ):
        """Collect every batch of ``loader`` (or fewer), with a tqdm progress bar.

        A batch is ``(inputs, targets)``, a mapping (``labels`` become the targets, the rest the
        keyword inputs) or an inputs tensor; with ``device`` its tensors are moved there first.
        With ``until_rel_se=r`` the loop stops once every group of interest (``families``;
        default: all families with per-unit values, i.e. not token rows) has SE/mean below r
        after at least ``min_batches`` batches — checking reads the standard errors to the host
        once per batch.

        ``distributed=True`` (under an initialised ``torch.distributed`` process group of W
        ranks; one rank otherwise): every rank iterates the *same* loader, rank r collects the
        batches b with b mod W = r (``max_batches`` counts the batches of all ranks) and the
        statistics are all-reduced at the end, so every rank holds the result of one process on
        all the batches. A loader that is already sharded per rank (``DistributedSampler``)
        should use ``distributed=False`` followed by :meth:`all_reduce`.
        """
        if until_rel_se is not None:
            if not (isinstance(until_rel_se, (int, float)) and until_rel_se > 0):
                raise ValueError(f"until_rel_se must be a positive number; got {until_rel_se!r}")
            if distributed:
                raise ValueError(
                    "until_rel_se cannot be combined with distributed=True (ranks would stop at "
                    "different batches); collect a fixed max_batches instead"
                )
            self.relative_standard_error(se_kind, families)  # validates before any work
        if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 0):
            raise ValueError(f"max_batches must be a non-negative int or None; got {max_batches!r}")
        rank, world = _rank_and_world(group) if distributed else (0, 1)
        bar = tqdm(total=max_batches, desc="fisher", disable=not progress, leave=False)
        seen = 0
        try:
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                if index % world != rank:
                    bar.update(1)
                    continue
                inputs, targets = _split_batch(batch)
                if device is not None:
                    inputs, targets = _to_device(inputs, device), _to_device(targets, device)
                self.collect(inputs, targets)
                seen += 1
                bar.update(1)
                if until_rel_se is not None and seen >= min_batches:
                    rel = self.relative_standard_error(se_kind, families)
                    worst = max((float(v.max()) for v in rel.values()), default=0.0)  # sync-ok
                    bar.set_postfix(rel_se=f"{worst:.3g}")
                    if worst < until_rel_se:
                        break
        finally:
            bar.close()
        if distributed and world > 1:
            self.all_reduce(group)
        return self


def _rank_and_world(group: object | None) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _to_device(value: object, device: torch.device | str) -> object:
    """``value`` with every tensor (also inside mappings, tuples and lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _split_batch(batch: object) -> tuple[object, object]:
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(
        "a loader batch must be (inputs, targets), a mapping (labels -> targets) or a tensor; "
        f"got {type(batch).__name__}"
    )


def _family_trace(fam: GroupFamily, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    value = torch.zeros(
        fam.size + 1, dtype=torch.float64, device=next(iter(fisher.values())).device
    )
    for m in fam.members:
        f = fisher[m.param]
        dims = [d for d in range(f.dim()) if d != m.axis]
        marginal = f.sum(dims) if dims else f
        assign = torch.tensor(m.assign, device=f.device)
        value.index_add_(0, torch.where(assign < 0, fam.size, assign), marginal)
    return value[: fam.size]


_ESTIMANDS = {
    "empirical": "EF_jj = (1/N) Σ_i g_ij² at the data labels",
    "mc": "F_jj ≈ (1/N) Σ_i (1/K) Σ_k g_ikj², labels y_ik ~ p_θ(·|x_i)",
    "exact": "F_jj = (1/N) Σ_i diag(J_iᵀ Λ_i J_i)_j (expectation over labels in closed form)",
    "batch_grad_sq": "(1/#batches) Σ_B (ḡ_B)_j²: mistaken, E = μ² + σ²/m, not the Fisher",
}
