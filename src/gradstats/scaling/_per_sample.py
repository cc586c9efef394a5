r"""The ``per_sample`` statistic: exact same-point noise from the per-unit gradients of a backward.

Math. Backward hooks on the modules see, for every tracked tensor, the per-unit contributions
c_i to ``.grad`` (Σ_i c_i = ĝ = ``.grad`` whatever the loss reduction, **provided every
term of the loss is a per-unit term computed inside the modules' forward**: a parameter also
used outside its module (a tied embedding multiplied by hand, ``h @ emb.weight.T``) or a loss
term that is not per unit (a weight penalty) breaks it and the noise of that tensor is wrong —
unlike the Fisher collector there is no first-batch completeness check yet). With B units
and g_i = B·c_i (the per-unit gradient if the loss is the mean over the units; under a summed
loss everything scales by B and ρ is unchanged), per tensor:

    A = (1/B) Σ_i ‖g_i‖² = B Σ_i ‖c_i‖²,      D = ‖ĝ‖²,
    E[A] = ‖G‖² + tr Σ,                       E[D] = ‖G‖² + tr Σ / B,
    tr Σ  = (A − D) / (1 − 1/B) = (Σ_i ‖g_i‖² − B‖ĝ‖²)/(B − 1)        (unbiased),
    ‖G‖² = (B·D − A) / (B − 1)  = ‖ĝ‖² − tr Σ / B                      (unbiased).

This is the two-batch estimator of spec/scaling.md §3 with B_small = 1, B_big = B, and it is
computed by :func:`~gradstats.scaling._same_point.two_batch_estimates` with K = B: its noise is
(A − D)/(B − 1) = tr Σ / B = tr Cov(ĝ), the noise of the *applied* gradient, exactly the units
of ``same_point`` (whose noise is tr Cov of the big-batch gradient), so ρ = (tr Σ / B)/‖G‖² and
B_noise = ρ·B = tr Σ / ‖G‖². Golden (B = 4, one coordinate, g = 1, 2, 3, 6): ĝ = 3,
tr Σ = 14/3, ‖G‖² = 47/6. The EMAs, debiasing, counts, checkpoint keys and the DDP reduction
are :class:`~gradstats.scaling._same_point.SamePointState`'s (``small`` = local²·Σ‖c‖²/K is
A for K units, also across ranks). B = 1 gives no estimate that step.

Units: ``unit="sample"`` (a sequence is one unit: the positions are summed inside the norm) or
``unit="token"`` (every position of every sequence is a unit, as in the Fisher collector: the
position-wise decomposition; exact only where position t affects only loss t). Token units
count all B·T positions, padded or unlabelled ones included.

Several backward calls per step (micro-batches) are treated as one step of Σ_m B_m units, which
is right when each micro-batch loss is divided so that ``.grad`` is the mean over all units
(equal micro-batches, loss / M). A contribution counts only once a post-accumulate hook saw it
reach ``.grad``, so ``torch.autograd.grad`` calls (penalties, probes) never enter the statistic.
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import UnitLayout
from gradstats.fisher._engine import batch_rows, handlers_for
from gradstats.fisher._fallback import FunctionalHandler
from gradstats.fisher._inputs import batch_size
from gradstats.fisher._persample import LinearHandler
from gradstats.scaling._params import ParamLayout
from gradstats.scaling._per_sample_linear import (
    LinearSite,
    materialised_grads,
    plain_grads,
    reusable,
)
from gradstats.scaling._per_sample_sites import Part, shared_norm, site_norms
from gradstats.scaling._per_sample_staging import Scratch, Staging
from gradstats.scaling._per_sample_state import PerSampleState

__all__ = ["CHUNK_BYTES", "PerSampleHooks", "PerSampleState"]

CHUNK_BYTES = 64 * 2**20  # memory budget of one chunk of materialised per-unit gradients
_ROW_DTYPES = (torch.float32, torch.float64)  # output gradients the row path takes as they are


class PerSampleHooks:
    """Forward/backward hooks on the modules owning the tracked tensors (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        states: list[PerSampleState],
        unit: str,
        capture: Callable[[], bool],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                "statistic='per_sample' needs the model's modules: pass model=<nn.Module> "
                f"(got {type(model).__name__})"
            )
        self.unit, self.capture, self.chunk_bytes = unit, capture, chunk_bytes
        self.rows: dict[str, tuple[int, int]] = {}
        for block, (start, stop) in enumerate(layout.blocks):
            for j in range(start, stop):
                self.rows[layout.names[j]] = (block, j - start)
        self.states = states
        known = {id(p) for p in model.parameters()}
        selected = dict(zip(layout.names, layout.tensors, strict=True))
        foreign = [name for name, t in selected.items() if id(t) not in known]
        if foreign:
            raise ConfigurationError(
                f"statistic='per_sample': tracked tensors {foreign[:5]} are not parameters of "
                "the model passed as model= (pass the model whose named_parameters() you track)"
            )
        owners, self.handlers = handlers_for(model, selected)  # type: ignore[arg-type]
        self._check_supported()
        self.static_multi = {name for name, found in owners.items() if len(found) > 1}
        for handler in self.handlers.values():
            handler.replay = self._replay
        fallback = [h.label for h in self.handlers.values() if isinstance(h, FunctionalHandler)]
        if fallback:
            warn(
                f"statistic='per_sample': no dedicated per-example handler for "
                f"{', '.join(fallback)}; using the torch.func fallback (exact, slower)"
            )
        self._replaying = 0
        self.scratch = Scratch()  # buffers for chunks of per-unit gradients, reused every step
        self._lent: list[torch.Tensor] = []  # scratch buffers held until the backward's end
        self._staging = Staging()  # what the backward recorded (its row buffers persist)
        # plain Linear/Conv1D modules: 2-D calls take the one-row-per-sample path (on_rows)
        self._rows_modules = {
            m for m, h in self.handlers.items() if isinstance(h, LinearHandler) and h.attrs
        }
        self._shared_handlers = {
            h for h in self.handlers.values() if set(h.attrs.values()) & self.static_multi
        }
        self._forward = 0  # forward id: units of different forwards are different units
        self._batch = 0
        self._calls: dict[tuple[int, nn.Module], int] = defaultdict(int)
        self._layouts: dict[tuple[object, ...], UnitLayout] = {}
        self._plans: dict[tuple[object, ...], list[tuple]] = {}  # see _commit
        self._reset_backward()
        self._handles = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        self._handles += [
            m.register_forward_hook(self._forward_hook, with_kwargs=True) for m in self.handlers
        ]
        # the tracked tensors these hooks feed: the scaler's post-accumulate hook on each of
        # them calls reached(name) (one Python hook per tensor and backward, not two)
        self.handled = {n for handler in self.handlers.values() for n in handler.attrs.values()}

    def _check_supported(self) -> None:
        bad = []
        for module, handler in self.handlers.items():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                bad.append(f"{handler.label!r} ({type(module).__name__}: mixes the samples)")
            elif self.unit == "token" and not handler.token_units:
                bad.append(f"{handler.label!r} ({type(module).__name__}: no token positions)")
        if bad:
            raise ConfigurationError(
                f"statistic='per_sample' (unit={self.unit!r}) cannot form per-example gradients "
                f"of the modules {', '.join(bad)}; supported: Linear, Conv1d/2d/3d, Embedding, "
                "LayerNorm/RMSNorm, Hugging Face Conv1D/RMSNorm and (unit='sample') any module "
                "without batch statistics via torch.func; call model.eval() for BatchNorm or use "
                "unit='sample' / statistic='temporal'"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.scratch.clear()

    @contextlib.contextmanager
    def _replay(self) -> Iterator[None]:
        self._replaying += 1
        try:
            yield
        finally:
            self._replaying -= 1

    def _reset_backward(self) -> None:
        self._staging.reset()
        self._units: dict[str, int] = defaultdict(int)
        self._seen: set[tuple[int, str]] = set()
        self._deferred: dict[tuple[int, str], list[Part]] = defaultdict(list)
        self._reached: set[str] = set()
        self._queued = False
        for tensor in self._lent:  # kept per-unit gradients of shared sites: reused next time
            self.scratch.give(tensor)
        self._lent = []

    # ---------------------------------------------------------------- forward
    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._replaying:
            return
        self._forward += 1
        self._calls = defaultdict(int)
        self._batch = batch_size(tuple(args) + tuple(kwargs.values()))

    def _forward_hook(self, module, args, kwargs, output) -> object:
        if self._replaying or not self.capture() or not torch.is_grad_enabled():
            return None
        handler = self.handlers[module]
        if module in self._rows_modules and self.unit == "sample" and args:
            x = args[0]  # a call on [B, d_in] rows: the lean path (no broadcast to expand)
            if (
                type(output) is torch.Tensor
                and type(x) is torch.Tensor
                and output.dim() == 2
                and x.dim() == 2
                and output.requires_grad
                and (output.shape[0] != 1 or self._batch <= 1)
            ):
                self._calls[(self._forward, module)] += 1
                rows: tuple = (handler, (x.detach(), None), self._forward, self._calls)
                output.register_hook(functools.partial(_on_rows, self, rows))
                return None
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ConfigurationError(
                f"module {handler.label!r} is a BatchNorm in training mode: it mixes the samples "
                "of a batch, so statistic='per_sample' is undefined; call model.eval()"
            )
        output, args, kwargs, tensors, broadcast = batch_rows(output, args, kwargs, self._batch)
        if not tensors:
            return None
        self._calls[(self._forward, module)] += 1
        site = (handler, handler.save(args, kwargs, output), self._forward, self._calls)
        if not broadcast and reusable(handler, self.unit, args, output):
            weight, bias = module.weight, module.bias
            return LinearSite.apply(args[0], weight, bias, (self, site, output.detach()))
        tensors[0].register_hook(functools.partial(_on_grad, self, site))
        return output if broadcast else None

    # --------------------------------------------------------------- backward
    def layout(self, grad: torch.Tensor) -> UnitLayout:
        """How the rows of an output gradient are cut into units (cached per shape)."""
        shape = tuple(grad.shape[:2]) if self.unit == "token" else tuple(grad.shape[:1])
        key = (shape, grad.device)
        if key not in self._layouts:
            if len(self._layouts) >= 64:  # shapes that keep changing (dynamic padding)
                self._layouts.clear()
            if self.unit == "token" and grad.dim() < 3:
                raise ConfigurationError(
                    f"unit='token' needs module outputs [B, T, ...]; got {tuple(grad.shape)}"
                )
            mask = torch.ones(shape, device=grad.device) if self.unit == "token" else None
            self._layouts[key] = UnitLayout(self.unit, shape[0], mask, self.chunk_bytes)
        return self._layouts[key]

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def _begin(self, site: tuple, grad: torch.Tensor) -> tuple[UnitLayout, list[str]]:
        """Bookkeeping of one site's backward: (its layout, the attrs shared with other sites)."""
        handler, _, forward, calls = site
        self._queue()
        layout = self.layout(grad)
        multi = calls[(forward, handler.module)] > 1
        shared = []
        for attr, name in handler.attrs.items():
            if (forward, name) not in self._seen:
                self._seen.add((forward, name))
                self._units[name] += layout.n_units
            if multi or name in self.static_multi:
                shared.append(attr)
        return layout, shared

    def on_rows(self, site: tuple, grad: torch.Tensor) -> None:
        """A Linear/Conv1D call on [B, d_in] rows (one position per sample): ‖a_i‖ and ‖b_i‖
        go straight into the staging's row buffer; anything unusual takes :meth:`on_grad`."""
        if not self.capture():
            return
        handler, saved, forward, calls = site
        x, n = saved[0], grad.shape[0]
        if (
            grad.dim() != 2
            or grad.requires_grad  # create_graph=True: the general path, as before
            or x.shape[0] != n
            or grad.dtype not in _ROW_DTYPES
            or x.dtype != grad.dtype
            or handler in self._shared_handlers
            or calls[(forward, handler.module)] > 1
        ):
            self.on_grad(site, grad)
            return
        self._queue()
        names = handler.attrs
        for name in names.values():
            if (forward, name) not in self._seen:
                self._seen.add((forward, name))
                self._units[name] += n
        self._staging.rows(names.get("weight"), names.get("bias"), x, grad)

    def on_grad(self, site: tuple, grad: torch.Tensor) -> None:
        handler, saved, forward, _ = site
        if not self.capture():
            return
        layout, shared = self._begin(site, grad)
        prepared = handler.prepare(layout, saved, grad)
        direct = []
        for attr, name in handler.attrs.items():
            if attr in shared:
                self._deferred[(forward, name)].append(Part(handler, layout, prepared, attr))
            else:
                direct.append(attr)
        if direct:
            site_norms(handler, layout, prepared, direct, self._staging)

    def on_linear(
        self, site: tuple, x: torch.Tensor, grad: torch.Tensor, need_w: bool, need_b: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Weight and bias gradients of a :class:`LinearSite` (see ``_per_sample_linear``),
        recording Σ_i ‖c_i‖² of the weight (and bias) on the way."""
        handler, _, forward, _ = site
        if not self.capture() or not need_w or torch.is_grad_enabled():
            self.on_grad(site, grad.detach())  # (create_graph: differentiable formulas)
            return plain_grads(handler, x, grad, need_w, need_b)
        layout, shared = self._begin(site, grad)
        a, b = handler.prepare(layout, (x, None), grad)
        keep = "weight" in shared
        gw, norm, dense = materialised_grads(handler, a, b, layout.chunk_bytes, keep, self.scratch)
        name = handler.attrs["weight"]
        if keep:
            if dense is not None:
                self._lent.append(dense)
            total = norm.to(torch.float64).square()
            self._deferred[(forward, name)].append(
                Part(handler, layout, (a, b), "weight", total, dense)
            )
        else:
            self._staging.add_norm(name, norm)
        if not need_b:
            return gw, None
        if "bias" not in handler.attrs:
            return gw, grad.reshape(-1, grad.shape[-1]).sum(0)
        rows = b.sum(1)  # per-unit bias gradients Σ_t b_t
        if "bias" in shared:
            self._deferred[(forward, handler.attrs["bias"])].append(
                Part(handler, layout, (a, b), "bias")
            )
        else:
            self._staging.add_norm(handler.attrs["bias"], rows)
        return gw, rows.sum(0)

    def reached(self, name: str) -> None:
        """``name``'s gradient reached ``.grad`` in this backward (its post-accumulate hook,
        which calls this only while the tracker captures)."""
        self._reached.add(name)

    def finish(self) -> None:
        """End of one backward: sites of shared parameters, then commit what reached .grad."""
        try:
            for (_, name), parts in self._deferred.items():
                self._staging.add(name, shared_norm(name, parts))
            if self._staging:
                self._commit()
        finally:
            self._reset_backward()
            self._forward += 1  # a model run by its submodules: one forward per backward
            self._calls = defaultdict(int)

    def _commit(self) -> None:
        """Every staged entry whose tensor reached .grad, into its state (one vector each)."""
        names, values = self._staging.values(self.states[0]._sums.device)
        if values is None:
            return
        key = (tuple(names), frozenset(self._reached))
        plan = self._plans.get(key)
        if plan is None:  # the same entries reach .grad at every step: planned once
            if len(self._plans) > 64:
                self._plans.clear()
            plan = self._plans[key] = self._plan(names, values.device)
        for block, index, rows, count_rows, count_names in plan:
            part = values if index is None else values.index_select(0, index)
            counts = list(map(self._units.__getitem__, count_names))
            self.states[block].add_units(rows, part, count_rows, counts)

    def _plan(self, names: list[str | None], device: torch.device) -> list[tuple]:
        """Per block: (the index of its entries in the staged vector, None for all of them;
        their rows; the rows whose unit counts it adds, and their names)."""
        by_block: dict[int, tuple[list[int], list[int], dict[int, str]]] = {}
        for k, name in enumerate(names):
            if name is None or name not in self._reached:
                continue  # no such parameter, or torch.autograd.grad: never reached .grad
            block, row = self.rows[name]
            positions, rows, counted = by_block.setdefault(block, ([], [], {}))
            positions.append(k)
            rows.append(row)
            counted[row] = name
        plan = []
        for block, (positions, rows, counted) in by_block.items():
            index = None
            if len(positions) != len(names):
                index = torch.tensor(positions, dtype=torch.int64, device=device)
            plan.append((block, index, rows, list(counted), list(counted.values())))
        return plan


def _on_grad(owner: PerSampleHooks, site: tuple, grad: torch.Tensor) -> None:
    owner.on_grad(site, grad)


def _on_rows(owner: PerSampleHooks, site: tuple, grad: torch.Tensor) -> None:
    owner.on_rows(site, grad)
