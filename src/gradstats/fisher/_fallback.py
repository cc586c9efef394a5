r"""The fallback for modules without a dedicated handler: ``torch.func``, then a per-sample loop.

For a module m with direct parameters θ_m, saved call arguments (x_1..x_B) and output gradient
b (for the pass objective), the per-sample gradient is the vector-Jacobian product

    g_i = ∂/∂θ_m ⟨m(x_i; θ_m), b_i⟩,

evaluated for a chunk of samples at once with ``vmap(grad(...))`` over the module's own forward
(``functional_call``; the module is re-executed on one sample at a time, so it must not mix
samples: batch-first inputs, no batch statistics). Tensor arguments whose first dimension is the
batch size are sliced per sample; everything else is passed unchanged. If ``vmap`` cannot trace
the module (data-dependent Python control flow, ``.item()``, in-place ops it does not support),
the handler switches to an explicit per-sample loop of ``torch.autograd.grad`` calls — slow but
exact — and reports it (``name`` becomes ``"loop"``).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._persample import Handler

__all__ = ["FunctionalHandler", "first_tensor"]


def first_tensor(output: object) -> torch.Tensor:
    """The tensor output of a module (a tensor, or the first tensor of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise ConfigurationTypeError(f"expected a tensor output; got {type(output).__name__}")


class FunctionalHandler(Handler):
    """Per-sample gradients of any module's direct parameters by ``torch.func`` (or a loop)."""

    name = "vmap"
    token_units = False

    def save(self, args, kwargs, output):
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
        return leaves, spec

    def prepare(self, layout, saved, grad):
        if layout.unit != "sample":
            raise ConfigurationError(
                f"module {self.label!r} is handled by the torch.func fallback, which has no "
                "token positions: use unit='sample'"
            )
        self.check_batch(layout, grad, "the output gradient")
        leaves, spec = saved
        n = layout.n_samples
        batched = [
            i
            for i, x in enumerate(leaves)
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
        ]
        if not batched:
            raise ConfigurationError(
                f"module {self.label!r}: no tensor argument has the batch size {n} as its first "
                "dimension, so its per-sample gradients are undefined"
            )
        return leaves, spec, batched, grad

    def bytes_per_unit(self, attrs):
        return 4 * 8 * sum(self.module.get_parameter(attr).numel() for attr in attrs)

    def materialise(self, prepared, attrs, lo, hi):
        if self.name == "vmap":
            try:
                return self._vmap(prepared, attrs, lo, hi)
            except Exception as error:
                self.name = "loop"
                # raised inside autograd's backward hooks: the collector warns after the pass,
                # so that the warning names the user's collect() line, not torch's
                self.notices.append(
                    f"module {self.label!r}: torch.func.vmap failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:120]}); using a per-sample loop (slow, exact)"
                )
        return self._loop(prepared, attrs, lo, hi)

    def _call(self, leaves, spec, params=None):
        args, kwargs = tree_unflatten(leaves, spec)
        if self.replay is None:
            raise RuntimeError("FunctionalHandler.replay is set by the engine before any pass")
        with self.replay():
            if params is None:
                return first_tensor(self.module(*args, **kwargs))
            return first_tensor(torch.func.functional_call(self.module, params, args, kwargs))

    def _vmap(self, prepared, attrs, lo, hi):
        leaves, spec, batched, grad = prepared
        params = {attr: self.module.get_parameter(attr).detach() for attr in attrs}

        def objective(p, b_i, *slices):
            values = list(leaves)
            for index, value in zip(batched, slices, strict=True):
                values[index] = value.unsqueeze(0)
            out = self._call(values, spec, p)
            return (out * b_i.unsqueeze(0).to(out.dtype)).sum()

        in_dims = (None, 0, *([0] * len(batched)))
        per_sample = torch.func.vmap(torch.func.grad(objective), in_dims=in_dims)
        grads = per_sample(params, grad[lo:hi], *[leaves[i][lo:hi] for i in batched])
        return {attr: g.to(_dtype(g)) for attr, g in grads.items()}

    def _loop(self, prepared, attrs, lo, hi):
        leaves, spec, batched, grad = prepared
        params = [self.module.get_parameter(attr) for attr in attrs]
        rows: list[list[torch.Tensor]] = [[] for _ in attrs]
        for i in range(lo, hi):
            values = list(leaves)
            for index in batched:
                values[index] = leaves[index][i : i + 1]
            with torch.enable_grad():
                out = self._call(values, spec)
                grads = torch.autograd.grad(
                    (out * grad[i : i + 1].to(out.dtype)).sum(), params, allow_unused=True
                )
            for row, g, p in zip(rows, grads, params, strict=True):
                row.append(torch.zeros_like(p) if g is None else g.detach())
        return {
            attr: torch.stack(row).to(_dtype(row[0])) for attr, row in zip(attrs, rows, strict=True)
        }


def _dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
