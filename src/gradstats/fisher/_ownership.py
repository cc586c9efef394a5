r"""Which module computes which selected parameter's per-unit gradients, and by which handler.

Shared by the Fisher collector's :class:`~gradstats.fisher._engine.Engine` and the scaler's
``per_sample`` hooks: every selected parameter is owned by the module(s) that use it in their
own forward (a module that reaches into its children's parameters, such as
``nn.MultiheadAttention``, owns them as one unit), and each owner gets the fastest exact
handler for its type (exact types only), else the ``torch.func`` fallback.
"""

from __future__ import annotations

from torch import nn

from gradstats.fisher._fallback import FunctionalHandler
from gradstats.fisher._persample import (
    ConvHandler,
    EmbeddingHandler,
    Handler,
    LinearHandler,
    NormHandler,
    is_hf_conv1d,
    is_hf_rmsnorm,
)

__all__ = ["handlers_for", "make_handler"]

# Modules whose forward uses their children's parameters directly (not through the children's
# forward): the module owns those parameters and is handled as one unit by the fallback. A
# module can also declare itself such a unit with ``fisher_whole_module = True``; classes named
# here are matched by name so that their packages need not import gradstats.fisher.
_USES_CHILD_PARAMETERS = (nn.MultiheadAttention,)
_WHOLE_MODULE_CLASSES = {"EquilibriumTransformer"}


def _whole_module(module: nn.Module) -> bool:
    return (
        isinstance(module, _USES_CHILD_PARAMETERS)
        or getattr(module, "fisher_whole_module", False) is True
        or type(module).__name__ in _WHOLE_MODULE_CLASSES
    )


def make_handler(module: nn.Module, attrs: dict[str, str], label: str) -> Handler:
    """The fastest exact handler for ``module`` (exact types only: a subclass may change the
    forward), else the ``torch.func`` fallback."""
    simple = set(attrs) <= set(module._parameters)
    kind = type(module)
    if simple and kind is nn.Linear:
        return LinearHandler(module, attrs, label)
    if simple and is_hf_conv1d(module):
        return LinearHandler(module, attrs, label, transposed=True)
    if simple and kind is nn.Embedding:
        return EmbeddingHandler(module, attrs, label)
    if simple and kind is nn.LayerNorm:
        return NormHandler(module, attrs, label, "layer")
    if simple and kind is nn.RMSNorm:
        return NormHandler(module, attrs, label, "rms")
    if simple and is_hf_rmsnorm(module):
        return NormHandler(module, attrs, label, "hf")
    if simple and kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return ConvHandler(module, attrs, label)
    return FunctionalHandler(module, attrs, label)


def _owners(model: nn.Module, selected: dict[str, nn.Parameter]) -> dict[str, list]:
    """Parameter name -> [(module name, module, attribute)] of the modules that use it."""
    by_id = {id(p): name for name, p in selected.items()}
    owners: dict[str, list] = {name: [] for name in selected}
    absorbed: set[int] = set()
    for mname, module in model.named_modules():
        if _whole_module(module):
            for attr, p in module.named_parameters():
                if id(p) in by_id and id(p) not in absorbed:
                    owners[by_id[id(p)]].append((mname, module, attr))
                    absorbed.add(id(p))
    for mname, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in by_id and id(p) not in absorbed:
                owners[by_id[id(p)]].append((mname, module, attr))
    for name, found in owners.items():  # a parameter shared with a descendant is used there
        modules = [m for _, m, _ in found]
        owners[name] = [
            (n, m, a)
            for n, m, a in found
            if not any(o is not m and any(c is o for c in m.modules()) for o in modules)
        ]
    return owners


def handlers_for(
    model: nn.Module, selected: dict[str, nn.Parameter]
) -> tuple[dict[str, list], dict[nn.Module, Handler]]:
    """(parameter name -> [(module name, module, attribute)] of its users, module -> the
    handler of the selected parameters it owns) — shared by the Fisher and the scaler's
    ``per_sample`` hooks."""
    owners = _owners(model, selected)
    attrs: dict[nn.Module, dict[str, str]] = {}
    labels: dict[nn.Module, str] = {}
    for name, found in owners.items():
        for mname, module, attr in found:
            attrs.setdefault(module, {})[attr] = name
            labels[module] = mname or type(model).__name__
    return owners, {m: make_handler(m, a, labels[m]) for m, a in attrs.items()}
