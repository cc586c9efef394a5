r"""The per-sample handler interface: one :class:`Handler` per module reduces the per-unit gradients
of the module's own parameters from its saved input and output gradient (see
:mod:`gradstats.fisher._persample` for the layer types and their formulas).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import Request, UnitLayout, accumulate_materialised

__all__ = ["Handler", "Requests", "is_hf_conv1d", "is_hf_rmsnorm"]

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
        # context-manager factory set by the engine (re-executing forwards)
        self.replay: Callable[[], AbstractContextManager[None]] | None = None
        # warnings to issue after the pass; Engine.release reads those of the fallback handlers
        self.notices: list[str] = []

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
            raise ConfigurationError(
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
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    return module.get_parameter("weight").dim() == 2


def is_hf_rmsnorm(module: nn.Module) -> bool:
    """A Hugging Face-style RMSNorm: class name ending in ``RMSNorm``, only a ``weight``."""
    names = set(module._parameters)
    return type(module).__name__.endswith("RMSNorm") and names == {"weight"}
