"""Plugging the scaler into training loops: a plain loop, and loops we do not own.

* :func:`optimizer_step` finishes a step of a loop you write, in the recommended order.
* :func:`attach` puts the scaler into a loop you do not control (stable-baselines3, trainers):
  statistics are read at the end of every backward pass — before the loop clips — and the
  factor is applied inside every ``optimizer.step()`` through the optimizer's step hooks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradstats.scaling._scaler import VarianceGradientScaler

__all__ = ["Attachment", "attach", "optimizer_step"]


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: VarianceGradientScaler,
    *,
    grad_scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> torch.Tensor | None:
    """Everything after ``loss.backward()`` (or ``grad_scaler.scale(loss).backward()``):

    1. AMP: ``grad_scaler.unscale_(optimizer)`` — the statistics need unscaled gradients;
    2. ``scaler.step(grad_scaler=...)`` — statistics from the raw gradients (a non-finite AMP
       step is skipped on the device and changes nothing);
    3. ``clip_grad_norm_(max_grad_norm)`` on the raw gradients, if asked;
    4. the factor for this step (``scaler.apply``: gradients or learning rates) around
       ``grad_scaler.step(optimizer)`` / ``optimizer.step()``;
    5. ``grad_scaler.update()``.

    Returns the total gradient norm before clipping when ``max_grad_norm`` is given.

    Example:
        >>> import torch
        >>> from gradstats import VarianceGradientScaler
        >>> from gradstats.scaling import optimizer_step
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> vgs = VarianceGradientScaler(model.named_parameters(), apply_to="lr", optimizer=opt)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()
        >>> _ = optimizer_step(opt, vgs, max_grad_norm=1.0)
    """
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.unscale_(optimizer)
    scaler.step(grad_scaler=grad_scaler)
    norm = None
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    with scaler.apply(optimizer):
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scaler.step(optimizer)
        else:
            optimizer.step()
    if grad_scaler is not None and grad_scaler.is_enabled():
        grad_scaler.update()
    return norm


@dataclass
class Attachment:
    """Handles of :func:`attach`; ``remove()`` detaches the scaler from the loop."""

    scaler: VarianceGradientScaler
    ends_step: Callable[[], bool] | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    _context: contextlib.AbstractContextManager[None] | None = None
    _queued: bool = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _end_of_backward(attachment: Attachment) -> None:
    attachment._queued = False
    if attachment.ends_step is None or attachment.ends_step():
        attachment.scaler.step(**attachment.step_kwargs)


def _on_accumulate(attachment: Attachment, _tensor: torch.Tensor) -> None:
    if not attachment._queued:
        attachment._queued = True
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(functools.partial(_end_of_backward, attachment))


def _pre_step(attachment: Attachment, optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
    context = attachment.scaler.apply(optimizer)
    context.__enter__()
    attachment._context = context


def _post_step(attachment: Attachment, _optimizer, _args, _kwargs) -> None:
    if attachment._context is not None:
        context, attachment._context = attachment._context, None
        context.__exit__(None, None, None)


def attach(
    scaler: VarianceGradientScaler,
    optimizer: torch.optim.Optimizer,
    *,
    update_on_backward: bool | Callable[[], bool] = True,
    grad_scaler: torch.amp.GradScaler | None = None,
    scaled: bool = False,
) -> Attachment:
    """Run the scaler inside a training loop you do not control.

    With ``update_on_backward=True`` the statistics are read when each backward pass ends
    (before the loop clips); that fits loops where every ``optimizer.step()`` follows one
    backward. With gradient accumulation pass a predicate instead, called at the end of every
    backward, that says whether this backward completes the step (e.g. accelerate's
    ``GradientState().sync_gradients``). ``grad_scaler``/``scaled`` are handed to
    :meth:`VarianceGradientScaler.step` (``scaled=True``: the loop unscales only later, when it
    clips). Every ``optimizer.step()`` then runs with the factor applied (``scaler.apply``:
    gradients scaled, or learning rates scaled and restored afterwards). The optimizer must not
    evaluate a closure that runs backward inside ``step()`` (use the loop's own hooks then).

    Example:
        >>> import torch
        >>> from gradstats import VarianceGradientScaler
        >>> from gradstats.scaling import attach
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> vgs = VarianceGradientScaler(model.named_parameters(), apply_to="lr", optimizer=opt)
        >>> handle = attach(vgs, opt)
        >>> model(torch.randn(4, 3)).pow(2).mean().backward()  # statistics read here
        >>> opt.step()  # the factor is applied here
        >>> vgs.updates
        1
        >>> handle.remove()
    """
    ends_step = update_on_backward if callable(update_on_backward) else None
    step_kwargs = {"grad_scaler": grad_scaler, "scaled": scaled}
    attachment = Attachment(scaler, ends_step, step_kwargs)
    if update_on_backward:
        hook = functools.partial(_on_accumulate, attachment)
        for tensor in scaler.layout.tensors:
            attachment.handles.append(tensor.register_post_accumulate_grad_hook(hook))
    pre = functools.partial(_pre_step, attachment)
    attachment.handles.append(optimizer.register_step_pre_hook(pre))
    attachment.handles.append(
        optimizer.register_step_post_hook(functools.partial(_post_step, attachment))
    )
    return attachment
