r"""``FisherResult``: the statistics of one Fisher collection and everything read from them.

A result owns the float64 sufficient statistics (counts, Σ_units x_ij with
x_ij = Σ_k w_k g_ikj², Σ g, M2 terms, per-family group moments), the :class:`FisherSpec` it was
collected under, the parameters' names, shapes and dtypes (and their fingerprint) and the group
map. It reads the Fisher F_jj = Σ_i x_ij / N (the mean over units; the reduction of the per-unit
loss is always a sum over the unit's targets, a mean-reduced loss is undone), its decomposition
EF = ḡ² + Var, standard errors and group quantities; it merges (Chan, exact, order-free),
all-reduces, saves and loads. A :class:`~gradstats.fisher.FisherCollector` holds one
(``fc.result``) and adds to it; :func:`load` returns one; :func:`~gradstats.fisher.resume` keeps
collecting into a copy of one.

Sums of per-unit statistics are additive, so merging A and B gives, for every statistic S,
S(A ∪ B) = S(A) + S(B) and for the M2 terms Chan's formula
M2 = M2_A + M2_B + δ² · n_A n_B / (n_A + n_B), δ = mean_B − mean_A.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher._group_reads import GroupReads
from gradstats.fisher._io import GENERATOR_KEY, read_saved, write_file

__all__ = ["FisherResult", "load"]

MERGE_KEYS = ("kind", "likelihood", "unit", "mode", "signal", "element_se", "fingerprint")


class FisherResult(GroupReads):
    r"""The statistics of a Fisher collection and their reads (see the module docstring).

    Built empty by a collector (``FisherResult(spec, shapes, dtypes, group_map=..., device=...)``)
    or read from a file by :func:`load`. Reads: :meth:`fisher`, :meth:`mean_gradient`,
    :meth:`signal`, :meth:`variance`, :meth:`standard_error`,
    :meth:`mean_gradient_standard_error`, :meth:`score_check`, :meth:`group_fisher`,
    :meth:`group_standard_error`, :meth:`relative_standard_error`, :attr:`counts`,
    :meth:`spec` (the dict stored in files) and :attr:`config` (the :class:`FisherSpec`).

    Example (per-sample gradients g = [1, −1, 2, 4]: EF = mean g² = 5.5):
        >>> import torch
        >>> from gradstats.fisher import FisherCollector
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> x, y = torch.ones(4, 1), torch.tensor([[0.0], [2.0], [-1.0], [-3.0]])
        >>> result = FisherCollector(model, "empirical", "regression").collect(x, y).result
        >>> result.fisher()["weight"].item(), result.counts["samples"], result.kind
        (5.5, 4, 'empirical')
    """

    #: ``kind="mc"``: the label generator's state when the collector saved (a CPU/CUDA
    #: ``Generator.get_state()``), stored in the file, so that :func:`resume` draws the labels
    #: an uninterrupted collection would have drawn; None otherwise
    generator_state: torch.Tensor | None = None

    def restored_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator on ``device`` in :attr:`generator_state` (None without one).

        Raises:
            StateError: the state is not one of a ``device`` generator (saved on another kind
                of device: pass ``generator=`` to ``resume``).
        """
        if self.generator_state is None:
            return None
        generator = torch.Generator(device=device)
        try:
            generator.set_state(self.generator_state.cpu())
        except RuntimeError:
            raise StateError(
                f"the saved mc generator state does not fit a {device.type} generator (it was "
                "saved on another kind of device); pass generator= to resume()"
            ) from None
        return generator

    def merge(self, other: object) -> FisherResult:
        """Fold ``other``'s statistics (a result, or a collector's) into this one (Chan; exact,
        order-free).

        Raises:
            ConfigurationTypeError: ``other`` is neither a result nor a collector.
            ConfigurationError: a ``mode="ema"`` result (an EMA weights batches by arrival).
            StateError: the results estimate different things or cover different parameters
                or group families; nothing is changed.
        """
        theirs = as_result(other, "other")
        if self.mode != "cumulative" or theirs.mode != "cumulative":
            raise ConfigurationError(
                "mode='ema' collectors do not merge: an EMA weights batches by arrival time; "
                "use mode='cumulative' to merge collectors"
            )
        mine, their_spec = self.spec(), theirs.spec()
        for key in MERGE_KEYS:
            if mine[key] != their_spec[key]:
                what = "parameters (names or shapes)" if key == "fingerprint" else key
                raise StateError(
                    f"cannot merge collectors with different {what}: {mine[key]!r} vs "
                    f"{their_spec[key]!r}"
                )
        families = [(f.name, f.size) for f in self.unit_families]
        if families != [(f.name, f.size) for f in theirs.unit_families]:
            raise StateError(
                "cannot merge collectors with different group families: "
                f"{[n for n, _ in families][:4]} vs {[f.name for f in theirs.unit_families][:4]}"
            )
        self.state.merge(theirs.state)
        return self

    def all_reduce(self, group: object | None = None) -> FisherResult:
        """Sum the statistics over ``torch.distributed`` ranks (every rank gets the result of
        all ranks' data; a no-op without an initialised process group)."""
        if self.mode != "cumulative":
            raise ConfigurationError(
                "mode='ema' summaries cannot be all-reduced; use mode='cumulative' under DDP"
            )
        self.state.all_reduce(group)
        return self

    def empty_like(self, device: torch.device | str | None = None) -> FisherResult:
        """A result with this one's spec, parameters and groups and no observation."""
        return FisherResult(
            self.config,
            self.state.shapes,
            self.dtypes,
            group_map=self.group_map,
            device=self.device if device is None else device,
        )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, object]:
        """A snapshot (copies) of everything the result holds: ``spec`` (with ``counts``) and
        ``tensors``, the float64 sufficient statistics by name (``mode="cumulative"`` only)."""
        tensors = {k: v.detach().clone() for k, v in self.state.tensors().items()}
        return {"spec": self.spec() | {"counts": dict(self.counts)}, "tensors": tensors}

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file: float32 Fisher / mean gradient / group traces, the float64
        sufficient statistics, and the spec (kind, likelihood, unit, counts, dtypes, model
        fingerprint) in the metadata. Returns the path (see :mod:`gradstats.fisher._io`)."""
        if self.mode != "cumulative":
            raise ConfigurationError(
                "mode='ema' collectors are not saved (an EMA is not a sufficient statistic); use "
                "mode='cumulative'"
            )
        tensors: dict[str, torch.Tensor] = {}
        if self.counts["batches"] > 0:  # an empty result saves (and loads) too
            for name, value in self._fisher("unit", torch.float32).items():
                tensors[f"fisher/{name}"] = value
            if self.config.signal:
                for name, value in self._mean_gradient(torch.float32).items():
                    tensors[f"mean_gradient/{name}"] = value
            if self.group_map is not None:
                for fam, value in self._group_fisher("trace", "unit").items():
                    tensors[f"group/{fam}"] = value.to(torch.float32)
        for key, value in self.state.tensors().items():
            tensors[f"state/{key}"] = value
        if self.generator_state is not None and self.config.estimand.sampled:
            tensors[GENERATOR_KEY] = self.generator_state.cpu()
        return write_file(
            path,
            spec=self.spec() | {"counts": dict(self.counts)},
            dtypes=self.dtypes,
            shapes=self.state.shapes,
            group_map=self.group_map,
            tensors=tensors,
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        likelihood: object = None,
        device: torch.device | str | None = None,
    ) -> FisherResult:
        """Read a file written by :meth:`save` (see :func:`load`)."""
        saved = read_saved(path, device)
        config = saved.config
        if likelihood is not None:
            try:
                config = config.with_likelihood(likelihood)
            except (ConfigurationError, ConfigurationTypeError) as error:
                raise ConfigurationError(
                    f"likelihood= does not fit {saved.where}: {error}"
                ) from None
        result = cls(
            config,
            saved.shapes,
            saved.dtypes,
            group_map=saved.group_map,
            device=saved.device or torch.device("cpu"),
        )
        result.state.load_tensors(saved.state, saved.where)  # validates; raises StateError
        result.generator_state = saved.generator_state
        return result


def as_result(value: object, what: str) -> FisherResult:
    """``value`` itself, or a collector's ``result``; a ConfigurationTypeError otherwise."""
    result = value if isinstance(value, FisherResult) else getattr(value, "result", None)
    if not isinstance(result, FisherResult):
        raise ConfigurationTypeError(
            f"{what} must be a FisherCollector or a FisherResult; got {type(value).__name__}"
        )
    return result


def load(
    path: str | Path,
    *,
    likelihood: object = None,
    device: torch.device | str | None = None,
) -> FisherResult:
    """Read a Fisher file (written by ``save()``) as a :class:`FisherResult`.

    ``likelihood``: the callable of a collection with a callable likelihood (files record it by
    name only); needed only to :func:`~gradstats.fisher.resume` collecting. ``device``: where the
    statistics go (default: the CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        StateError: the file is not a gradstats Fisher file, is damaged or tampered with (bad
            metadata, impossible statistics such as NaN sums or negative counts); nothing is
            loaded.
    """
    return FisherResult.load(path, likelihood=likelihood, device=device)
