r"""Least-squares rescaling of the kept mask values after structured pruning (Kwon et al., 2022).

Removing heads or FFN neurons without retraining changes what each layer adds to the residual
stream. Kwon et al. ("A Fast Post-Training Pruning Framework for Transformers", 2022, §4.3,
"mask tuning") recover much of the loss by giving the *kept* groups real-valued mask values
fitted by linear least squares on a few batches of layer outputs. :func:`rescale_masks` does
this for every family whose mask set is the input features of one output projection (attention
heads: GPT-2 ``attn.c_proj`` / ``o_proj``; FFN neurons: ``mlp.c_proj`` / ``down_proj``).

For one family with output projection P, let W_i ∈ R^out be the output vector of input feature i
of P (row i of a Hugging Face ``Conv1D`` weight [in, out], column i of an ``nn.Linear`` weight
[out, in]) and a_i(n) feature i of P's input at row n (a token) of the batches, in the pruned
model. Group k contributes c_k(n) = Σ_{i ∈ k} a_i(n) W_i. With m⁰ the given mask values,
y(n) P's output in the pruned model, r(n) = y(n) − Σ_k m⁰_k c_k(n) the rest (bias, features in
no group) and y*(n) P's output in the unmasked model on the same inputs, the kept values K solve

    m_K = argmin_m Σ_n ‖ Σ_{k ∈ K} m_k c_k(n) + r(n) − y*(n) ‖²,

from the normal equations G m = h with G_kl = Σ_n ⟨c_k(n), c_l(n)⟩ and
h_k = Σ_n ⟨c_k(n), y*(n) − r(n)⟩, in float64 (``torch.linalg.lstsq``, minimum-norm where G is
singular, e.g. a neuron that never fires). Computed without materialising the c_k: with A the
[N, F] in-group inputs, Wg the [F, out] output vectors and S the [F, G] assignment indicator,
G = Sᵀ((AᵀA) ∘ (Wg Wgᵀ))S and h = Sᵀ Σ_n A(n) ∘ ((y* − r)(n) Wgᵀ). Removed groups stay 0.

Families are fitted one after another in the order of the group map (layer by layer), each with
the already fitted values of the earlier families applied, so later layers see — and compensate
— the earlier layers' errors. Unlike Kwon et al., the target is the projection's own output,
not the residual stream (x' + y* − x): this keeps the function architecture-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._groups import GroupFamily, GroupMap
from gradstats.fisher._handler import is_hf_conv1d
from gradstats.fisher._inputs import call_model
from gradstats.fisher._masking import apply_masks

__all__ = ["rescale_masks"]


class _Plan:
    """One family's output projection P and the indices of its in-group input features."""

    def __init__(self, model: nn.Module, fam: GroupFamily) -> None:
        members = [m for m in fam.members if m.in_mask]
        path, _, attr = members[0].param.rpartition(".") if members else ("", "", "")
        module = model.get_submodule(path) if path else model
        conv1d = is_hf_conv1d(module)
        axis = 0 if conv1d else 1  # the input-feature axis of P's weight
        ok = (
            len(members) == 1
            and attr == "weight"
            and members[0].axis == axis
            and (conv1d or isinstance(module, nn.Linear))
        )
        if not ok:
            raise ConfigurationError(
                f"masks[{fam.name!r}]: rescaling needs a family whose mask set is the input "
                "features of one Linear or Hugging Face Conv1D weight (attention heads, FFN "
                "neurons); this family's mask set is "
                f"{[(m.param, m.axis) for m in members]}"
            )
        self.fam, self.module, self.conv1d = fam, module, conv1d
        self.weight = model.get_parameter(members[0].param)
        assign = torch.tensor(members[0].assign, dtype=torch.long)
        self.index = torch.nonzero(assign >= 0).flatten()
        self.assign = assign[self.index]

    def vectors(self) -> torch.Tensor:
        """Wg [F, out]: the output vector of every in-group input feature, float64."""
        weight = self.weight.detach().to(torch.float64)
        index = self.index.to(weight.device)
        return weight[index] if self.conv1d else weight[:, index].T


def _check(
    model: object, masks: object, groups: object, batches: object
) -> tuple[dict[str, GroupFamily], dict[str, torch.Tensor], list[object]]:
    if not isinstance(model, nn.Module):
        raise ConfigurationTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    group_map = getattr(groups, "group_map", groups)
    if not isinstance(group_map, GroupMap):
        raise ConfigurationTypeError(
            f"groups must be a FisherCollector or a GroupMap; got {type(groups).__name__}"
        )
    if not isinstance(masks, Mapping) or not masks:
        raise ConfigurationError(
            "masks must be a non-empty mapping {family name: tensor [G]}; got "
            + (repr(masks) if isinstance(masks, Mapping) else type(masks).__name__)
        )
    families = {f.name: f for f in group_map.families}
    clean: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if name not in families:
            raise ConfigurationError(f"masks: no family {name!r} in the group map")
        size = families[name].size
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (size,):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ConfigurationError(
                f"masks[{name!r}] must be a tensor of shape ({size},); got {shape}"
            )
        value = mask.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(value).all()):
            raise ConfigurationError(f"masks[{name!r}] holds NaN or inf")
        clean[name] = value
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise ConfigurationTypeError(
            "batches must be a list of model inputs (tensors, mappings or tuples), e.g. "
            f"[input_ids_1, input_ids_2]; got {type(batches).__name__}"
        )
    listed = list(batches)
    if not listed:
        raise ConfigurationError("batches must hold at least one batch of model inputs")
    return families, clean, listed


