r"""Hook plumbing: the module calls of a batch and its passes (owners, handlers: ``_ownership``).

A module called on a batch of one while the model's batch has B > 1 rows (Hugging Face position
embeddings of ``position_ids`` [1, T], broadcast when added) has its output expanded to B rows
in the forward hook, so that each sample's share of its gradient stays separate. (A module
whose output has no batch dimension at all cannot be told apart from a batched one and is not
supported.)

Forward hooks (registered once, idle unless a batch is being recorded) save each call's input
and its output's ``GradientEdge`` (taken before any later in-place op). A *pass* is one
``torch.autograd.grad`` call whose ``inputs`` are those edges: autograd then computes only
activation gradients — no weight-gradient GEMMs unless the mean gradient is wanted — and
returns the gradient of every recorded output, from which each module's handler reduces its
per-unit gradients. (autograd holds the gradient of every requested input until it returns
anyway, so reducing them after the call costs no memory over tensor hooks, and saves a Python
hook call per module and pass.)

A parameter with several *sites* (tied weights such as GPT-2's ``wte`` / ``lm_head``, or a module
called more than once per forward) must be summed per unit before squaring: its sites keep their
factors until the end of the pass, then the per-unit gradients are formed chunk by chunk
(Σ over sites), squared and freed.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass
from itertools import repeat
from operator import is_

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, StateError
from gradstats.fisher._accumulate import Request, UnitLayout, accumulate_materialised
from gradstats.fisher._fallback import FunctionalHandler
from gradstats.fisher._handler import Handler
from gradstats.fisher._inputs import batch_rows
from gradstats.fisher._ownership import handlers_for, make_handler
from gradstats.fisher._persample import EmbeddingHandler

__all__ = ["Engine", "batch_rows", "handlers_for", "make_handler"]


@dataclass
class Site:
    """One recorded module call of the current batch."""

    handler: Handler
    saved: object
    output_id: int


def _edge(output: torch.Tensor) -> GradientEdge:
    """``get_gradient_edge(output)`` without its Python checks for the usual non-leaf output
    of a C++ node (a leaf, or the output of a Python ``autograd.Function``, whose node needs
    the ownership token ``get_gradient_edge`` makes, takes the full call)."""
    node = output.grad_fn
    if node is None or isinstance(node, torch._C._FunctionBase):
        return get_gradient_edge(output)
    return GradientEdge(node, output.output_nr)


class Engine:
    """Per-sample machinery of one collector (see the module docstring)."""

    def __init__(self, model: nn.Module, selected: dict[str, nn.Parameter]) -> None:
        self.model = model
        self.selected = selected
        owners, self.handlers = handlers_for(model, selected)
        self.paths = {m: mname for found in owners.values() for mname, m, _ in found}
        self._paths = self._module_paths()
        self._links = self._path_links()
        for handler in self.handlers.values():
            handler.replay = self.replay
        self.static_multi = {name for name, found in owners.items() if len(found) > 1}
        self.requests: dict[str, list[Request]] = {}
        self._recording = False
        self._replaying = 0
        self.sites: list[Site] = []
        self.edges: list = []
        self.calls: Counter = Counter()
        self.batch_size = 0
        self.layout: UnitLayout | None = None
        self._deferred: list = []
        self._batchnorms = {
            m for m in self.handlers if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }
        self._hooks = [
            m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.handlers
        ]
        # the fallback handlers are the ones that leave notices for the end of a batch
        self._fallbacks = [h for h in self.handlers.values() if isinstance(h, FunctionalHandler)]
        fallback = [h.label for h in self._fallbacks]
        if fallback:
            warn(
                f"gradstats.fisher: no dedicated per-sample handler for {', '.join(fallback)}; "
                "using the torch.func fallback (exact, slower)",
            )

    def check_attached(self) -> None:
        """The modules and parameters the hooks were put on must still be the model's.

        A submodule (or parameter) replaced after the collector was built would carry no hooks
        and its gradients would silently be left out (the old module's statistics simply stop
        growing), so this is an error, not a re-attachment: the statistics collected so far
        belong to the old parameters. (Each module's path is walked through the children
        dicts, a few microseconds per batch; a container swapped for one holding the same
        children is no change.)

        Raises:
            StateError: naming the replaced module or parameter.
        """
        holders, attrs, tables, keys, children = self._links
        if (  # every step of every path holds (iterated in C; the walk below names a break)
            all(map(is_, map(getattr, holders, attrs), tables))
            and all(map(is_, map(type, tables), repeat(dict)))  # (plain dicts: dict.get is theirs)
            and all(map(is_, map(dict.get, tables, keys), children))
        ):
            return
        for module, keys, params in self._paths:
            current: nn.Module | None = self.model
            for key in keys:
                current = current._modules.get(key) if current is not None else None
            handler = self.handlers[module]
            if current is not module:
                raise StateError(
                    f"module {handler.label!r} was replaced or removed after the FisherCollector "
                    "was built: its hooks are on the old module, so its gradients would be left "
                    "out silently; build a new FisherCollector for the changed model"
                )
            for owner_keys, leaf, name in params:
                owner: nn.Module | None = module
                for key in owner_keys:
                    owner = owner._modules.get(key) if owner is not None else None
                if owner is None or owner._parameters.get(leaf) is not self.selected[name]:
                    raise StateError(
                        f"parameter {name!r} (module {handler.label!r}) was replaced after the "
                        "FisherCollector was built; build a new FisherCollector for the changed "
                        "model"
                    )
        self._links = self._path_links()  # the same modules in new containers: no change

    def _path_links(self) -> tuple[list[nn.Module], list[str], list[dict], list[str], list]:
        """Every step of the paths :meth:`check_attached` walks, as parallel lists: the
        container, the name of its dict (``_modules`` or ``_parameters``), that dict, the key
        and what it must hold there; all hold iff no walk finds a replacement."""
        links: dict[tuple[int, str, bool], tuple[nn.Module, str, object, bool]] = {}
        for module, keys, params in self._paths:
            current = self.model
            for key in keys:
                child = current.get_submodule(key)
                links[(id(current), key, False)] = (current, key, child, False)
                current = child
            for owner_keys, leaf, name in params:
                owner = module
                for key in owner_keys:
                    child = owner.get_submodule(key)
                    links[(id(owner), key, False)] = (owner, key, child, False)
                    owner = child
                links[(id(owner), leaf, True)] = (owner, leaf, self.selected[name], True)
        steps = list(links.values())
        attrs = ["_parameters" if leaf else "_modules" for _, _, _, leaf in steps]
        holders = [holder for holder, _, _, _ in steps]
        tables = [getattr(holder, attr) for holder, attr in zip(holders, attrs, strict=True)]
        return holders, attrs, tables, [k for _, k, _, _ in steps], [c for _, _, c, _ in steps]

    def _module_paths(self) -> list[tuple[nn.Module, list[str], list[tuple[list[str], str, str]]]]:
        """(hooked module, its path's keys, [(keys to the owner, attribute, parameter name)])."""
        out = []
        for module, handler in self.handlers.items():
            path = self.paths[module]
            params = []
            for attr, name in handler.attrs.items():
                *hops, leaf = attr.split(".")
                params.append((hops, leaf, name))
            out.append((module, path.split(".") if path else [], params))
        return out

    def set_requests(self, requests: dict[str, list[Request]]) -> None:
        """Group requests per parameter name; each handler is told about its own."""
        self.requests = requests
        for handler in self.handlers.values():
            handler.configure({a: requests.get(n, []) for a, n in handler.attrs.items()})

    # ---------------------------------------------------------------- hooks
    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @contextlib.contextmanager
    def replay(self):
        """Re-executing a module's forward (fallback, norms): our hooks stay quiet."""
        self._replaying += 1
        try:
            yield
        finally:
            self._replaying -= 1

    @contextlib.contextmanager
    def recording(self, batch_size: int):
        """Record the module calls of one forward; ``batch_size`` B lets a module called on a
        batch of one (broadcast over the batch) be expanded to B rows."""
        self.sites, self.edges, self.calls = [], [], Counter()
        self.batch_size = batch_size
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def release(self) -> None:
        """End a batch: drop its saved tensors and issue the handlers' notices (from here, so
        that they name the caller's line rather than autograd's)."""
        self.sites, self.edges, self._deferred, self.layout = [], [], [], None
        for handler in self._fallbacks:
            for notice in handler.notices:
                warn(notice)
            handler.notices.clear()

    def _forward_hook(self, module, args, kwargs, output) -> object:
        if not self._recording or self._replaying:
            return None
        if module in self._batchnorms and module.training:
            raise ConfigurationError(
                f"module {self.handlers[module].label!r} is a BatchNorm in training mode: it mixes "
                "the samples of a batch, so per-sample gradients are undefined; call model.eval()"
            )
        handler = self.handlers[module]
        plain = type(output) is torch.Tensor and output.requires_grad and output.dim() > 0
        if plain and (output.shape[0] != 1 or self.batch_size <= 1):  # one row per sample
            self._record(module, Site(handler, handler.save(args, kwargs, output), id(output)))
            self.edges.append(_edge(output))
            return None
        output, args, kwargs, tensors, broadcast = batch_rows(output, args, kwargs, self.batch_size)
        if not tensors:
            return None
        self._record(module, Site(handler, handler.save(args, kwargs, output), id(tensors[0])))
        self.edges.append(_edge(tensors[0]))
        for extra in tensors[1:]:
            extra.register_hook(functools.partial(self._extra_output, handler.label))
        return output if broadcast else None

    def _record(self, module: nn.Module, site: Site) -> None:
        self.calls[module] = self.calls.get(module, 0) + 1  # (no Counter.__missing__ call)
        self.sites.append(site)

    def _extra_output(self, label: str, grad: torch.Tensor) -> None:
        if bool(grad.ne(0).any()):  # sync-ok: error path of an unsupported module
            raise ConfigurationError(
                f"module {label!r} returns several tensors and a gradient reached output 2 or "
                "later; per-sample gradients are only formed from its first output"
            )

    def _on_grad(self, site: Site, grad: torch.Tensor) -> None:
        """Reduce one recorded output's gradient (its module called once: now; else at the end
        of the pass, summed over the module's sites per unit)."""
        handler = site.handler
        multi = self.calls[handler.module] > 1
        direct: list[str] = []
        deferred: list[str] = []
        for attr, name in handler.attrs.items():
            (deferred if multi or name in self.static_multi else direct).append(attr)
        if direct:
            wanted = {a: self.requests.get(handler.attrs[a], []) for a in direct}
            handler.accumulate(self._layout(), site.saved, grad, direct, wanted)
        if deferred:
            self._deferred.append((site, grad, deferred))

    # ---------------------------------------------------------------- passes
    def run_pass(
        self,
        layout: UnitLayout,
        *,
        objective: torch.Tensor | None = None,
        output: torch.Tensor | None = None,
        direction: torch.Tensor | None = None,
        param_grads: bool = False,
        retain: bool = False,
    ) -> list[torch.Tensor | None]:
        """One backward pass; returns the parameter gradients when ``param_grads`` (else []).

        The gradients Σ_units g_i are summed by the hooks from the per-unit gradients they
        form anyway (``layout.lin``), so autograd computes activation gradients only — no
        weight-gradient GEMMs (with sequences a sum over the materialised per-unit gradients
        replaces each of them). A parameter no hook saw this pass gets None, as an unused one
        does from autograd. A layout whose ``lin`` is already set (the first batch's
        completeness check, token units) gets autograd's gradients: the check compares both.
        """
        if not self.edges:
            raise ConfigurationError(
                "no module with selected parameters ran in the forward pass (or none of their "
                "outputs requires grad): nothing to collect"
            )
        self.layout, self._deferred = layout, []
        from_hooks = param_grads and layout.lin is None
        if from_hooks:
            layout.lin = {}
        params = list(self.selected.values()) if param_grads and not from_hooks else []
        inputs = params + list(self.edges)
        if objective is not None:
            grads = torch.autograd.grad(objective, inputs, retain_graph=retain, allow_unused=True)
        elif output is None:
            raise ConfigurationError("a backward pass needs an objective or an output direction")
        else:
            grads = torch.autograd.grad(
                output, inputs, grad_outputs=direction, retain_graph=retain, allow_unused=True
            )
        with torch.no_grad():  # as inside autograd's own hooks
            # last call first, the order in which autograd reaches them
            outputs = grads[len(params) :]
            for site, grad in zip(reversed(self.sites), reversed(outputs), strict=True):
                if grad is not None:  # (None: that output did not reach the objective)
                    self._on_grad(site, grad)
            self._finish_deferred()
        layout.end_pass()
        if from_hooks:
            lin, layout.lin = layout.lin, None
            assert lin is not None
            return [lin.get(name) for name in self.selected]
        return list(grads[: len(params)]) if param_grads else []

    def _layout(self) -> UnitLayout:
        if self.layout is None:
            raise RuntimeError("per-sample hooks ran outside a pass of the collector")
        return self.layout

    def _finish_deferred(self) -> None:
        layout = self._layout()
        by_param: dict[str, list] = {}
        for site, grad, attrs in self._deferred:
            for attr in attrs:
                by_param.setdefault(site.handler.attrs[attr], []).append((site, grad, attr))
        prepared: dict[int, object] = {}
        for name, parts in by_param.items():
            step = min(layout.chunk(p[0].handler.bytes_per_unit([p[2]])) for p in parts)
            wanted = self.requests.get(name, [])
            theta = self.selected[name].detach() if any(r.in_mask for r in wanted) else None
            # dense sites first; embeddings then add their few rows into that tensor
            parts.sort(key=lambda part: isinstance(part[0].handler, EmbeddingHandler))
            for lo in range(0, layout.n_units, step):
                hi = min(layout.n_units, lo + step)
                total = None
                for site, grad, attr in parts:
                    key = id(site)
                    if key not in prepared:
                        prepared[key] = site.handler.prepare(layout, site.saved, grad)
                    handler = site.handler
                    if total is not None and isinstance(handler, EmbeddingHandler):
                        total = handler.materialise(prepared[key], [attr], lo, hi, total)[attr]
                        continue
                    g = handler.materialise(prepared[key], [attr], lo, hi)[attr]
                    total = g if total is None else total.add_(g.to(total.dtype))
                if total is not None:
                    accumulate_materialised(layout, name, total, lo, wanted, theta)
        self._deferred = []

    def report(self) -> dict[str, str]:
        """Module name -> handler used (``"linear"``, ``"conv2d"``, ``"vmap"``, ``"loop"``, ...)."""
        return {h.label: h.name for h in self.handlers.values()}
