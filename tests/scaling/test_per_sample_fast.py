"""The lean paths of ``statistic="per_sample"`` pinned to the reference and to the general code.

* the row path (a Linear on [B, d_in]: ‖a_i‖, ‖b_i‖ written into one buffer, reduced at the end
  of the backward) against the float64 per-example loop, in float64 and float32, with a frozen
  weight and a layer without bias;
* :class:`Staging` with rows of two layouts in one backward, against direct sums;
* ``PerSampleState.update`` (host unit counts, [2, n] estimates) bitwise against
  ``SamePointState.update`` fed the same sums and counts, over several steps;
* ``materialised_grads`` with a :class:`Scratch` (reused buffers, the [in, out] product for an
  ``nn.Linear``) against the plain product, and two identical steps giving identical states.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradstats import VarianceGradientScaler
from gradstats.fisher._persample import LinearHandler
from gradstats.scaling import _same_point
from gradstats.scaling._host_update import HOST_UPDATE_MAX
from gradstats.scaling._per_sample_linear import materialised_grads
from gradstats.scaling._per_sample_staging import MAX_ROW_LAYOUTS, Scratch, Staging
from gradstats.scaling._per_sample_state import PerSampleState
from gradstats.scaling._same_point import SamePointState
from gradstats.testing import reference_per_sample_noise
from tests.scaling.test_per_sample import _check, _run, _scaler_values


def _mlp(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)
    ).to(dtype)
    model[0].weight.requires_grad_(False)  # a tracked bias whose weight is frozen
    x = torch.randn(9, 5, dtype=dtype, generator=torch.Generator().manual_seed(13))
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(14))
    return model, x, y


def test_row_path_equals_per_example_loop():
    model, x, y = _mlp(torch.float64)
    vgs = _run(model, x, lambda: F.cross_entropy(model(x), y))
    ref = reference_per_sample_noise(
        model, x, lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")
    )
    _check(vgs, ref)


def test_row_path_float32_matches_float64():
    model64, x64, y = _mlp(torch.float64)
    vgs64 = _run(model64, x64, lambda: F.cross_entropy(model64(x64), y))
    model32, x32 = model64.float(), x64.float()
    vgs32 = _run(model32, x32, lambda: F.cross_entropy(model32(x32), y))
    a, b = _scaler_values(vgs32), _scaler_values(vgs64)
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-4, atol=1e-7, msg=name)


def test_staging_rows_of_two_layouts_and_all_forms():
    g = torch.Generator().manual_seed(15)
    a1, b1 = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    a2, b2 = torch.randn(5, 2, generator=g), torch.randn(5, 3, generator=g)  # another N
    a3, b3 = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    rows = torch.randn(6, 3, generator=g)
    staging = Staging()
    for _ in range(2):  # the row buffer is reused (and grown) across backward passes
        staging.reset()
        staging.add("s", torch.tensor(2.5, dtype=torch.float64))
        staging.add_norm("n", rows)
        staging.rows("w1", "b1", a1, b1)
        staging.rows("w2", None, a2, b2)
        staging.rows(None, "b3", a3, b3)
        for k in range(5):  # more sites than the first buffer holds
            staging.rows(f"x{k}", None, a1, b1)
        names, values = staging.values(torch.device("cpu"))
        got: dict[str, float] = {}
        assert values is not None
        for name, value in zip(names, values.tolist(), strict=True):
            if name is not None:
                got[name] = got.get(name, 0.0) + value

        def weight(a: torch.Tensor, b: torch.Tensor) -> float:
            a64, b64 = a.double(), b.double()
            return (a64.square().sum(1) * b64.square().sum(1)).sum().item()

        expected = {
            "s": 2.5,
            "n": rows.double().square().sum().item(),
            "w1": weight(a1, b1),
            "b1": b1.double().square().sum().item(),
            "w2": weight(a2, b2),
            "b3": b3.double().square().sum().item(),
            **{f"x{k}": weight(a1, b1) for k in range(5)},
        }
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=0.0, msg=name)


@pytest.fixture
def tensor_reference(monkeypatch):
    """SamePointState on its tensor ops (on the CPU it would take the host path too)."""
    monkeypatch.setattr(_same_point, "on_host", lambda device, distributed, n: False)


@pytest.mark.usefixtures("tensor_reference")
def test_state_update_is_bitwise_same_point_update():
    params = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(4)]
    ours = PerSampleState(params, 0.9, distributed=False)
    theirs = SamePointState(params, 0.9, distributed=False)
    g = torch.Generator().manual_seed(16)
    for step in range(6):
        units = [8, 8, 1 if step == 2 else 8]  # a tensor with one unit gives no estimate
        sums = torch.rand(3, dtype=torch.float64, generator=g)
        sq = torch.rand(3, dtype=torch.float64, generator=g) / 8
        take = torch.tensor([True, step != 3, True])
        inv = torch.tensor(0.5, dtype=torch.float64) if step == 4 else None
        ours.add_units([2, 0, 1], sums[[2, 0, 1]], [0, 1, 2], units)
        theirs._sums = theirs._sums + sums
        theirs._passes = theirs._passes + torch.tensor(units, dtype=torch.float64)
        theirs._host_passes = list(units)
        ours.update([], sq, take, hook_inv=inv)
        theirs.update([], sq, take, hook_inv=inv)
        for key in ("count", "noise_ema", "signal_ema", "last_passes"):
            assert torch.equal(getattr(ours, key), getattr(theirs, key)), (step, key)


@pytest.mark.parametrize("n", [1, 5, 17, HOST_UPDATE_MAX + 1])  # the last: the tensor path
@pytest.mark.parametrize("beta", [0.9, 0.999])
@pytest.mark.usefixtures("tensor_reference")
def test_host_update_is_bitwise_the_tensor_update_on_awkward_input(n, beta):
    """The CPU path (Python floats) against SamePointState's tensor ops over 40 steps: one or
    no unit, NaN and inf sums, steps not taken, and vector lengths with a scalar tail."""
    params = [torch.zeros(2) for _ in range(n)]
    ours = PerSampleState(params, beta, distributed=False)
    theirs = SamePointState(params, beta, distributed=False)
    g = torch.Generator().manual_seed(n)
    for step in range(40):
        units = torch.randint(0, 5, (n,), generator=g).tolist()
        units = [8 if k > 1 else k for k in units]
        sums = torch.rand(n, dtype=torch.float64, generator=g) * 10.0 ** (step % 7 - 3)
        if step % 9 == 4:
            sums[0] = float("nan")
        if step % 11 == 6:
            sums[-1] = float("inf")
        sq = torch.rand(n, dtype=torch.float64, generator=g) * sums.nan_to_num() / 8
        take = torch.rand(n, generator=g) > 0.2
        ours.add_units(list(range(n)), sums, list(range(n)), units)
        theirs._sums = theirs._sums + sums
        theirs._passes = theirs._passes + torch.tensor(units, dtype=torch.float64)
        theirs._host_passes = list(units)
        ours.update([], sq, take)
        theirs.update([], sq, take)
        for key in ("count", "noise_ema", "signal_ema", "last_passes"):
            mine, ref = getattr(ours, key), getattr(theirs, key)
            assert mine.dtype == ref.dtype, (step, key)
            assert torch.equal(mine, ref), (step, key)


def test_materialised_grads_with_scratch_equal_the_plain_product():
    g = torch.Generator().manual_seed(17)
    for dtype in (torch.float32, torch.float64):
        for transposed in (False, True):
            linear = nn.Linear(5, 7).to(dtype)
            handler = LinearHandler(linear, {"weight": "w"}, "lin", transposed=transposed)
            if transposed:  # a Conv1D-like weight [in, out]
                linear.weight = nn.Parameter(torch.randn(5, 7, dtype=dtype, generator=g))
            a = torch.randn(4, 6, 5, dtype=dtype, generator=g)
            b = torch.randn(4, 6, 7, dtype=dtype, generator=g)
            tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
            scratch = Scratch()
            for _ in range(2):
                gw, norm, kept = materialised_grads(handler, a, b, 2**20, True, scratch)
                per_unit = torch.einsum("nsi,nso->nio", a.double(), b.double())
                expected = per_unit if transposed else per_unit.transpose(1, 2)
                assert kept is not None
                assert kept.shape == (4, *linear.weight.shape)
                torch.testing.assert_close(kept.double(), expected, **tol)
                torch.testing.assert_close(gw.double(), expected.sum(0), **tol)
                squared = norm.double().square()
                torch.testing.assert_close(squared, per_unit.square().sum(), **tol)
                scratch.give(kept)


def test_two_identical_steps_give_identical_sums():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(19))
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="per_sample", model=model)
    state = vgs._state.statistics[0]
    recorded = []
    for _ in range(2):
        model.zero_grad()
        model(x).square().mean().backward()
        recorded.append(state._sums.clone())
        vgs.step()
    assert torch.equal(recorded[0], recorded[1])


class _TwiceUsed(torch.nn.Module):
    """One Linear called twice in a forward (a shared site: its per-sample gradient is the
    sum of both calls' parts), next to a Linear called once (the row path)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_module_called_twice_leaves_the_row_path_and_equals_the_per_example_loop(dtype):
    torch.manual_seed(0)
    model = _TwiceUsed().to(dtype)
    x = torch.randn(6, 4, dtype=dtype)
    y = torch.randint(0, 3, (6,))
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="per_sample", model=model, confidence=None,
        rule="shrink",
    )  # fmt: skip
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    vgs.step()
    vgs.remove_hooks()
    ref = reference_per_sample_noise(
        model.double(), x.double(), lambda out, rows: F.cross_entropy(out, y[rows], reduction="sum")
    )
    stats = vgs.statistics()
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    for name, tensor in zip(vgs.layout.names, vgs.layout.tensors, strict=True):
        noise = stats[name].variance_unbiased * tensor.numel()
        torch.testing.assert_close(noise, ref[name]["noise"], msg=name, **tol)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _backward_ops(layers: int, hooked: bool) -> list[str]:
    """The aten ops of one steady-state forward + backward of an MLP of ``layers`` Linear
    layers on [B, d] rows, with or without the per_sample hooks."""
    torch.manual_seed(3)
    widths = [6] + [5] * (layers - 1) + [3]
    modules: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        modules += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*modules[:-1])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    if hooked:
        vgs = VarianceGradientScaler(model.named_parameters(), statistic="per_sample", model=model)

    def run() -> None:
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    for _ in range(3):  # past the first backward passes: row buffers and plans built
        run()
        if hooked:
            vgs.step()
    with _CountOps() as counter:
        run()
    return counter.ops


