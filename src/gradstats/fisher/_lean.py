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
bits (``tests/fisher/test_lean_path.py`` pins them in float32 and float64) — except where the
pending sums must fold early to stay in range (:meth:`FisherState.reserve`: entries within a
factor ~FOLD_EVERY of the dtype's largest value): the two paths bound a batch differently (the
maxima here, the finiteness total there), so they may fold at other batches, and agree to the
rounding of the pending sums (float32: relative ~1e-6) instead of to the bit. What is left out is
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

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradstats.errors import NonFiniteError
from gradstats.fisher._accumulate import Request

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

    def __init__(self, layers: list[_Layer], n_families: int, max_rows: int) -> None:
        self.layers = {layer.module: layer for layer in layers}
        self.n_families = n_families
        # the general path materialises per-sample gradients in chunks of chunk_bytes // (8 n)
        # rows; the lean path needs no chunking: n rows with 8·n·width ≤ chunk_bytes
        self.max_rows = max_rows

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
        width = max((layer.module.out_features for layer in layers), default=1)
        return cls(layers, len(families), config.chunk_bytes // (8 * max(1, width)))

    def collect(self, collector, prepared) -> bool:
        """Add the batch like the general path; False (nothing done) when it is not eligible."""
        engine = collector._engine
        sites = engine.sites
        n = prepared.n_samples
        layers = self.layers
        if collector._check_pending or len(sites) != len(layers) or n > self.max_rows:
            return False
        calls = engine.calls
        for site in sites:
            a = site.saved[0]
            if a.dim() != 2 or a.shape[0] != n or calls[site.handler.module] != 1:
                return False
        collector._closed_form = None
        objective = collector._live_likelihood.loss(prepared, prepared.targets)
        grads = torch.autograd.grad(objective, engine.edges, allow_unused=True)
        dtype = collector._compute_dtype
        signal = collector.collect_signal
        families = self.n_families
        sq: dict[str, torch.Tensor] = {}
        g_sum: dict[str, torch.Tensor] = {}
        gemms: list = []
        trace: list[torch.Tensor | None] = [None] * families
        mask: list[torch.Tensor | None] = [None] * families
        peaks: list[torch.Tensor] = []  # max a², max b² per layer (see _finite)
        squares: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (a², b², has a bias)
        missing = bare = False
        with torch.no_grad():
            for site, grad in zip(reversed(sites), reversed(grads), strict=True):
                if grad is None:  # that output did not reach the objective
                    missing = True
                    continue
                layer = layers[site.handler.module]
                a, b = site.saved[0], grad
                cdt = torch.float64 if b.dtype == torch.float64 else torch.float32  # compute_dtype
                if b.dtype is not cdt or a.dtype is not cdt:  # (bf16/fp16: upcast first)
                    a, b = a.to(cdt), b.to(cdt)
                wide = cdt is not dtype  # a float32 layer of a model with float64 parameters
                a2 = a.square()
                b2 = b.square()
                if a2.numel() and b2.numel():
                    peaks += [a2.amax(), b2.amax()]
                else:  # a zero-width layer: its proxies decide (see _finite)
                    bare = True
                squares.append((a2, b2, layer.bias is not None))
                gemms.append((layer.weight, None, b2.T, a2))
                if signal:
                    g = b.T @ a
                    g_sum[layer.weight] = g.to(dtype) if wide else g
                if layer.bias is not None:
                    bias_sq = b2.sum(0)
                    sq[layer.bias] = bias_sq.to(dtype) if wide else bias_sq
                    if signal:
                        g = b.sum(0)
                        g_sum[layer.bias] = g.to(dtype) if wide else g
                if layer.family is not None:
                    y = site.saved[1].reshape(n, -1).to(cdt)
                    a2_rows = a2.sum(1)
                    plus = a2_rows[:, None] if layer.bias is None else a2_rows[:, None] + 1.0
                    trace[layer.family] = (b2 * plus).to(dtype)
                    mask[layer.family] = (b * y).to(dtype).square()
        if missing:
            _zero_fill(collector, sq, g_sum, gemms, signal)
        bound = _finite(objective, peaks, squares, trace, mask, bare)
        accepted = math.isfinite(bound)
        if accepted:
            collector._state.reserve(bound)
        return _finish(collector, prepared, sq, g_sum, gemms, trace, mask, accepted)


def _finite(objective, peaks, squares, trace, mask, bare: bool) -> float:
    """An upper bound of every entry of the batch's Σg² sums when the batch passes the general
    path's finiteness test, else inf; from one host read.

    The general path (``LinearHandler`` proxies, ``BatchCore._finish``) accepts a batch when
    the loss, the sums of the written group rows and, per layer, Σ_i ‖a_i‖²‖b_i‖² (formed as
    the row sums of a² dotted with those of b²) and, with a bias, Σ_i ‖b_i‖² are finite in the
    compute dtype. The row sums are bounded by d_in·max a² and d_out·max b², the proxies by
    n·d_in·d_out·max a²·max b² and n·d_out·max b² (float rounding of non-negative sums adds
    under a factor 2 here), so the maxima — one op per square instead of the proxies' three —
    decide the batch wherever every bound is below the dtype's largest value. The proxies
    themselves are formed only where one is not (entries near 1e19 in float32: a row sum that
    overflows next to a zero row makes the general path's proxy inf·0 = NaN) and for a layer
    with a zero-size side (``bare``: no maxima to take): the same decisions, in fewer ops.
    The bound (n·max a²·max b² and n·max b² per layer, or the proxies' total) lets the state
    fold its pending sums before they could overflow (:meth:`FisherState.reserve`)."""
    parts = [objective, *peaks]
    parts += [t.sum() for t in (*trace, *mask) if t is not None and t.numel()]
    with torch.no_grad():  # (the objective needs no detached copy)
        values = torch.stack(parts).tolist()  # sync-ok: CPU only (the lean path's condition)
    if not all(map(math.isfinite, values)):
        return math.inf
    if bare:
        return _proxies_total(squares)
    k, bound = 1, 0.0
    for a2, b2, _ in squares:
        limit = torch.finfo(b2.dtype).max / 2
        n, width_in, width_out = a2.shape[0], a2.shape[1], b2.shape[1]
        peak_a, peak_b = values[k], values[k + 1]
        k += 2
        if (
            width_in * peak_a > limit
            or width_out * peak_b > limit
            or n * width_in * width_out * peak_a * peak_b > limit
            or n * width_out * peak_b > limit
        ):
            return _proxies_total(squares)
        bound = max(bound, n * peak_b * max(peak_a, 1.0))
    return bound


def _proxies_total(squares) -> float:
    """The general path's proxies themselves (see :func:`_finite`): their float64 total (an
    upper bound of every entry of the layers' Σg²), NaN/inf when one of them is not finite."""
    proxies = []
    with torch.no_grad():
        for a2, b2, bias in squares:
            b2_rows = b2.sum(1)
            proxies.append(a2.sum(1) @ b2_rows)
            if bias:
                proxies.append(b2_rows.sum())
        total = torch.stack(proxies).sum(dtype=torch.float64)
    value = total.item()  # sync-ok: CPU only (rare: entries near the dtype's max)
    return value if math.isfinite(value) else math.inf


def _zero_fill(collector, sq, g_sum, gemms, signal: bool) -> None:
    """Zeros for the statistics of the layers whose output did not reach the objective."""
    state, dtype = collector._state, collector._compute_dtype
    written = {g[0] for g in gemms}
    for name, shape in state.shapes.items():
        if name not in sq and name not in written:
            sq[name] = torch.zeros(shape, dtype=dtype, device=state.device)
        if signal and name not in g_sum:
            g_sum[name] = torch.zeros(shape, dtype=dtype, device=state.device)


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


def _finish(collector, prepared, sq, g_sum, gemms, trace, mask, accepted: bool) -> bool:
    """``BatchCore._finish`` of the lean path: zero rows for families no layer wrote, the
    ``nonfinite`` policy, then the state."""
    dtype, device = collector._compute_dtype, collector._state.device
    trace_rows: dict[str, torch.Tensor] = {}
    mask_rows: dict[str, torch.Tensor] = {}
    for index, fam in enumerate(collector._unit_families):
        for rows, out in ((trace, trace_rows), (mask, mask_rows)):
            value = rows[index]
            if value is None:
                value = torch.zeros(prepared.n_samples, fam.size, dtype=dtype, device=device)
            out[fam.name] = value
    if not accepted and collector.nonfinite == "raise":
        raise NonFiniteError(
            "non-finite batch (nonfinite='raise'): its loss or per-unit statistics (Σg², Σg, "
            "Σg⁴ or group values) hold NaN/inf; nothing was accumulated"
        )
    collector._state.update(accepted, None, prepared.n_samples, prepared.n_tokens, 1.0, sq,
                            None, g_sum, trace_rows, mask_rows, None, gemms=gemms)  # fmt: skip
    return True
