"""The native (compiled CPU) kernels equal the foreach kernels and the readable reference path.

Three implementations of the temporal update: native (``_kernels.NativeDeviation`` and the
native ``squared_norms``, used by default on the CPU when a C compiler exists), foreach
(``deviation_step_``, any device, no compiler) and the per-coordinate float64 reference
(``foreach=False``). Native tests skip cleanly where no compiler is found.
"""

import pytest
import torch

from gradstats.scaling import _native
from gradstats.scaling._kernels import (
    FlatScratch,
    NativeDeviation,
    deviation_step_,
    native_kernels_available,
    native_traffic,
    power_of_two_scale,
    set_native_kernels,
    squared_norms,
)

from ._helpers import assert_same, feed, make, params_like


def _buildable() -> bool:
    previous = set_native_kernels(True)
    try:
        return native_kernels_available()
    finally:
        set_native_kernels(previous)


needs_native = pytest.mark.skipif(
    not _buildable(), reason="no C compiler: the native kernels are not built"
)


@needs_native
def test_by_default_the_native_kernels_run_only_on_one_cpu_thread():
    previous, threads = set_native_kernels(None), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native_kernels_available()
        torch.set_num_threads(2)
        assert not native_kernels_available()
        set_native_kernels(True)
        assert native_kernels_available()
    finally:
        torch.set_num_threads(threads)
        set_native_kernels(previous)


@pytest.fixture(autouse=True)
def native_on_any_thread_count():
    """The native tests run the native kernels whatever the thread count (by default they run
    only single-threaded; see the test above)."""
    previous = set_native_kernels(True)
    yield
    set_native_kernels(previous)


@pytest.fixture
def foreach_kernels():
    previous = set_native_kernels(False)
    yield
    set_native_kernels(previous)


SHAPES = ((33, 7), (5,), (0,), (4, 3, 2), (1000,))


def _history(dtype, offset, noise, scale, steps=7, seed=0, bad_step=None):
    g = torch.Generator().manual_seed(seed)
    history = []
    for k in range(steps):
        grads = [
            ((offset + noise * torch.randn(s, generator=g, dtype=torch.float64)) * scale).to(dtype)
            for s in SHAPES
        ]
        if k in (2, 5):
            grads[1] = None  # tensor 1 without a gradient on some steps
        if k == bad_step:
            grads[3] = grads[3].clone()
            grads[3].view(-1)[4] = float("nan")  # the whole step is skipped
        history.append(grads)
    return history


FIELDS = ("variance", "variance_unbiased", "signal", "signal_unbiased", "factor", "count")


def _run(history, dtype, foreach, native, **kwargs):
    previous = set_native_kernels(native)
    try:
        named = params_like(*SHAPES, dtype=dtype)
        vgs = feed(
            make(
                named,
                beta=0.8,
                foreach=foreach,
                **{"statistic": "temporal", "rule": "shrink", **kwargs},
            ),
            named,
            history,
        )
        stats = vgs.statistics()
    finally:
        set_native_kernels(previous)
    return {(name, f): getattr(row, f) for name, row in stats.items() for f in FIELDS}, vgs


# float32: m is stored in float32 by every path; the foreach path rounds δ once more
TOLERANCE = {torch.float64: {"rel": 1e-12, "abs": 1e-14}, torch.float32: {"rel": 2e-6, "abs": 1e-6}}
CASES = {
    "unit": (0.3, 1.0, 1.0),
    "offset 1e4 +- 0.1": (1e4, 0.1, 1.0),
    "tiny 1e-24": (0.3, 1.0, 1e-24),
    "huge 1e19": (0.3, 1.0, 1e19),
}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_native_equals_reference_and_foreach(case, dtype):
    offset, noise, scale = CASES[case]
    history = _history(dtype, offset, noise, scale, bad_step=4)
    native, _ = _run(history, dtype, foreach=True, native=True, max_nonfinite_steps=10)
    foreach, _ = _run(history, dtype, foreach=True, native=False, max_nonfinite_steps=10)
    reference, _ = _run(history, dtype, foreach=False, native=False, max_nonfinite_steps=10)
    tolerance = TOLERANCE[dtype]
    if case == "offset 1e4 +- 0.1" and dtype == torch.float32:
        tolerance = {"rel": 2e-4, "abs": 1e-6}  # float32 m: ~ulp(1e4)²/0.1² (test_precision)
    assert native == pytest.approx(reference, nan_ok=True, **tolerance)
    assert native == pytest.approx(foreach, nan_ok=True, **tolerance)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_non_finite_step_leaves_the_state_bitwise_unchanged(bad):
    clean = _history(torch.float32, 1e3, 0.5, 1.0)
    dirty = [list(step) for step in clean]
    poisoned = [None if g is None else g.clone() for g in clean[3]]
    poisoned[0].view(-1)[-1] = bad
    dirty.insert(3, poisoned)
    _, a = _run(clean, torch.float32, True, True)
    _, b = _run(dirty, torch.float32, True, True)
    assert_same(a.state_dict()["tensors"], b.state_dict()["tensors"])


