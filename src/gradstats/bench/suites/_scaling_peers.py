r"""Peers of the ``per_sample`` statistic's cost: what a user would write with another library.

:func:`backpack_batch_l2` — BackPACK's ``BatchL2Grad`` extension (per-sample squared gradient
norms ‖g_i‖² of every parameter, from its own backward hooks on an ``extend``-ed copy of the
model), then the same two sums the scaler forms per tensor, Σ_i ‖c_i‖² and ‖ĝ‖², with
c_i = g_i/B the per-unit contributions of a mean loss: the estimator's inputs, not its EMAs.
BackPACK handles ``nn.Linear``/``nn.Conv*`` (not Hugging Face ``Conv1D``, attention or
embeddings), so it stands beside the MLP only.

:class:`ItemwiseTemporal` — the temporal statistic written tensor by tensor, one ``.item()`` per
reduction (the original system's style): the step-cost suite's host-sync baseline.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["ItemwiseTemporal", "backpack_batch_l2"]


def backpack_batch_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """One step of the peer (``model`` is extended in place: pass a copy): returns
    (Σ_i ‖c_i‖² per tensor, ‖ĝ‖² per tensor), float64."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())  # mean over the batch, as the benchmark's loss
    params = list(model.parameters())

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        with backpack(BatchL2Grad()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss.backward()
        # BackPACK's batch_l2 of a mean loss is ‖∇ l_i / B‖² = ‖c_i‖²
        small = torch.stack([p.batch_l2.sum() for p in params]).to(torch.float64)  # type: ignore[attr-defined]
        grads = torch._foreach_norm([p.grad for p in params if p.grad is not None])
        return small, torch.stack(grads).to(torch.float64).square()

    return run


class ItemwiseTemporal:
    """The temporal statistic computed tensor by tensor, with one ``.item()`` per reduction."""

    def __init__(self, params: Sequence[torch.Tensor], beta: float) -> None:
        self.params, self.beta, self.t = params, beta, 0
        self.mean = [torch.zeros_like(p) for p in params]
        self.var = [torch.zeros_like(p) for p in params]

    def step(self) -> float:
        self.t += 1
        step = (1 - self.beta) / (1 - self.beta**self.t)
        rho_w = (
            (1 - self.beta) * (1 + self.beta**self.t) / ((1 + self.beta) * (1 - self.beta**self.t))
        )
        noise = signal = 0.0
        for p, m, v in zip(self.params, self.mean, self.var, strict=True):
            grad = p.grad
            if grad is None or not torch.isfinite(grad).all().item():
                continue
            delta = grad - m
            m.add_(delta, alpha=step)
            v.add_(delta.square(), alpha=step).mul_(1 - step)
            if self.t > 1:
                unbiased = v.sum().item() / (1 - rho_w)
                noise += unbiased
                signal += m.square().sum().item() - rho_w * unbiased
        return noise / signal if self.t > 1 and signal > 0 else float("nan")
