r"""Combining and streaming on a collector: :meth:`merge` (Chan, exact and order-free; see
:class:`~gradstats.fisher.FisherResult`), :meth:`all_reduce` over ``torch.distributed`` ranks,
and :meth:`collect_loader` over a data loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch
from tqdm.auto import tqdm

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._inputs import check_device
from gradstats.fisher._reads import FisherReads
from gradstats.fisher._result import FisherResult

__all__ = ["Streaming"]


class Streaming(FisherReads):
    """Merge, all-reduce and loader streaming (see the module docstring)."""

    if TYPE_CHECKING:

        def collect(self, inputs: object, targets: torch.Tensor | None = None) -> Streaming: ...

    def merge(self, other: FisherReads | FisherResult) -> Streaming:
        """Fold ``other``'s statistics (a collector or a :class:`~gradstats.fisher.FisherResult`)
        into this collector: :meth:`FisherResult.merge`.

        Raises:
            ConfigurationTypeError: ``other`` is neither a collector nor a result.
            ConfigurationError: a ``mode="ema"`` collector (an EMA weights batches by arrival).
            StateError: the collectors estimate different things or cover different parameters
                or group families; nothing is changed.
        """
        self.result.merge(other)
        return self

    def all_reduce(self, group: object | None = None) -> Streaming:
        """Sum the statistics over ``torch.distributed`` ranks (every rank gets the result of
        all ranks' data; a no-op without an initialised process group)."""
        self.result.all_reduce(group)
        return self

    def collect_loader(
        self,
        loader: Iterable[object],
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
    ) -> Streaming:
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
        if not isinstance(loader, Iterable):
            raise ConfigurationTypeError(
                f"loader must be an iterable of batches; got {type(loader).__name__}"
            )
        device = check_device("device", device)
        if until_rel_se is not None:
            if (
                isinstance(until_rel_se, bool)
                or not isinstance(until_rel_se, (int, float))
                or not until_rel_se > 0
            ):
                raise ConfigurationError(
                    f"until_rel_se must be a positive number or None; got {until_rel_se!r}"
                )
            if distributed:
                raise ConfigurationError(
                    "until_rel_se cannot be combined with distributed=True (ranks would stop at "
                    "different batches); collect a fixed max_batches instead"
                )
            self.result._check_relative(se_kind, families)  # validates before any work
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0
        ):
            raise ConfigurationError(
                f"max_batches must be a non-negative int or None; got {max_batches!r}"
            )
        if isinstance(min_batches, bool) or not isinstance(min_batches, int) or min_batches < 1:
            raise ConfigurationError(f"min_batches must be an int >= 1; got {min_batches!r}")
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
                    inputs = _to_device(inputs, device)
                    targets = None if targets is None else targets.to(device, non_blocking=True)
                self.collect(inputs, targets)
                seen += 1
                bar.update(1)
                if until_rel_se is not None and seen >= min_batches:
                    rel = self.result._relative_standard_error(se_kind, families)
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
    process_group = cast("dist.ProcessGroup | None", group)
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _to_device(value: object, device: torch.device | str) -> object:
    """``value`` with every tensor (also inside mappings, tuples and lists) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _split_batch(batch: object) -> tuple[object, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    inputs: object
    if isinstance(batch, Mapping):
        inputs, targets = {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch[0], batch[1]
    else:
        raise ConfigurationTypeError(
            "a loader batch must be (inputs, targets), a mapping (labels -> targets) or a "
            f"tensor; got {type(batch).__name__}"
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise ConfigurationTypeError(
            f"a loader batch's targets must be a tensor or None; got {type(targets).__name__}"
        )
    return inputs, targets
