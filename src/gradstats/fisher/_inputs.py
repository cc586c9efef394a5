"""The collector's inputs: calling the model on a batch, the batch size, one row per sample of
a module call (:func:`batch_rows`), and the selection of the parameters to collect."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["batch_rows", "batch_size", "call_model", "check_device", "select_parameters"]


def check_device(name: str, device: object) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None); a ConfigurationError otherwise."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as error:
            raise ConfigurationError(
                f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0'; "
                f"got {device!r}"
            ) from error
    raise ConfigurationTypeError(
        f"{name} must be a torch.device, a device string or None; got {type(device).__name__}"
    )


def call_model(model: nn.Module, inputs: object) -> object:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise ConfigurationTypeError(
        f"inputs must be a tensor, a mapping of keyword arguments or a tuple of positional "
        f"arguments; got {type(inputs).__name__}"
    )


def batch_size(inputs: object) -> int:
    """B from the first tensor of the inputs (0 when there is none)."""
    if isinstance(inputs, torch.Tensor):
        leaves = [inputs]
    elif isinstance(inputs, Mapping):
        leaves = list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        leaves = list(inputs)
    else:
        leaves = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return 0


def select_parameters(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if params is None:
        selected = {n: p for n, p in named.items() if p.requires_grad}
    else:
        if isinstance(params, str) or not isinstance(params, Iterable):
            raise ConfigurationTypeError(
                "params must be an iterable of parameter names or None; got "
                f"{type(params).__name__}"
            )
        selected = {}
        for name in params:
            if name not in named:
                known = ", ".join(list(named)[:6])
                raise ConfigurationError(
                    f"params: unknown parameter {name!r} (the model has: {known}"
                    f"{', ...' if len(named) > 6 else ''})"
                )
            if not named[name].requires_grad:
                raise ConfigurationError(f"params: {name!r} does not require grad")
            selected[name] = named[name]
    if not selected:
        raise ConfigurationError(
            "the model has no parameter that requires grad: nothing to collect"
        )
    devices = {p.device for p in selected.values()}
    if len(devices) > 1:
        raise ConfigurationError(f"parameters live on several devices {sorted(map(str, devices))}")
    bad = [n for n, p in selected.items() if not p.is_floating_point()]
    if bad:
        raise ConfigurationTypeError(
            f"params must be floating; {bad[0]!r} is {selected[bad[0]].dtype}"
        )
    return selected


def _expand(value: object, batch: int) -> object:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    return value


def batch_rows(
    output: torch.Tensor | tuple, args: tuple, kwargs: dict, batch: int
) -> tuple[torch.Tensor | tuple, tuple, dict, list[torch.Tensor], bool]:
    """A module's call as one row per sample: (output, args, kwargs, the outputs that need a
    gradient, whether the call was expanded).

    A module called on a batch of one while the model's batch has ``batch`` > 1 rows (e.g.
    position embeddings of ``position_ids`` [1, T], broadcast when added) has its output and
    its batch-of-one arguments expanded to ``batch`` rows (a forward hook then returns the
    expanded output).
    """
    expanded = False
    if (
        isinstance(output, torch.Tensor)
        and batch > 1
        and output.dim() > 0
        and output.shape[0] == 1
        and output.requires_grad
    ):
        output = output.expand(batch, *output.shape[1:])
        args = tuple(_expand(a, batch) for a in args)
        kwargs = {k: _expand(v, batch) for k, v in kwargs.items()}
        expanded = True
    outputs = [output] if isinstance(output, torch.Tensor) else list(output)
    tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return output, args, kwargs, tensors, expanded
