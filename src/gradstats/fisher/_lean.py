r"""The lean batch path of the commonest case: every selected parameter in an ``nn.Linear`` fed
one row per sample.

For a batch of B samples, a Linear layer with input rows a_i and output gradients b_i (of the
pass objective Σ_i l_i) has per-sample gradients g_i(W) = b_i a_iᵀ and g_i(bias) = b_i, so

    Σ_i g_i(W)² = (b²)ᵀ(a²),   Σ_i g_i(bias)² = Σ_i b_i²,
    Σ_i g_i(W) = bᵀa,          Σ_i g_i(bias) = Σ_i b_i,

the output-channel group trace of sample i is t_ik = b_ik² (‖a_i‖² + 1) (b_ik² ‖a_i‖²
without a bias) and its mask value m_ik = (b_ik y_ik)² with y = W a + bias the layer output;
Σ_i ‖a_i‖² ‖b_i‖² (= the sum of all elements of (b²)ᵀ(a²)) and Σ_i ‖b_i‖² stand for the
finiteness of the two squares' sums. These are exactly the tensors the general path
(``Engine.run_pass`` → ``LinearHandler.accumulate`` → ``BatchCore._finish``) hands to
``FisherState.update``, formed by the same ops in the same dtype, so both paths give the same
bits (``tests/fisher/test_lean_path.py`` pins them in float32 and float64). What is left out is
the general path's per-call dispatch: the layout object, the per-site request lookup, chunking,
the deferred multi-call sums — about half a millisecond of Python per batch, which at batch 32
is 15% of an MLP's backward.

Used by :class:`~gradstats.fisher.FisherCollector` when (checked once per collector) the kind
is ``"empirical"``, ``unit="sample"``, ``mode="cumulative"`` without ``element_se``, the state
is on the CPU (where the batch's acceptance is read for free and Σg² products go straight into
the pending sums), every hooked module is an ``nn.Linear`` used by one call, and each one's
group requests are none or one output-channel family of block 1 over all its output features,
of its own (weight and bias together, or the weight of a layer without bias: the default groups
of a model without a config); and (checked per
batch) the first-batch completeness check is done, every module ran once on a 2-D input with
B rows and no per-sample gradient would need chunking. Anything else takes the general path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradstats.errors import NonFiniteError
from gradstats.fisher._accumulate import Request, compute_dtype

__all__ = ["LeanLinearPath"]


@dataclass(frozen=True)
class _Layer:
    module: nn.Linear
    weight: str  # parameter names
    bias: str | None
    family: int | None  # index of the output-channel family this layer's rows go to


class LeanLinearPath:
    """The lean path of one collector (see the module docstring); :meth:`build` returns None
    when the collector's configuration is not eligible."""

    def __init__(self, layers: list[_Layer], n_families: int) -> None:
        self.layers = {layer.module: layer for layer in layers}
        self.n_families = n_families

    @classmethod
    def build(cls, collector) -> LeanLinearPath | None:
        config, engine = collector.config, collector._engine
        state = collector._state
        if (
            config.kind != "empirical"
            or config.unit != "sample"
            or not state.defers_products
            or state.device.type != "cpu"
            or engine is None
            or engine.static_multi
        ):
            return None
        families = collector._unit_families
        layers: list[_Layer] = []
        for module, handler in engine.handlers.items():
            if type(module) is not nn.Linear or set(handler.attrs) - {"weight", "bias"}:
                return None
            if "weight" not in handler.attrs:
                return None
            wanted = {a: engine.requests.get(n, []) for a, n in handler.attrs.items()}
            eligible, family = _channel_family(module, wanted, families)
            if family is not None and (
                # a family of weight rows without their bias has mask values b·(W a), not b·y
                (module.bias is not None and "bias" not in handler.attrs)
                # a family fed by several layers: the general path adds their values
                or any(layer.family == family for layer in layers)
            ):
                eligible = False
            if not eligible:
                return None
            layers.append(_Layer(module, handler.attrs["weight"], handler.attrs.get("bias"),
                                 family))  # fmt: skip
        return cls(layers, len(families))

    def collect(self, collector, prepared) -> bool:
        """Add the batch like the general path; False (nothing done) when it is not eligible."""
        engine = collector._engine
        sites = engine.sites
        n = prepared.n_samples
        if collector._check_pending or len(sites) != len(self.layers):
            return False
        chunk = collector.config.chunk_bytes // max(1, 8 * n)
        for site in sites:
            a = site.saved[0]
            width = site.handler.module.out_features
            if a.dim() != 2 or a.shape[0] != n or engine.calls[site.handler.module] != 1:
                return False
            if chunk < width:
                return False
        collector._closed_form = None
        objective = collector._live_likelihood.loss(prepared, prepared.targets)
        grads = torch.autograd.grad(objective, engine.edges, allow_unused=True)
        dtype = collector._compute_dtype
        signal = collector.collect_signal
        sq: dict[str, torch.Tensor] = {}
        g_sum: dict[str, torch.Tensor] = {}
        gemms: list = []
        trace: list[torch.Tensor | None] = [None] * self.n_families
        mask: list[torch.Tensor | None] = [None] * self.n_families
        sums: list[torch.Tensor] = []
        with torch.no_grad():
            for site, grad in zip(reversed(sites), reversed(grads), strict=True):
                if grad is None:  # that output did not reach the objective
                    continue
                layer = self.layers[site.handler.module]
                cdt = compute_dtype(grad)
                a, b = site.saved[0].to(cdt), grad.to(cdt)
                a2 = a.square()
                a2_rows = a2.sum(1)
                b2 = b.square()
                b2_rows = b2.sum(1)
                gemms.append((layer.weight, None, b2.T, a2))
                sums.append(a2_rows @ b2_rows)
                if signal:
                    g_sum[layer.weight] = (b.T @ a).to(dtype)
                if layer.bias is not None:
                    sq[layer.bias] = b2.sum(0).to(dtype)
                    sums.append(b2_rows.sum())
                    if signal:
                        g_sum[layer.bias] = b.sum(0).to(dtype)
                if layer.family is not None:
                    y = site.saved[1].reshape(n, -1).to(cdt)
                    plus = a2_rows[:, None] if layer.bias is None else a2_rows[:, None] + 1.0
                    trace[layer.family] = (b2 * plus).to(dtype)
                    mask[layer.family] = (b * y).to(dtype).square()
        return _finish(collector, prepared, objective, sq, g_sum, gemms, trace, mask, sums)