def rescale_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    groups: object,
    batches: Iterable[object],
) -> dict[str, torch.Tensor]:
    r"""Real-valued masks: the kept groups' values refitted by least squares (Kwon et al. 2022).

    See the module docstring for the exact formula. Zero entries of ``masks`` (removed groups)
    stay 0; every nonzero entry is refitted. Apply the result with
    :func:`~gradstats.fisher.apply_masks`. The model is run under ``torch.no_grad()`` once
    unmasked (the targets) and once per family; put it in ``eval()`` mode first (dropout would
    make the fit noisy), and remove other masks from it (they count as part of the target).

    Args:
        model: the model the group map describes, without masks applied.
        masks: ``{family name: tensor [G]}`` (bool: True = keep, or real values), e.g. from
            :func:`~gradstats.fisher.pruning_masks`; families of heads or FFN neurons.
        groups: the :class:`~gradstats.fisher.FisherCollector` (or its ``group_map``).
        batches: a few batches of model inputs (tensors, mappings of keyword arguments or
            tuples), e.g. ``[input_ids, ...]``; every row (token) of them is one observation.

    Returns:
        ``{family name: float64 tensor [G]}`` for the families of ``masks``, on the CPU.

    Raises:
        ConfigurationError: an unknown family, a mask of the wrong shape or non-finite, a family
            whose mask set is not the input features of one Linear / Conv1D weight, two families
            masking the same module, no batches, or non-finite layer outputs.
    """
    families, current, listed = _check(model, masks, groups, batches)
    order = [f.name for f in families.values() if f.name in current]  # group-map (layer) order
    plans = {name: _Plan(model, families[name]) for name in order}
    seen: dict[int, str] = {}
    for name, plan in plans.items():
        other = seen.setdefault(id(plan.module), name)
        if other != name:
            raise ConfigurationError(
                f"masks: families {other!r} and {name!r} mask the same module; rescale them "
                "in separate calls"
            )
    targets = _outputs(model, [plan.module for plan in plans.values()], listed)
    result: dict[str, torch.Tensor] = {}
    for position, name in enumerate(order):
        plan, mask = plans[name], current[name]
        inputs, outputs = _run(model, plan.module, listed, current, groups)
        vectors = plan.vectors()
        gram_w = vectors @ vectors.T
        size = plan.fam.size
        select = torch.zeros(len(plan.index), size, dtype=torch.float64, device=vectors.device)
        select[torch.arange(len(plan.index)), plan.assign.to(vectors.device)] = 1.0
        m0 = mask.to(vectors.device)[plan.assign.to(vectors.device)]
        gram = torch.zeros(size, size, dtype=torch.float64, device=vectors.device)
        rhs = torch.zeros(size, dtype=torch.float64, device=vectors.device)
        for a_all, y, y_star in zip(inputs, outputs, targets[position], strict=True):
            a = a_all[:, plan.index.to(a_all.device)]
            rest = y - (a * m0) @ vectors
            gram += select.T @ (((a.T @ a) * gram_w) @ select)
            rhs += select.T @ (a * ((y_star - rest) @ vectors.T)).sum(0)
        if not bool(torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
            raise ConfigurationError(
                f"batches: the layer outputs of family {name!r} are not finite; cannot rescale"
            )
        kept = torch.nonzero(mask != 0).flatten().to(gram.device)
        fitted = torch.zeros(size, dtype=torch.float64)
        if len(kept):
            sub = gram[kept][:, kept].cpu()
            solution = torch.linalg.lstsq(sub, rhs[kept].cpu()[:, None], driver="gelsd")
            fitted[kept.cpu()] = solution.solution[:, 0]
        result[name] = fitted
        current = {**current, name: fitted}
    return result


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def _outputs(
    model: nn.Module,
    modules: list[nn.Module],
    batches: list[object],
) -> list[list[torch.Tensor]]:
    """[module][batch] -> the module's output rows [N, out] (float64) in the unmasked model."""
    found: list[list[torch.Tensor]] = [[] for _ in modules]
    hooks = []
    for index, module in enumerate(modules):

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, index: int = index) -> None:
            found[index].append(_flat(out))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        for handle in hooks:
            handle.remove()
    return found


def _run(
    model: nn.Module,
    module: nn.Module,
    batches: list[object],
    masks: Mapping[str, torch.Tensor],
    groups: object,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P's raw input rows (before its mask hook) and output rows, under ``masks``."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        inputs.append(_flat(args[0]))

    def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        outputs.append(_flat(out))

    first = module.register_forward_pre_hook(pre, prepend=True)  # before the mask's pre-hook
    last = module.register_forward_hook(post)
    try:
        with apply_masks(model, dict(masks), groups), torch.no_grad():
            for batch in batches:
                call_model(model, batch)
    finally:
        first.remove()
        last.remove()
    return inputs, outputs
