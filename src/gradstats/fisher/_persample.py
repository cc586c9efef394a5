r"""Exact per-unit gradients from each module call's output gradient, one handler per layer type.

A handler sees, for one call of its module, the saved input ``a`` and the gradient ``b`` of the
module's output (for the pass objective Σ_units l_i), and reduces the per-unit gradients of the
module's *own* parameters without ever materialising more than one chunk of them:

* ``nn.Linear`` (W [out, in]) and Hugging Face GPT-2 ``Conv1D`` (W [in, out], transposed). With
  units of one position (non-sequence inputs, or ``unit="token"``), g_i = b_i a_iᵀ and
  Σ_i g_i² = (b²)ᵀ(a²): one GEMM on squared tensors (chunked over output features for large
  vocabularies). Sequences: g_i = Σ_t b_it a_itᵀ by a batched matmul per chunk of units.
  Bias: g_i = Σ_t b_it.
* ``nn.Embedding`` (W [V, d]): g_i[v] = Σ_{t: x_it = v} b_it. Rows are summed within a unit
  before squaring (sort + segment sum, no dense [B, V, d]); ``padding_idx`` rows get nothing.
* ``nn.LayerNorm`` / ``nn.RMSNorm`` / Hugging Face ``*RMSNorm``: g_i(γ) = Σ_t b_it ⊙ x̂_it and
  g_i(β) = Σ_t b_it, with x̂ recomputed from the saved input (for Hugging Face norms x̂ = ∂y/∂γ
  is obtained by one forward-mode product, so variants such as (1 + γ) scaling stay exact).
* ``nn.Conv1d/2d/3d`` (any groups, stride, padding incl. ``"same"`` and non-zero padding modes,
  dilation): the weight gradient of a chunk of n samples as one convolution with n·groups groups.

Everything is computed in float32 (float64 for float64 models): bf16/fp16 inputs are upcast
before any square is taken.
"""

from __future__ import annotations

import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import UnitLayout, compute_dtype
from gradstats.fisher._handler import Handler, is_hf_conv1d, is_hf_rmsnorm
from gradstats.fisher._normconv import ConvHandler, NormHandler

__all__ = [
    "ConvHandler",
    "EmbeddingHandler",
    "Handler",
    "LinearHandler",
    "NormHandler",
    "is_hf_conv1d",
    "is_hf_rmsnorm",
]


