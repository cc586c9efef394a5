r"""Apply group masks (heads, FFN neurons, channels) to a model, reversibly, through hooks.

A family's *mask quantity* is the Fisher of a multiplicative mask m_k on the output of group k:
∂L/∂m_k = Σ_{j ∈ mask set of k} θ_j g_j, where the mask set (``Member.in_mask``) is the slice
of a parameter that the group's output meets — for an attention head the columns of the output
projection that read the head's output (``o_proj`` / GPT-2 ``attn.c_proj`` rows), for an FFN
neuron the columns of the down projection, for an output channel the row of its own weight and
bias. :func:`apply_masks` multiplies exactly that: the input features of the output projection
(a forward pre-hook) or the output channels of the layer (a forward hook), feature f by
m[assign[f]] (1 for features outside every group). With m ∈ {0, 1} this gives the same logits
as zeroing the masked heads' slices of the output projection by hand; a real-valued m rescales
them (e.g. the least-squares mask rescaling of Kwon et al., 2022).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._groups import GroupFamily, GroupMap
from gradstats.fisher._handler import is_hf_conv1d

__all__ = ["MaskHandle", "apply_masks"]


class MaskHandle:
    """The hooks of :func:`apply_masks`; ``remove()`` (or leaving a ``with`` block) undoes them."""

    def __init__(self, hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _side(module: nn.Module, attr: str, axis: int, label: str) -> str:
    """``"input"`` or ``"output"``: which features of ``module`` the member's axis indexes."""
    if attr == "bias" and axis == 0:
        return "output"
    if attr == "weight" and isinstance(module, nn.Linear):
        return {0: "output", 1: "input"}[axis]
    if attr == "weight" and is_hf_conv1d(module):
        return {0: "input", 1: "output"}[axis]
    if attr == "weight" and isinstance(module, nn.modules.conv._ConvNd) and axis == 0:
        return "output"
    raise ConfigurationError(
        f"{label}: a mask on axis {axis} of {type(module).__name__}.{attr} cannot be applied "
        "by a hook (supported: Linear, Hugging Face Conv1D and convolution output channels)"
    )


def _families(groups: object) -> dict[str, GroupFamily]:
    group_map = getattr(groups, "group_map", groups)
    if not isinstance(group_map, GroupMap):
        raise ConfigurationTypeError(
            "groups must be a FisherCollector, a FisherResult or a GroupMap; got "
            f"{type(groups).__name__}"
        )
    return {f.name: f for f in group_map.families}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], groups: object) -> MaskHandle:
    """Multiply the output of every group k of each family in ``masks`` by ``masks[f][k]``.

    Args:
        model: the model the group map describes (e.g. a Hugging Face GPT-2 or Llama).
        masks: ``{family name: tensor [G]}`` (bool: True = keep, or real factors), e.g. the
            output of :func:`~gradstats.fisher.pruning_masks`.
        groups: the :class:`~gradstats.fisher.FisherCollector` (or its ``group_map``).

    Returns:
        A :class:`MaskHandle`; ``handle.remove()`` restores the model. Everything is validated
        before any hook is registered.

    Raises:
        ConfigurationError: an unknown family, a mask of the wrong length, or a family whose
            mask set cannot be reached by a hook.
    """
    families = _families(groups)
    plan: dict[tuple[nn.Module, str], torch.Tensor] = {}
    for name, mask in masks.items():
        if name not in families:
            raise ConfigurationError(f"masks: no family {name!r} in the group map")
        fam = families[name]
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (fam.size,):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigurationError(
                f"masks[{name!r}] must be a tensor of shape ({fam.size},); got {shape}"
            )
        members = [m for m in fam.members if m.in_mask]
        if not members:
            raise ConfigurationError(f"family {name!r} has no mask set (no in_mask member)")
        factors = torch.cat([mask.detach().to(torch.float64).reshape(-1), torch.ones(1)])
        for member in members:
            path, _, attr = member.param.rpartition(".")
            module = model.get_submodule(path) if path else model
            side = _side(module, attr, member.axis, name)
            assign = torch.tensor(member.assign, dtype=torch.long)
            per_feature = factors[torch.where(assign < 0, fam.size, assign)]
            key = (module, side)
            plan[key] = plan[key] * per_feature if key in plan else per_feature
    hooks = []
    for (module, side), per_feature in plan.items():
        if side == "input":
            hooks.append(module.register_forward_pre_hook(_scale_input(per_feature)))
        else:
            hooks.append(module.register_forward_hook(_scale_output(per_feature, module)))
    return MaskHandle(hooks)


def _scale(x: torch.Tensor, per_feature: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * per_feature.to(x.device, x.dtype).view(shape)


def _scale_input(per_feature: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (_scale(args[0], per_feature, -1), *args[1:])

    return hook


def _scale_output(per_feature: torch.Tensor, module: nn.Module):
    dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _scale(output, per_feature, dim)

    return hook