def _channel_family(
    module: nn.Linear, wanted: dict[str, list[Request]], families
) -> tuple[bool, int | None]:
    """(whether the lean path handles the layer's group requests, the index of its one
    output-channel family of block 1, None without requests)."""
    if not any(wanted.values()):
        return True, None
    requests = [r for rs in wanted.values() for r in rs]
    if len(requests) != len(wanted) or any(len(rs) != 1 for rs in wanted.values()):
        return False, None
    fam = requests[0].family
    for r in requests:
        if (r.family, r.axis, r.block, r.in_mask) != (fam, 0, 1, True):
            return False, None
        if tuple(r.assign.shape) != (module.out_features,):
            return False, None
    return families[fam].size == module.out_features, fam


def _finish(collector, prepared, objective, sq, g_sum, gemms, trace, mask, sums) -> bool:
    """``BatchCore._finish`` of the lean path: zeros for what no layer wrote, the finiteness
    test (one float64 sum of the proxies, the written group rows and the loss; zeros need
    none), then the state."""
    state, dtype = collector._state, collector._compute_dtype
    device = state.device
    written = {g[0] for g in gemms}
    shapes = state.shapes
    if len(sq) + len(written) < len(shapes):  # an output that did not reach the objective
        for name, shape in shapes.items():
            if name not in sq and name not in written:
                sq[name] = torch.zeros(shape, dtype=dtype, device=device)
    if collector.collect_signal and len(g_sum) < len(shapes):
        for name, shape in shapes.items():
            if name not in g_sum:
                g_sum[name] = torch.zeros(shape, dtype=dtype, device=device)
    trace_rows: dict[str, torch.Tensor] = {}
    mask_rows: dict[str, torch.Tensor] = {}
    for index, fam in enumerate(collector._unit_families):
        for rows, out in ((trace, trace_rows), (mask, mask_rows)):
            value = rows[index]
            if value is None:
                value = torch.zeros(prepared.n_samples, fam.size, dtype=dtype, device=device)
            out[fam.name] = value
    parts = [t.sum() for t in (*trace, *mask) if t is not None and t.numel()]
    with torch.no_grad():  # (the objective needs no detached copy)
        total = torch.stack([*parts, *sums, objective]).sum(dtype=torch.float64)
    ok = (total - total) == 0
    if collector.nonfinite == "raise" and not bool(ok):  # sync-ok: CPU only
        raise NonFiniteError(
            "non-finite batch (nonfinite='raise'): its loss or per-unit statistics (Σg², Σg, "
            "Σg⁴ or group values) hold NaN/inf; nothing was accumulated"
        )
    n_units = torch.full((), prepared.n_samples, dtype=torch.float64, device=device)
    state.update(ok, n_units, prepared.n_samples, prepared.n_tokens, 1.0, sq, None, g_sum,
                 trace_rows, mask_rows, None, gemms=gemms)  # fmt: skip
    return True
