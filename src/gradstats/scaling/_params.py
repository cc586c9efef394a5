"""Turn what users pass as ``params`` into names, tensors and param-group membership.

Accepted: an iterable of tensors (named ``"0"``, ``"1"``, ...), of ``(name, tensor)`` pairs
(``model.named_parameters()``), or of param-group dicts whose ``"params"`` holds either (the
optimizer's ``param_groups`` format; tensors are then named ``"<group>.<i>"``). Tensors that do
not require gradients are frozen and left out. Membership in param groups comes from the dicts,
or from ``optimizer.param_groups`` matched by tensor identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["ParamLayout", "layout_from"]


@dataclass(frozen=True)
class ParamLayout:
    """Tensors ordered so that each device's tensors are contiguous."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    group_of: tuple[int, ...]  # param-group index of each tensor
    groups: int
    devices: tuple[torch.device, ...]  # one per contiguous device block
    blocks: tuple[tuple[int, int], ...]  # [start, stop) of each device block

    def index(self, name: str) -> int:
        return self.names.index(name)

    def grads(self) -> list[torch.Tensor | None]:
        """The current ``.grad`` of every tensor, in order (read in C: at every step)."""
        return list(map(_GRAD, self.tensors))


_GRAD = attrgetter("grad")


def _entries(params: object) -> list[tuple[str, torch.Tensor, int]]:
    if isinstance(params, torch.Tensor):
        raise ConfigurationTypeError(
            "params must be an iterable of tensors, (name, tensor) pairs or param-group dicts; "
            "got a single tensor (wrap it in a list)"
        )
    if not isinstance(params, Iterable):
        raise ConfigurationTypeError(f"params must be an iterable; got {type(params).__name__}")
    entries: list[tuple[str, torch.Tensor, int]] = []
    items = list(params)
    grouped = bool(items) and all(isinstance(item, dict) for item in items)
    groups = items if grouped else [{"params": items}]
    for g, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise ConfigurationTypeError("params mixes param-group dicts with other entries")
        for i, item in enumerate(group["params"]):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, tensor = item
            elif isinstance(item, torch.Tensor):
                name, tensor = (f"{g}.{i}" if grouped else str(i)), item
            else:
                raise ConfigurationTypeError(
                    "params entries must be tensors or (name, tensor) pairs; "
                    f"got {type(item).__name__}"
                )
            if not isinstance(tensor, torch.Tensor):
                raise ConfigurationTypeError(
                    f"params[{name!r}] is not a tensor; got {type(tensor).__name__}"
                )
            entries.append((name, tensor, g))
    return entries


def layout_from(params: object, optimizer: torch.optim.Optimizer | None = None) -> ParamLayout:
    """Validate ``params`` and order them by device (stable)."""
    entries = [e for e in _entries(params) if e[1].requires_grad]
    if not entries:
        raise ConfigurationError("params holds no tensor that requires a gradient")
    names = [name for name, _, _ in entries]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigurationError(f"params has the name {duplicate!r} twice")
    if len({id(t) for _, t, _ in entries}) != len(entries):
        raise ConfigurationError("params holds the same tensor twice")
    for name, tensor, _ in entries:
        if not tensor.is_floating_point():
            raise ConfigurationTypeError(
                f"params[{name!r}] has dtype {tensor.dtype}; gradients must be floating"
            )
    if optimizer is not None:
        owner = {
            id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]
        }
        missing = [name for name, t, _ in entries if id(t) not in owner]
        if missing:
            raise ConfigurationError(f"optimizer does not hold these params: {missing[:5]}")
        entries = [(name, t, owner[id(t)]) for name, t, _ in entries]
        groups = len(optimizer.param_groups)
    else:
        groups = max(g for _, _, g in entries) + 1
    devices: list[torch.device] = []
    for _, tensor, _ in entries:
        if tensor.device not in devices:
            devices.append(tensor.device)
    ordered = sorted(entries, key=lambda e: devices.index(e[1].device))
    blocks, start = [], 0
    for device in devices:
        stop = start + sum(1 for e in ordered if e[1].device == device)
        blocks.append((start, stop))
        start = stop
    return ParamLayout(
        names=tuple(e[0] for e in ordered),
        tensors=tuple(e[1] for e in ordered),
        group_of=tuple(e[2] for e in ordered),
        groups=groups,
        devices=tuple(devices),
        blocks=tuple(blocks),
    )