def _lists(dtype, offset=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = [(offset + torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for s in SHAPES]
    grads = [
        (offset + torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(dtype) for s in SHAPES
    ]
    return means, grads


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("multiplier", [None, 0.125], ids=["plain", "amp-unscale"])
def test_native_deviation_step_equals_float64_math(dtype, multiplier):
    means, grads = _lists(dtype)
    weights = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.01], dtype=torch.float64)
    grads[1].view(-1)[0] = float("nan")  # weight 0: never read
    s = None if multiplier is None else torch.tensor(multiplier, dtype=torch.float32)
    before = [m.clone() for m in means]
    out = NativeDeviation(means)(grads, weights, s)
    assert out is not None
    factor = 1.0 if multiplier is None else multiplier
    for j, (m0, g, m1) in enumerate(zip(before, grads, means, strict=True)):
        if weights[j] == 0:
            assert torch.equal(m0, m1)
            assert out[j] == 0.0
            continue
        d = factor * g.double() - m0.double()
        assert out[j].item() == pytest.approx(d.square().sum().item(), rel=1e-12, abs=1e-300)
        torch.testing.assert_close(m1, (m0.double() + weights[j] * d).to(dtype))


@needs_native
@pytest.mark.parametrize("scale", [1e-24, 1.0, 1e19])
def test_native_deviation_step_equals_the_foreach_kernel_at_any_scale(scale):
    means, grads = _lists(torch.float32, offset=0.0)
    means = [(m.double() * scale).float() for m in means]
    grads = [(g.double() * scale * 10).float() for g in grads]
    fast, slow = [m.clone() for m in means], [m.clone() for m in means]
    weights = torch.tensor([0.5, 0.3, 0.25, 0.9, 0.01], dtype=torch.float64)
    sq_norms = squared_norms(grads)
    numel = torch.tensor([m.numel() for m in means], dtype=torch.float64)
    c = power_of_two_scale(sq_norms.maximum(squared_norms(means)) / numel.clamp(1))
    scratch = FlatScratch(slow)
    expected = deviation_step_(slow, grads, scratch.views(), scratch.flat, weights, c)
    got = NativeDeviation(fast)(grads, weights)
    assert got is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0.0)  # float32 δ in foreach
    for a, b in zip(fast, slow, strict=True):  # foreach rounds δ to float32 first: an error
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6 * scale)  # ~ulp(δ), not ulp(m)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [1e-30, 1.0, 1.3e19, 3e38])
def test_native_squared_norms_equal_the_foreach_ones(dtype, value):
    tensors = [torch.full((1001,), value).to(dtype), torch.full((3, 2), -value).to(dtype)]
    native = squared_norms(tensors)
    previous = set_native_kernels(False)
    try:
        reference = squared_norms(tensors)
    finally:
        set_native_kernels(previous)
    torch.testing.assert_close(native, reference, rtol=1e-12, atol=0.0)
    assert torch.all(torch.isfinite(native))
    assert torch.all(native > 0)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_squared_norms_flag_non_finite_tensors(bad):
    out = squared_norms([torch.ones(40), torch.tensor([1.0] * 20 + [bad])])
    assert out[0] == 40.0
    assert not torch.isfinite(out[1])


def test_unsupported_inputs_use_the_foreach_kernels():
    means = [torch.zeros(4, 3)]
    native = NativeDeviation(means)
    weights = torch.tensor([0.5], dtype=torch.float64)
    assert native([torch.ones(3, 4).t()], weights) is None  # not contiguous
    assert native([torch.ones(4, 3, dtype=torch.float16)], weights) is None  # no fp16 kernel
    assert native([torch.ones(5)], weights) is None  # another size
    assert torch.equal(means[0], torch.zeros(4, 3))  # nothing changed
    strided = torch.arange(12.0).reshape(3, 4).t()
    assert squared_norms([strided]).item() == float((torch.arange(12.0) ** 2).sum())


def test_disabled_native_kernels_are_never_used(foreach_kernels):
    assert not native_kernels_available()
    assert NativeDeviation([torch.zeros(3)])([torch.ones(3)], torch.ones(1).double()) is None


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_a_missing_or_failing_compiler_falls_back(monkeypatch, tmp_path, compiler):
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("GRADSTATS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_TRIED", False)
    monkeypatch.setattr(_native, "_LIB", None)
    monkeypatch.setattr(_native, "_ENABLED", True)
    assert not native_kernels_available()
    named = params_like((3, 2), dtype=torch.float32)
    vgs = feed(
        make(named, beta=0.8, statistic="temporal", rule="shrink"),
        named,
        [[torch.randn(3, 2)], [torch.randn(3, 2)]],
    )
    assert vgs.statistics()["p0"].count == 2  # the foreach path ran


@needs_native
def test_native_temporal_update_moves_12_bytes_per_element():
    named = params_like((64, 32), (32,), dtype=torch.float32)
    for _, p in named:
        p.grad = torch.randn(p.shape, dtype=p.dtype)
    vgs = make(named, statistic="temporal", rule="shrink")
    vgs.update_statistics()
    with native_traffic() as calls:
        vgs.update_statistics()
    numel = sum(p.numel() for _, p in named)
    assert [name for name, _, _ in calls] == ["gs_deviation_into"]  # ‖g‖² from the same pass
    assert sum(r + w for _, r, w in calls) == 12 * numel
