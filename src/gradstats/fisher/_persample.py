r"""Exact per-unit gradients inside backward hooks, one handler per layer type.

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
import torch.nn.functional as F
from torch import nn

from gradstats.fisher._accumulate import (
    Request,
    UnitLayout,
    accumulate_materialised,
    compute_dtype,
)

__all__ = [
    "ConvHandler",
    "EmbeddingHandler",
    "Handler",
    "LinearHandler",
    "NormHandler",
    "is_hf_conv1d",
    "is_hf_rmsnorm",
]

Requests = dict[str, list[Request]]


class Handler:
    """Base class: per-unit gradients of the direct parameters ``attrs`` of one module.

    Subclasses implement ``prepare`` (views of the saved input and output gradient, per pass),
    ``materialise`` (per-unit gradients of units lo..hi) and ``bytes_per_unit``; ``accumulate``
    defaults to chunked materialisation and may be overridden with a faster closed form.
    """

    name = "handler"
    token_units = True  # can positions be units (unit="token")?

    def __init__(self, module: nn.Module, attrs: dict[str, str], label: str) -> None:
        self.module = module
        self.attrs = attrs  # attribute -> parameter name
        self.label = label  # module name, for messages
        self.replay = None  # context-manager factory set by the engine (re-executing forwards)

    def save(self, args: tuple, kwargs: dict, output: object) -> object:
        return args[0].detach()

    def configure(self, requests: Requests) -> None:
        """Told once which group requests its parameters have (to keep what they need)."""

    def prepare(self, layout: UnitLayout, saved: object, grad: torch.Tensor) -> object:
        raise NotImplementedError

    def materialise(
        self, prepared: object, attrs: list[str], lo: int, hi: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bytes_per_unit(self, attrs: list[str]) -> int:
        return sum(3 * 8 * self.module.get_parameter(attr).numel() for attr in attrs)

    def theta(self, attr: str) -> torch.Tensor:
        return self.module.get_parameter(attr).detach()

    def accumulate(
        self,
        layout: UnitLayout,
        saved: object,
        grad: torch.Tensor,
        attrs: list[str],
        requests: Requests,
    ) -> None:
        self.accumulate_chunked(layout, self.prepare(layout, saved, grad), attrs, requests)

    def accumulate_chunked(self, layout, prepared, attrs, requests) -> None:
        n = layout.n_units
        step = layout.chunk(self.bytes_per_unit(attrs))
        for lo in range(0, n, step):
            grads = self.materialise(prepared, attrs, lo, min(n, lo + step))
            for attr, g in grads.items():
                wanted = requests.get(attr, ())
                theta = self.theta(attr) if any(r.in_mask for r in wanted) else None
                accumulate_materialised(layout, self.attrs[attr], g, lo, wanted, theta)

    def check_batch(self, layout: UnitLayout, tensor: torch.Tensor, what: str) -> None:
        if tensor.dim() == 0 or tensor.shape[0] != layout.n_samples:
            raise ValueError(
                f"module {self.label!r}: {what} has shape {tuple(tensor.shape)} but the batch has "
                f"{layout.n_samples} samples; per-sample gradients need batch-first tensors"
            )

    def masked(self, layout: UnitLayout, b: torch.Tensor) -> torch.Tensor:
        weights = layout.token_weights()
        if weights is None:
            return b
        return b * weights.to(b.dtype).view(-1, *([1] * (b.dim() - 1)))


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D``: y = x W + b with W [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_hf_rmsnorm(module: nn.Module) -> bool:
    """A Hugging Face-style RMSNorm: class name ending in ``RMSNorm``, only a ``weight``."""
    names = set(module._parameters)
    return type(module).__name__.endswith("RMSNorm") and names == {"weight"}


class LinearHandler(Handler):
    """``nn.Linear`` and Hugging Face ``Conv1D`` (``transposed=True``)."""

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
        weight = self.module.weight.detach()
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
        a, b = self.prepare(layout, saved, grad)
        if a.shape[1] != 1:
            self.accumulate_chunked(layout, (a, b), attrs, requests)
            return
        a, b = a[:, 0], b[:, 0]
        a2 = a.square()
        a4 = a2.square() if layout.sq4 is not None else None
        n, width = b.shape
        step = max(1, min(width, layout.chunk_bytes // max(1, 8 * n)))
        for start in range(0, width, step):  # output features, chunked for large vocabularies
            rows = slice(start, min(width, start + step))
            b_c = b[:, rows]
            b2 = b_c.square()
            if "weight" in attrs:
                self._add_weight(layout, layout.sq, rows, b2.T @ a2)
                if a4 is not None:
                    self._add_weight(layout, layout.sq4, rows, b2.square().T @ a4)
                if layout.lin is not None:
                    self._add_weight(layout, layout.lin, rows, b_c.T @ a)
            if "bias" in attrs:
                name = self.attrs["bias"]
                self._add_rows(layout, layout.sq, name, rows, b2.sum(0))
                if layout.sq4 is not None:
                    self._add_rows(layout, layout.sq4, name, rows, b2.square().sum(0))
                if layout.lin is not None:
                    self._add_rows(layout, layout.lin, name, rows, b_c.sum(0))
        if any(requests.values()):
            self._families(layout, requests, a, b, a2, saved[1])

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
        if name not in store and value.shape[0] == self.module.get_parameter("bias").shape[0]:
            store[name] = value.to(layout.dtype)
        else:
            self._store(layout, store, name)[rows] += value

    def _families(self, layout, requests, a, b, a2, output):
        """Per-unit marginals along output features (rows of nn.Linear, columns of Conv1D) or
        input features: trace Σ g² and mask Σ θ g, each computed once per kind."""
        b2 = b.square()
        n = b.shape[0]
        cache: dict[str, torch.Tensor] = {}

        def get(key):
            if key not in cache:
                weight = self.weight_out_in().to(b.dtype)
                if key == "out_trace":
                    cache[key] = b2 * a2.sum(1, keepdim=True)
                elif key == "in_trace":
                    cache[key] = a2 * b2.sum(1, keepdim=True)
                elif key == "out_mask":  # Σ_in W_o,in b_o a_in = b_o z_o, z = W a
                    if output is not None:
                        z = output.reshape(n, -1).to(b.dtype)
                        if self.module.bias is not None:
                            z = z - self.module.bias.detach().to(b.dtype)
                    else:
                        z = a @ weight.T
                    cache[key] = b * z
                else:  # in_mask: Σ_o W_o,in b_o a_in = a_in (Wᵀ b)_in
                    cache[key] = a * (b @ weight)
            return cache[key]

        out_axis = 1 if self.transposed else 0
        for attr, wanted in requests.items():
            for request in wanted:
                if attr == "bias":
                    lin = b * self.module.bias.detach().to(b.dtype) if request.in_mask else None
                    layout.add_family(request, 0, n, b2, lin)
                    continue
                side = "out" if request.axis == out_axis else "in"
                lin = get(f"{side}_mask") if request.in_mask else None
                layout.add_family(request, 0, n, get(f"{side}_trace"), lin)


class EmbeddingHandler(Handler):
    """``nn.Embedding``: per-unit rows summed before squaring; ``padding_idx`` excluded."""

    name = "embedding"

    def __init__(self, module, attrs, label) -> None:
        super().__init__(module, attrs, label)
        if module.scale_grad_by_freq:
            raise ValueError(
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
        g.index_add_(0, (offsets + ids[lo:hi]).reshape(-1), b[lo:hi].reshape(-1, d).to(g.dtype))
        return {"weight": g.view(n, vocab, d)}

    def accumulate(self, layout, saved, grad, attrs, requests):
        ids, b = self.prepare(layout, saved, grad)
        if any(requests.values()):
            self.accumulate_chunked(layout, (ids, b), attrs, requests)
            return
        vocab, d = self.module.weight.shape
        name = self.attrs["weight"]
        flat_b = b.reshape(-1, d)
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
        if layout.sq4 is not None:
            self._index_add(layout, layout.sq4, name, rows, squares.square())
        if layout.lin is not None:
            self._index_add(layout, layout.lin, name, rows, sums)

    def _index_add(self, layout, store, name, rows, values):
        if name not in store:
            weight = self.module.weight
            store[name] = torch.zeros(weight.shape, dtype=layout.dtype, device=weight.device)
        store[name].index_add_(0, rows, values.to(layout.dtype))


class NormHandler(Handler):
    """``nn.LayerNorm``, ``nn.RMSNorm`` and Hugging Face RMSNorm (``kind="hf"``)."""

    def __init__(self, module, attrs, label, kind: str) -> None:
        super().__init__(module, attrs, label)
        self.kind = kind
        self.name = {"layer": "layernorm", "rms": "rmsnorm", "hf": "rmsnorm_hf"}[kind]
        self.shape = tuple(module.weight.shape)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if self.kind == "layer":  # x̂ = (x − mean) / sqrt(var + eps): the native kernel
            return F.layer_norm(x.to(compute_dtype(x)), self.shape, None, None, module.eps)
        if self.kind == "rms":  # x̂ = x / sqrt(mean(x²) + eps), eps defaulting to the input's
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
            return F.rms_norm(x.to(compute_dtype(x)), self.shape, None, eps)
        weight = module.weight.detach()
        with self.replay():  # x̂ = ∂y/∂γ · 1 by one forward-mode product (exact for any variant)
            _, tangent = torch.func.jvp(
                lambda w: torch.func.functional_call(module, {"weight": w}, (x,)),
                (weight,),
                (torch.ones_like(weight),),
            )
        return tangent

    def save(self, args, kwargs, output):
        return {"input": args[0].detach()}  # x̂ is cached here by the first pass

    def prepare(self, layout, saved, grad):
        x = saved["input"]
        self.check_batch(layout, x, "the input")
        cdt = compute_dtype(grad)
        flat = (*x.shape[: x.dim() - len(self.shape)], -1)
        if saved.get("xhat") is None:
            saved["xhat"] = self.normalized(x).to(cdt).reshape(flat)
        xhat = saved["xhat"]
        a = layout.rows(xhat, f"the input of {self.label!r}")
        b = self.masked(layout, layout.rows(grad.to(cdt).reshape(flat), f"output of {self.label}"))
        return a, b

    def materialise(self, prepared, attrs, lo, hi):
        a, b = prepared
        out = {}
        if "weight" in attrs:
            out["weight"] = (b[lo:hi] * a[lo:hi]).sum(1).view(hi - lo, *self.shape)
        if "bias" in attrs:
            out["bias"] = b[lo:hi].sum(1).view(hi - lo, *self.shape)
        return out


class ConvHandler(Handler):
    """``nn.Conv1d/2d/3d`` via the grouped-convolution weight gradient of a chunk of samples."""

    token_units = False

    def __init__(self, module, attrs, label) -> None:
        super().__init__(module, attrs, label)
        self.dims = module.weight.dim() - 2
        self.name = f"conv{self.dims}d"
        self.weight_grad = {
            1: torch.nn.grad.conv1d_weight,
            2: torch.nn.grad.conv2d_weight,
            3: torch.nn.grad.conv3d_weight,
        }[self.dims]

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        m = self.module
        if m.padding_mode != "zeros":
            return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (
                0,
            ) * self.dims
        if m.padding == "valid":
            return x, (0,) * self.dims
        if m.padding == "same":
            pads = []
            for d, k in zip(reversed(m.dilation), reversed(m.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads), (0,) * self.dims
        return x, tuple(m.padding)

    def prepare(self, layout, saved, grad):
        if layout.unit != "sample":
            raise ValueError(
                f"module {self.label!r} ({self.name}) has no token positions: use unit='sample'"
            )
        if saved.dim() != self.dims + 2:
            raise ValueError(
                f"module {self.label!r}: per-sample gradients need a batched input of "
                f"{self.dims + 2} dims; got shape {tuple(saved.shape)}"
            )
        self.check_batch(layout, saved, "the input")
        cdt = compute_dtype(grad)
        x, padding = self._padded(saved.to(cdt))
        return x, grad.to(cdt), padding

    def materialise(self, prepared, attrs, lo, hi):
        x, b, padding = prepared
        m = self.module
        n = hi - lo
        out = {}
        if "weight" in attrs:
            c_out, c_in_g, *kernel = m.weight.shape
            g = self.weight_grad(
                x[lo:hi].reshape(1, -1, *x.shape[2:]),
                (n * c_out, c_in_g, *kernel),
                b[lo:hi].reshape(1, -1, *b.shape[2:]),
                stride=m.stride,
                padding=padding,
                dilation=m.dilation,
                groups=n * m.groups,
            )
            out["weight"] = g.view(n, *m.weight.shape)
        if "bias" in attrs:
            out["bias"] = b[lo:hi].sum(tuple(range(2, b.dim())))
        return out
