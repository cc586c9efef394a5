r"""Per-sample handlers of normalisation and convolution layers.

* ``nn.LayerNorm`` / ``nn.RMSNorm`` / Hugging Face ``*RMSNorm``: g_i(γ) = Σ_t b_it ⊙ x̂_it and
  g_i(β) = Σ_t b_it, with x̂ recomputed from the saved input (for Hugging Face norms x̂ = ∂y/∂γ
  is obtained by one forward-mode product, so variants such as (1 + γ) scaling stay exact).
* ``nn.Conv1d/2d/3d`` (any groups, stride, padding incl. ``"same"`` and non-zero padding modes,
  dilation): the weight gradient of a chunk of n samples as one convolution with n·groups groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import compute_dtype
from gradstats.fisher._handler import Handler

__all__ = ["ConvHandler", "NormHandler"]


class NormHandler(Handler):
    """``nn.LayerNorm``, ``nn.RMSNorm`` and Hugging Face RMSNorm (``kind="hf"``)."""

    def __init__(self, module, attrs, label, kind: str) -> None:
        super().__init__(module, attrs, label)
        self.kind = kind
        self.name = {"layer": "layernorm", "rms": "rmsnorm", "hf": "rmsnorm_hf"}[kind]
        self.shape = tuple(module.get_parameter("weight").shape)
        eps = getattr(module, "eps", None)
        self.eps: float | None = None if eps is None else float(eps)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if self.kind == "layer":  # x̂ = (x − mean) / sqrt(var + eps): the native kernel
            eps = 1e-5 if self.eps is None else self.eps
            return F.layer_norm(x.to(compute_dtype(x)), self.shape, None, None, eps)
        if self.kind == "rms":  # x̂ = x / sqrt(mean(x²) + eps), eps defaulting to the input's
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
            return F.rms_norm(x.to(compute_dtype(x)), self.shape, None, eps)
        weight = module.get_parameter("weight").detach()
        if self.replay is None:
            raise RuntimeError("NormHandler.replay is set by the engine before any pass")
        with self.replay():  # x̂ = ∂y/∂γ · 1 by one forward-mode product (exact for any variant)
            result = torch.func.jvp(
                lambda w: torch.func.functional_call(module, {"weight": w}, (x,)),
                (weight,),
                (torch.ones_like(weight),),
            )
        return result[1]

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

    module: nn.modules.conv._ConvNd
    token_units = False

    def __init__(self, module, attrs, label) -> None:
        super().__init__(module, attrs, label)
        self.dims = module.get_parameter("weight").dim() - 2
        self.name = f"conv{self.dims}d"
        self.weight_grad = {
            1: nn_grad.conv1d_weight,
            2: nn_grad.conv2d_weight,
            3: nn_grad.conv3d_weight,
        }[self.dims]

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        m = self.module
        assert isinstance(m, nn.modules.conv._ConvNd)
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
        return x, tuple(int(p) for p in m.padding)

    def prepare(self, layout, saved, grad):
        if layout.unit != "sample":
            raise ConfigurationError(
                f"module {self.label!r} ({self.name}) has no token positions: use unit='sample'"
            )
        if saved.dim() != self.dims + 2:
            raise ConfigurationError(
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
