r"""Cost floor of the ``per_sample`` statistic on an MLP: the least work beyond a plain backward.

:func:`per_sample_floor` — a plain forward + backward of an MLP of ``nn.Linear`` layers on
[B, d] rows, plus exactly what the per-example noise needs and nothing a library adds: per
layer ‖a_i‖ and ‖b_i‖ (two row norms, written into one buffer from a hook on the layer output),
then Σ_i ‖a_i‖²‖b_i‖² (weights) and Σ_i ‖b_i‖² (biases) of every layer in three ops, and ‖ĝ‖²
of every ``.grad`` in one native pass (float64 sums). No finiteness handling, no statistics,
no bookkeeping: what ``statistic="per_sample"`` costs beyond it is the price of its structure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradstats.scaling._kernels import squared_norms

__all__ = ["per_sample_floor"]


def per_sample_floor(
    model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], batch: int
) -> Callable[[], object]:
    """One step of the floor (``model`` is hooked: pass a copy); returns the sums."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    params = list(model.parameters())
    rows = torch.empty(3, len(linears), batch, dtype=params[0].dtype, device=params[0].device)
    seen = [0]

    def forward_hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        k, x = seen[0], args[0].detach()
        seen[0] += 1

        def on_grad(grad: torch.Tensor) -> None:
            torch.linalg.vector_norm(grad, dim=1, out=rows[1, k])
            torch.linalg.vector_norm(x, dim=1, out=rows[2, k])

        output.register_hook(on_grad)

    for module in linears:
        module.register_forward_hook(forward_hook)

    def run() -> object:
        seen[0] = 0
        model.zero_grad(set_to_none=False)
        loss(model).backward()
        torch.mul(rows[2], rows[1], out=rows[0])  # ‖a_i‖‖b_i‖
        sums = torch.linalg.vector_norm(rows[:2], dim=2, dtype=torch.float64).square()
        return sums, squared_norms([p.grad for p in params if p.grad is not None])

    return run