@pytest.mark.parametrize("layers", [3, 6])
def test_row_path_adds_three_ops_per_layer_and_five_per_backward(layers):
    """Per Linear layer on rows: the input detached in the forward hook and the two row norms
    written into the persistent buffer (its views are made once, not per backward); at the end
    of the backward a fixed five (‖a_i‖‖b_i‖, one float64 norm, its square, a view, one
    index_add into the state) — no select or slice per site."""
    plain, hooked = _backward_ops(layers, False), _backward_ops(layers, True)
    extra = list(hooked)
    for op in plain:
        extra.remove(op)
    assert len(extra) == 3 * layers + 5, extra
    assert not [op for op in extra if "select" in op or "slice" in op], extra


def test_staging_keeps_a_bounded_number_of_row_buffers():
    """A batch size that changes at every backward (RL rollouts, a ragged last batch) must not
    grow the persistent row buffers without bound; the sums stay right after a rebuild."""
    g = torch.Generator().manual_seed(16)
    staging = Staging()
    for n in range(2, 2 + 3 * MAX_ROW_LAYOUTS):
        a, b = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
        staging.reset()
        staging.rows("w", "b", a, b)
        names, values = staging.values(torch.device("cpu"))
        assert values is not None
        got = dict(zip(names, values.tolist(), strict=True))
        a64, b64 = a.double(), b.double()
        want_w = (a64.square().sum(1) * b64.square().sum(1)).sum().item()
        assert got["w"] == pytest.approx(want_w, rel=1e-6)
        assert got["b"] == pytest.approx(b64.square().sum().item(), rel=1e-6)
        assert len(staging._rows) <= MAX_ROW_LAYOUTS
        assert len(staging._row_views) <= MAX_ROW_LAYOUTS


def test_unit_layouts_stay_bounded_when_the_batch_size_keeps_changing():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="per_sample", model=model)
    hooks = vgs._tracker.modules
    assert hooks is not None
    for n in range(2, 90):  # sequences [n, 3, 4]: every batch size is a new layout
        model.zero_grad()
        model(torch.randn(n, 3, 4)).square().sum().backward()
        vgs.step()
        assert len(hooks._layouts) <= 64
    assert math.isfinite(vgs.statistics()["global"].variance)