class LinearHandler(Handler):
    """``nn.Linear`` and Hugging Face ``Conv1D`` (``transposed=True``)."""

    module: nn.Linear  # or a Hugging Face Conv1D: the same ``weight``/``bias``, transposed
    name = "linear"

    def __init__(self, module, attrs, label, transposed: bool = False) -> None:
        super().__init__(module, attrs, label)
        self.transposed = transposed
        if transposed:
            self.name = "conv1d_hf"

    keep_output = False

    def configure(self, requests):
        # a mask on output features needs z = W a per unit: keep a copy of the output (cheap)
        # instead of recomputing it (a forward GEMM) in the backward hook
        out_axis = 1 if self.transposed else 0
        self.keep_output = any(r.in_mask and r.axis == out_axis for r in requests.get("weight", []))

    def weight_out_in(self) -> torch.Tensor:
        weight = self.module.get_parameter("weight").detach()
        return weight.T if self.transposed else weight

    def save(self, args, kwargs, output):
        keep = self.keep_output and isinstance(output, torch.Tensor)
        return args[0].detach(), output.detach().clone() if keep else None

    def prepare(self, layout, saved, grad):
        inputs = saved[0]
        self.check_batch(layout, inputs, "the input")
        self.check_batch(layout, grad, "the output gradient")
        cdt = compute_dtype(grad)
        a = layout.rows(inputs, f"the input of {self.label!r}").to(cdt)
        b = self.masked(layout, layout.rows(grad, f"the output of {self.label!r}").to(cdt))
        return a, b

    def bytes_per_unit(self, attrs):
        return 3 * 8 * self.module.weight.numel()

    def materialise(self, prepared, attrs, lo, hi):
        a, b = prepared
        out = {}
        if "weight" in attrs:  # Σ_t b_t a_tᵀ, laid out like the weight (contiguous)
            if self.transposed:
                out["weight"] = torch.bmm(a[lo:hi].transpose(1, 2), b[lo:hi])
            else:
                out["weight"] = torch.bmm(b[lo:hi].transpose(1, 2), a[lo:hi])
        if "bias" in attrs:
            out["bias"] = b[lo:hi].sum(1)
        return out

    def accumulate(self, layout, saved, grad, attrs, requests):
        inputs = saved[0]
        if layout.unit == "sample" and inputs.dim() == 2 and grad.dim() == 2:  # [B, f]: as is
            self.check_batch(layout, inputs, "the input")
            self.check_batch(layout, grad, "the output gradient")
            cdt = compute_dtype(grad)
            a, b = inputs.to(cdt), grad.to(cdt)
        else:
            a, b = self.prepare(layout, saved, grad)
            if a.shape[1] != 1:
                self.accumulate_chunked(layout, (a, b), attrs, requests)
                return
            a, b = a[:, 0], b[:, 0]
        a2 = a.square()
        centred = _Centred(layout, a, a2) if layout.se else None
        n, width = b.shape
        step = max(1, min(width, layout.chunk_bytes // max(1, 8 * n)))
        a2_rows = None if centred is not None else a2.sum(1)  # for the finiteness proxies
        b2_full = None
        for start in range(0, width, step):  # output features, chunked for large vocabularies
            rows = slice(start, min(width, start + step))
            b_c = b if step >= width else b[:, rows]
            b2 = b_c.square()
            if step >= width:
                b2_full = b2
            b2_rows = None if a2_rows is None else b2.sum(1)
            if "weight" in attrs:
                if a2_rows is not None and b2_rows is not None:  # (not centred)
                    self._add_sq_weight(layout, rows, step >= width, a2, b2)
                    layout.add_proxy(self.attrs["weight"], a2_rows @ b2_rows)
                elif centred is None:
                    raise RuntimeError("unreachable: no centred sums and no proxy rows")
                else:
                    for store, value in zip(centred.stores, centred.weight(b_c), strict=True):
                        self._add_weight(layout, store, rows, value)
                if layout.lin is not None:
                    self._add_weight(layout, layout.lin, rows, b_c.T @ a)
            if "bias" in attrs:
                name = self.attrs["bias"]
                self._add_rows(layout, layout.sq, name, rows, b2.sum(0))
                if b2_rows is not None:
                    layout.add_proxy(name, b2_rows.sum())
                if centred is not None:
                    for store, value in zip(centred.stores[1:], centred.bias(b_c), strict=True):
                        self._add_rows(layout, store, name, rows, value)
                if layout.lin is not None:
                    self._add_rows(layout, layout.lin, name, rows, b_c.sum(0))
        if any(requests.values()):
            self._families(layout, requests, a, b, a2, saved[1], b2_full, a2_rows)

    def _add_sq_weight(self, layout, rows, full, a2, b2):
        """sq[weight] (+)= (b²)ᵀ(a²) of output features ``rows``, in the weight's layout."""
        index = None if full else ((slice(None), rows) if self.transposed else (rows,))
        m1, m2 = (a2.T, b2) if self.transposed else (b2.T, a2)
        layout.add_sq_product(self.attrs["weight"], index, m1, m2, self.module.weight.shape)

    def _store(self, layout, store, name):
        if name not in store:
            param = getattr(self.module, next(a for a, n in self.attrs.items() if n == name))
            store[name] = torch.zeros(param.shape, dtype=layout.dtype, device=param.device)
        return store[name]

    def _add_weight(self, layout, store, rows, value):
        name = self.attrs["weight"]
        value = value.T if self.transposed else value
        if name not in store and value.shape == self.module.weight.shape:
            store[name] = value.to(layout.dtype)  # a fresh GEMM result: keep it, no zeros + add
        elif self.transposed:
            self._store(layout, store, name)[:, rows] += value
        else:
            self._store(layout, store, name)[rows] += value

    def _add_rows(self, layout, store, name, rows, value):
        if name not in store and value.shape[0] == self.module.bias.shape[0]:
            store[name] = value.to(layout.dtype)
        else:
            self._store(layout, store, name)[rows] += value

    def _families(self, layout, requests, a, b, a2, output, b2=None, a2_rows=None):
        """Per-unit marginals along output features (rows of nn.Linear, columns of Conv1D) or
        input features: trace Σ g² and mask Σ θ g, each computed once per kind.

        A family that takes a channel's weight row *and* its bias (the default output-channel
        groups) gets both at once: trace b²(‖a‖² + 1) and mask value b·y with y = W a + bias
        the layer's output (kept by ``save``), one write per family instead of two."""
        b2 = b.square() if b2 is None else b2
        n = b.shape[0]
        cache: dict[str, torch.Tensor] = {}
        bias = self.module.bias

        def a2_sum():
            if "a2_sum" not in cache:
                cache["a2_sum"] = (a2.sum(1) if a2_rows is None else a2_rows)[:, None]
            return cache["a2_sum"]

        def output_z(with_bias: bool):
            key = "y" if with_bias else "z"
            if key not in cache:
                if output is not None:
                    z = output.reshape(n, -1).to(b.dtype)
                    if not with_bias and bias is not None:
                        z = z - bias.detach().to(b.dtype)
                else:
                    z = a @ self.weight_out_in().to(b.dtype).T
                    if with_bias and bias is not None:
                        z = z + bias.detach().to(b.dtype)
                cache[key] = z
            return cache[key]

        def get(key):
            if key not in cache:
                if key == "out_trace":
                    cache[key] = b2 * a2_sum()
                elif key == "in_trace":
                    cache[key] = a2 * b2.sum(1, keepdim=True)
                elif key == "out_mask":  # Σ_in W_o,in b_o a_in = b_o z_o, z = W a
                    cache[key] = b * output_z(False)
                else:  # in_mask: Σ_o W_o,in b_o a_in = a_in (Wᵀ b)_in
                    cache[key] = a * (b @ self.weight_out_in().to(b.dtype))
            return cache[key]

        out_axis = 1 if self.transposed else 0
        fused = self._fused_pairs(requests, out_axis)
        for weight_request, _ in fused:
            lin = b * output_z(True) if weight_request.in_mask else None
            layout.add_family(weight_request, 0, n, b2 * (a2_sum() + 1.0), lin)
        done = {id(r) for pair in fused for r in pair}  # (ids: a Request holds a tensor)
        for attr, wanted in requests.items():
            for request in wanted:
                if id(request) in done:
                    continue
                if attr == "bias":
                    lin = b * bias.detach().to(b.dtype) if request.in_mask else None
                    layout.add_family(request, 0, n, b2, lin)
                    continue
                side = "out" if request.axis == out_axis else "in"
                lin = get(f"{side}_mask") if request.in_mask else None
                layout.add_family(request, 0, n, get(f"{side}_trace"), lin)

    @staticmethod
    def _fused_pairs(requests, out_axis):
        """[(weight request, bias request)] of the same family over output features with the
        same grouping (identity or equal blocks) and the same mask membership."""
        pairs = []
        biases = list(requests.get("bias", ()))
        for w in requests.get("weight", ()):
            if w.axis != out_axis or not w.block:
                continue
            for bias_request in biases:
                same = (bias_request.family, bias_request.block, bias_request.in_mask) == (
                    w.family,
                    w.block,
                    w.in_mask,
                )
                if same and bias_request.assign.shape == w.assign.shape:
                    pairs.append((w, bias_request))
                    biases = [r for r in biases if r is not bias_request]
                    break
        return pairs


class _Centred:
    r"""Centred sums of x_i = b_i² ⊗ a_i² (one position per unit) by GEMMs, about the rank-1
    reference c = m² with m = m_b ⊗ m_a, the batch means of b and a over the units.

    With β = m_b², α = m_a², u_i = (b_i − m_b)(b_i + m_b) = b_i² − β and
    v_i = (a_i − m_a)(a_i + m_a) = a_i² − α (both 0 on inactive rows; the factored form keeps
    them right to float32 precision at any offset), x_i − c = u_i a_i² + β v_i, so
    Σ(x − c) = uᵀa² + β ⊗ Σv and Σ(x − c)² = (u²)ᵀa⁴ + 2β ⊙ uᵀ(a² v) + β² ⊗ Σv²: sums of
    small centred products, and Σx = N·c + Σ(x − c) replaces the plain GEMM (b²)ᵀa²."""

    def __init__(self, layout: UnitLayout, a: torch.Tensor, a2: torch.Tensor) -> None:
        self.stores = (layout.sq, layout.ref, layout.dev, layout.dev2)
        self.w = layout.row_weights(0, a.shape[0], a.dtype)
        self.count = layout.n_active(a.device).to(a.dtype)
        self.inv = 1.0 / self.count.clamp(min=1.0)
        self.m_a = self._mean(a)
        v = self._centred(a, self.m_a)
        self.alpha = self.m_a.square()
        self.a2, self.a4, self.a2v = a2, a2.square(), a2 * v
        self.sv, self.sv2 = v.sum(0), v.square().sum(0)

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.w is None else x * self.w[:, None]).sum(0) * self.inv

    def _centred(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        d = (x - m) * (x + m)
        return d if self.w is None else d * self.w[:, None]

    def weight(self, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(Σx, m, Σ(x − c), Σ(x − c)²) of the weight rows of ``b`` ([n, out chunk])."""
        m_b = self._mean(b)
        u, beta = self._centred(b, m_b), m_b.square()[:, None]
        dev = u.T @ self.a2 + beta * self.sv[None, :]
        dev2 = u.square().T @ self.a4 + 2.0 * beta * (u.T @ self.a2v)
        dev2 = dev2 + beta.square() * self.sv2[None, :]
        return beta * self.alpha[None, :] * self.count + dev, m_b[:, None] * self.m_a, dev, dev2

    def bias(self, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(m, Σ(x − c), Σ(x − c)²) of the bias with x_i = b_i²."""
        m_b = self._mean(b)
        u = self._centred(b, m_b)
        return m_b, u.sum(0), u.square().sum(0)


class EmbeddingHandler(Handler):
    """``nn.Embedding``: per-unit rows summed before squaring; ``padding_idx`` excluded."""

    module: nn.Embedding
    name = "embedding"

    def __init__(self, module, attrs, label) -> None:
        super().__init__(module, attrs, label)
        if module.scale_grad_by_freq:
            raise ConfigurationError(
                f"module {label!r}: nn.Embedding(scale_grad_by_freq=True) scales gradients by "
                "frequencies within the whole batch, so per-sample gradients are undefined"
            )

    def prepare(self, layout, saved, grad):
        self.check_batch(layout, saved, "the index input")
        cdt = compute_dtype(grad)
        d = grad.shape[-1]
        if layout.unit == "sample":
            ids = saved.reshape(layout.n_samples, -1)
        else:
            ids = layout.rows(saved.unsqueeze(-1), f"the indices of {self.label!r}")[..., 0]
        b = self.masked(layout, layout.rows(grad, f"the output of {self.label!r}").to(cdt))
        if self.module.padding_idx is not None:
            b = b * (ids != self.module.padding_idx).unsqueeze(-1).to(cdt)
        return ids, b.reshape(ids.shape[0], ids.shape[1], d)

    def bytes_per_unit(self, attrs):
        return 3 * 8 * self.module.weight.numel()

    def materialise(self, prepared, attrs, lo, hi, into=None):
        """Per-unit rows [n, V, d]; with ``into`` (such a tensor, e.g. a tied output layer's
        per-unit gradients) the rows are added to it instead of to fresh zeros."""
        ids, b = prepared
        vocab, d = self.module.weight.shape
        n = hi - lo
        offsets = torch.arange(n, device=ids.device).unsqueeze(1) * vocab
        g = torch.zeros(n * vocab, d, dtype=b.dtype, device=b.device) if into is None else into
        g = g.view(n * vocab, d)
        rows = b[lo:hi].reshape(n * ids.shape[1], d)  # explicit sizes: d may be 0
        g.index_add_(0, (offsets + ids[lo:hi]).reshape(-1), rows.to(g.dtype))
        return {"weight": g.view(n, vocab, d)}

    def accumulate(self, layout, saved, grad, attrs, requests):
        ids, b = self.prepare(layout, saved, grad)
        if any(requests.values()):
            self.accumulate_chunked(layout, (ids, b), attrs, requests)
            return
        vocab, d = self.module.weight.shape
        name = self.attrs["weight"]
        flat_b = b.reshape(ids.numel(), d)
        if ids.shape[1] == 1:  # one position per unit: rows are already per unit
            rows, sums = ids.reshape(-1), flat_b
        else:  # sum b over equal (unit, token) keys: sort + segment sum, no [B, V, d] buffer
            units = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
            keys, order = (units * vocab + ids).reshape(-1).sort()
            new = torch.ones_like(keys, dtype=torch.bool)
            new[1:] = keys[1:] != keys[:-1]
            segment = new.cumsum(0) - 1
            sums = torch.zeros_like(flat_b).index_add_(0, segment, flat_b[order])
            rows = torch.zeros_like(keys).scatter_(0, segment, keys % vocab)
        squares = sums.square()
        self._index_add(layout, layout.sq, name, rows, squares)
        if layout.se:
            self._centred(layout, name, rows, sums)
        if layout.lin is not None:
            self._index_add(layout, layout.lin, name, rows, sums)

    def _centred(self, layout, name, rows, sums):
        r"""Centred sums about c = m², m_v = Σ_units g / N (g = 0 for a unit without row v):
        with d = (g − m)(g + m) = x − c on the T_v units that touch row v (inactive positions
        count nowhere), dev = Σ d − (N − T_v) c and dev2 = Σ d² + (N − T_v) c²."""
        count = layout.n_active(sums.device).to(layout.dtype)
        vocab, width = self.module.weight.shape
        sums = sums.to(layout.dtype)
        zeros = torch.zeros(vocab, width, dtype=layout.dtype, device=sums.device)
        ref = zeros.index_add(0, rows, sums) / count.clamp(min=1.0)
        touched = layout.row_weights(0, rows.shape[0], layout.dtype)  # token units: positions
        if touched is None:
            touched = torch.ones(rows.shape[0], dtype=layout.dtype, device=rows.device)
        m = ref[rows]
        d = (sums - m) * (sums + m) * touched[:, None]
        hits = torch.zeros(vocab, dtype=layout.dtype, device=rows.device).index_add_(
            0, rows, touched
        )
        missing, c = (count - hits)[:, None], ref.square()
        dev = zeros.index_add(0, rows, d) - missing * c
        dev2 = zeros.index_add(0, rows, d.square()) + missing * c.square()
        layout.set_centred(name, ref, dev, dev2)

    def _index_add(self, layout, store, name, rows, values):
        if name not in store:
            weight = self.module.weight
            store[name] = torch.zeros(weight.shape, dtype=layout.dtype, device=weight.device)
        store[name].index_add_(0, rows, values.to(layout.dtype))
