"""The per-step op count of ``update_statistics()`` is O(1) in the number of tensors.

Every aten op one steady-state update dispatches is counted with a ``TorchDispatchMode`` (the
native CPU kernels, which a dispatcher cannot see, are counted by ``native_traffic``). The count
must not depend on how many tensors the model has — a per-tensor op (an ``.item()``, a
``t.sum()`` per parameter, a Python loop of small ops) makes it grow with them — and stays under
a pinned bound, so that the small-vector work around the kernels cannot creep back up
unnoticed. Measured when pinned (torch 2.x, CPU, one device): with the native kernels 125
aten ops plus the 2 kernel calls for ``aggregate="global"`` (156 before the op count was cut),
186 for ``"param_group"`` and ``"tensor"`` (which also compute the model-wide aggregate); the
foreach fallback adds 34; a missing gradient 5 (the scatter of the present tensors' results).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats import VarianceGradientScaler
from gradstats.scaling._kernels import native_traffic, set_native_kernels

# upper bounds, with some room for torch versions decomposing an op differently
BOUND = {"global": 130, "param_group": 192, "tensor": 192}
FALLBACK_EXTRA = 40  # the foreach deviation step: copy, sub, mul, powsum, nan_to_num, ...
MISSING_EXTRA = 6


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(tensors: int, aggregate: str, missing: int | None = None) -> tuple[int, int]:
    """(aten ops, native calls) of one steady-state update over ``tensors`` float32 tensors
    in two param groups (tensor ``missing`` without a gradient, if given)."""
    g = torch.Generator().manual_seed(0)
    named = [
        (f"p{i}", torch.nn.Parameter(torch.zeros((i % 5) + 3, (i % 3) + 2))) for i in range(tensors)
    ]
    half = tensors // 2
    groups = [{"params": named[:half]}, {"params": named[half:]}]
    vgs = VarianceGradientScaler(
        groups, beta=0.9, aggregate=aggregate, statistic="temporal", rule="shrink"
    )

    def grads() -> None:
        for j, (_, p) in enumerate(named):
            p.grad = None if j == missing else torch.randn(p.shape, generator=g) + 0.1

    for _ in range(3):  # past the first updates: constant tensors built, estimates exist
        grads()
        vgs.update_statistics()
    grads()
    with native_traffic() as native, _Count() as aten:
        vgs.update_statistics()
    return len(aten.ops), len(native)


@pytest.mark.parametrize("native", [True, False], ids=["native", "foreach"])
@pytest.mark.parametrize("aggregate", ["global", "param_group", "tensor"])
def test_op_count_does_not_grow_with_the_tensors(native, aggregate):
    previous = set_native_kernels(None if native else False)
    try:
        small, small_native = _ops(4, aggregate)
        large, large_native = _ops(40, aggregate)
    finally:
        set_native_kernels(previous)
    assert large == small, f"{large} ops for 40 tensors, {small} for 4: a per-tensor op"
    assert large_native == small_native
    bound = BOUND[aggregate] + (0 if native and small_native else FALLBACK_EXTRA)
    assert small <= bound, f"{small} ops per update (bound {bound})"


def test_op_count_with_a_missing_gradient_does_not_grow_with_the_tensors():
    small, _ = _ops(4, "global", missing=1)
    large, _ = _ops(40, "global", missing=1)
    assert large == small
    assert small <= BOUND["global"] + FALLBACK_EXTRA + MISSING_EXTRA
