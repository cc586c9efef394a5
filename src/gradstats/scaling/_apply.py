"""Where the factor goes: multiplying gradients, or each param group's learning rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.scaling._params import ParamLayout

__all__ = ["located_gradients", "multiply_gradients", "scaled_learning_rates", "warn_if_adaptive"]

_ADAPTIVE = (
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Adagrad",
    "Adadelta",
    "RMSprop",
    "Adafactor",
)


def warn_if_adaptive(apply_to: str, optimizer: torch.optim.Optimizer) -> None:
    """Gradient scaling is (mostly) divided out by Adam-family optimizers: say so."""
    if apply_to == "grad" and type(optimizer).__name__ in _ADAPTIVE:
        warn(
            f"apply_to='grad' with {type(optimizer).__name__}: an adaptive optimizer divides "
            "out a gradient factor that is roughly constant over its second-moment window; "
            "use apply_to='lr' to change its step size"
        )


def multiply_gradients(layout: ParamLayout, factors: torch.Tensor, shared: bool) -> None:
    """g_j ← c_j g_j in place for every tensor with a gradient (one foreach call per device).

    ``factors`` has one entry per tensor (on the first device); ``shared`` means they are all
    the same (global aggregate), which uses the single-tensor foreach overload.
    """
    for device, (start, stop) in zip(layout.devices, layout.blocks, strict=True):
        local = factors[start:stop].to(device)
        pairs = [
            (t.grad, j) for j, t in enumerate(layout.tensors[start:stop]) if t.grad is not None
        ]
        if not pairs:
            continue
        grads = [g for g, _ in pairs]
        if shared:
            torch._foreach_mul_(grads, local[0].to(grads[0].dtype))
        else:
            torch._foreach_mul_(grads, [local[j].to(g.dtype) for g, j in pairs])


@contextlib.contextmanager
def scaled_learning_rates(
    optimizer: torch.optim.Optimizer, factors: torch.Tensor
) -> Iterator[None]:
    """Multiply group k's ``lr`` by ``factors[k]`` inside the block; restore the originals after.

    A tensor ``lr`` is multiplied on the device; a float ``lr`` needs the factors on the host
    (one read for all groups).
    """
    saved = [group["lr"] for group in optimizer.param_groups]
    host: list[float] = []
    if any(not isinstance(lr, torch.Tensor) for lr in saved):
        host = factors.tolist()  # sync-ok: a float lr needs the factor on the host
    try:
        for k, (group, lr) in enumerate(zip(optimizer.param_groups, saved, strict=True)):
            if isinstance(lr, torch.Tensor):
                group["lr"] = lr * factors[k].to(device=lr.device, dtype=lr.dtype)
            else:
                group["lr"] = lr * host[k]
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr


def located_gradients(layout: ParamLayout, grads: object) -> list[tuple[int, int, torch.Tensor]]:
    """(device block, index in block, gradient) for gradients given by name (dict) or position."""
    names = layout.names
    if isinstance(grads, dict):
        unknown = [k for k in grads if k not in names]
        if unknown:
            raise ConfigurationError(f"grads has names the scaler does not track: {unknown[:5]}")
        items = [(names.index(k), v) for k, v in grads.items()]
    else:
        if not isinstance(grads, Iterable) or isinstance(grads, (str, torch.Tensor)):
            raise ConfigurationTypeError(
                "grads must be a dict by parameter name or a list in params order; got "
                f"{type(grads).__name__}"
            )
        listed = list(grads)
        if len(listed) != len(names):
            raise ConfigurationError(
                f"grads must have one entry per tracked tensor ({len(names)}); got {len(listed)}"
            )
        items = list(enumerate(listed))
    located = []
    for j, grad in items:  # every entry is checked before the caller records any of them
        if grad is None:
            continue
        param = layout.tensors[j]
        if not isinstance(grad, torch.Tensor):
            raise ConfigurationTypeError(
                f"grads[{names[j]!r}] must be a torch.Tensor or None; got {type(grad).__name__}"
            )
        if grad.shape != param.shape or grad.device != param.device:
            raise ConfigurationError(
                f"grads[{names[j]!r}] must have the parameter's shape {tuple(param.shape)} on "
                f"{param.device}; got {tuple(grad.shape)} on {grad.device}"
            )
        if not grad.is_floating_point():
            raise ConfigurationTypeError(
                f"grads[{names[j]!r}] must be a floating-point tensor; got {grad.dtype}"
            )
    for j, grad in items:
        if grad is None:
            continue
        block = next(b for b, (start, stop) in enumerate(layout.blocks) if start <= j < stop)
        located.append((block, j - layout.blocks[block][0], grad))
    return located
