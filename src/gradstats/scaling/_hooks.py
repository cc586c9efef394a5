"""Which gradients are new, and the micro-batches of one step: the scaler's parameter hooks.

* A post-accumulate hook on every parameter counts gradient accumulations; with the identity of
  every ``.grad`` this makes a *token* of the current gradients, so that ``step()`` reads each
  new set of gradients exactly once (and never the scaled or clipped ones afterwards).
* ``statistic="same_point"``: a tensor hook sees each backward's contribution h before it is
  accumulated (and, under DDP, before the all-reduce) and stages ‖h‖²; the post-accumulate hook
  commits it once it reached ``.grad``, so ``torch.autograd.grad`` calls never count.
* ``statistic="per_sample"``: hooks on the model's modules (:mod:`gradstats.scaling._per_sample`)
  record Σ_i ‖c_i‖² of the per-unit contributions of each backward; the counting hook tells
  them which tensors' contributions reached ``.grad`` (one Python hook per tensor).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from gradstats.scaling._params import ParamLayout
from gradstats.scaling._per_sample import PerSampleHooks, PerSampleState
from gradstats.scaling._same_point import SamePointState
from gradstats.scaling._state import StatisticState

__all__ = ["GradientTracker"]


class GradientTracker:
    """The hooks one scaler puts on its parameters."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.events = 0  # gradient accumulations seen
        self.capture = True  # record same-point micro-batches / per-sample norms
        self.modules: PerSampleHooks | None = None

    def register(
        self,
        layout: ParamLayout,
        states: Sequence[StatisticState],
        model: nn.Module | None = None,
        unit: str = "sample",
    ) -> None:
        """(Re)attach the hooks to ``layout``'s tensors (removing any previous ones); with
        ``statistic="per_sample"`` states, also to ``model``'s modules."""
        self.remove()
        self.events = 0
        owner = weakref.ref(self)
        per_sample = [s for s in states if isinstance(s, PerSampleState)]
        if per_sample:
            capture = functools.partial(_capturing, owner)
            self.modules = PerSampleHooks(model, layout, per_sample, unit, capture)  # type: ignore[arg-type]
        handled = set() if self.modules is None else self.modules.handled
        for name, tensor in zip(layout.names, layout.tensors, strict=True):
            count = functools.partial(_count_hook, owner, name if name in handled else None)
            self._handles.append(tensor.register_post_accumulate_grad_hook(count))
        for (start, stop), state in zip(layout.blocks, states, strict=True):
            if not isinstance(state, SamePointState) or not state.parameter_hooks:
                continue
            for local, tensor in enumerate(layout.tensors[start:stop]):
                stage = functools.partial(_stage_hook, owner, state, local)
                commit = functools.partial(_commit_hook, owner, state, local)
                self._handles.append(tensor.register_hook(stage))
                self._handles.append(tensor.register_post_accumulate_grad_hook(commit))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.modules is not None:
            self.modules.remove()
            self.modules = None

    def token(self, layout: ParamLayout) -> tuple[object, ...]:
        """Identifies the current gradients: hook events plus the identity of every ``.grad``
        (``id(None)`` where there is none; iterated in C: this runs twice per step)."""
        return (self.events, tuple(map(id, layout.grads())))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        previous, self.capture = self.capture, False
        try:
            yield
        finally:
            self.capture = previous


def _capturing(owner: weakref.ref[GradientTracker]) -> bool:
    tracker = owner()
    return tracker is not None and tracker.capture


def _count_hook(
    owner: weakref.ref[GradientTracker], name: str | None, _param: torch.Tensor
) -> None:
    """A gradient was accumulated into ``.grad``; ``name``: the tensor's, where per-sample
    hooks feed it (they count a backward's contribution only once it reached ``.grad``)."""
    tracker = owner()
    if tracker is not None:
        tracker.events += 1
        if name is not None and tracker.capture and tracker.modules is not None:
            tracker.modules.reached(name)


def _stage_hook(
    owner: weakref.ref[GradientTracker], state: SamePointState, index: int, grad: torch.Tensor
) -> None:
    tracker = owner()
    if tracker is not None and tracker.capture:
        state.stage(index, grad)


def _commit_hook(
    owner: weakref.ref[GradientTracker], state: SamePointState, index: int, _param: torch.Tensor
) -> None:
    tracker = owner()
    if tracker is not None and tracker.capture:
        state.commit(index)
