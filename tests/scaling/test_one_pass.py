"""The one-pass temporal step (``NativeDeviationInto``) equals the two-pass one bit for bit.

With the native kernels on, an update whose every tensor has a gradient runs one pass over g
and m (‖g‖², ‖δ‖² and the new means into the other buffer of each pair; the step is applied
by flipping parity bits). The two-pass path (native ``squared_norms`` then the in-place
``NativeDeviation``) is what runs when ``TemporalState.measure`` declines; both must leave the
same state — means, sums, counts, factors — in float32, float64 and with bfloat16 gradients,
through non-finite, skipped and AMP-scaled steps, missing gradients (the two-pass path after
one-pass steps), checkpoints, the copying functional ``update`` and stale observations.
"""

import pytest
import torch

from gradstats.scaling import _engine, observe, update, update_
from gradstats.scaling._kernels import (
    NativeDeviation,
    NativeDeviationInto,
    native_traffic,
    set_native_kernels,
    squared_norms,
)
from gradstats.scaling._temporal import TemporalState

from ._helpers import assert_same, make, params_like
from .test_kernels import needs_native

SHAPES = ((33, 7), (5,), (0,), (4, 3, 2), (1000,), (17,))


@pytest.fixture(autouse=True)
def native_on():
    previous = set_native_kernels(True)
    yield
    set_native_kernels(previous)


@pytest.fixture
def two_pass(monkeypatch):
    """Make ``TemporalState.measure`` decline: every update takes the two-pass path."""
    monkeypatch.setattr(TemporalState, "measure", lambda self, grads, grad_inv=None: None)


def _grads(dtype, seed, offset=3.0, noise=0.5, missing=False, bad=None):
    g = torch.Generator().manual_seed(seed)
    grads = [
        (offset + noise * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
        for s in SHAPES
    ]
    if missing:
        grads[1] = None
    if bad is not None:
        grads[3].view(-1)[2] = bad
    return grads


def _script(dtype):
    """(gradients, step kwargs) per step: plain, NaN, skipped, missing, inf, plain ..."""
    steps = []
    for k in range(14):
        kwargs = {"skip": True} if k == 4 else {}
        bad = float("nan") if k == 3 else float("inf") if k == 9 else None
        steps.append((_grads(dtype, k, missing=k in (6, 7), bad=bad), kwargs))
    return steps


def _drive(param_dtype, grad_dtype, read_every=None, **config):
    named = params_like(*SHAPES, dtype=param_dtype)
    vgs = make(
        named, beta=0.8, statistic="temporal", rule="shrink", max_nonfinite_steps=None, **config
    )
    reads = []
    for k, (grads, kwargs) in enumerate(_script(grad_dtype)):
        for (_, p), g in zip(named, grads, strict=True):
            p.grad = None if g is None else g.clone()
        vgs.update_statistics(**kwargs)
        if read_every and k % read_every == 0:
            reads.append(vgs.state_dict())  # settles the buffer pairs mid-run
    return vgs, reads


CASES = {
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bfloat16 gradients": (torch.bfloat16, torch.bfloat16),
}


@needs_native
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("read_every", [None, 3], ids=["no-reads", "checkpoint-every-3"])
def test_one_pass_equals_two_pass_bitwise(case, read_every, monkeypatch):
    param_dtype, grad_dtype = CASES[case]
    fast, fast_reads = _drive(param_dtype, grad_dtype, read_every)
    monkeypatch.setattr(TemporalState, "measure", lambda self, grads, grad_inv=None: None)
    slow, slow_reads = _drive(param_dtype, grad_dtype, read_every)
    assert_same(fast.state_dict(), slow.state_dict())
    assert_same(fast_reads, slow_reads)
    assert repr(fast.statistics()) == repr(slow.statistics())  # NaN fields compare equal


@needs_native
def test_the_one_pass_path_is_the_one_taken():
    named = params_like((64, 32), (32,), dtype=torch.float32)
    for _, p in named:
        p.grad = torch.randn(p.shape, dtype=torch.float32)
    vgs = make(named, statistic="temporal", rule="shrink")
    vgs.update_statistics()
    with native_traffic() as calls:
        vgs.update_statistics()
    assert [name for name, _, _ in calls] == ["gs_deviation_into"]
    named[0][1].grad = None  # a missing gradient: the two-pass path, after settling
    with native_traffic() as calls:
        vgs.update_statistics()
    assert [name for name, _, _ in calls] == ["gs_sumsq", "gs_deviation"]


@needs_native
def test_amp_scaled_gradients_one_pass_equals_two_pass(monkeypatch):
    def run():
        named = params_like(*SHAPES, dtype=torch.float32)
        vgs = make(named, beta=0.8, statistic="temporal", rule="shrink")
        for k in range(6):
            for (_, p), g in zip(named, _grads(torch.float32, k), strict=True):
                p.grad = g * 1024.0
            vgs.update_statistics(loss_scale=1024.0, scaled=True)
        return vgs.state_dict()

    fast = run()
    monkeypatch.setattr(TemporalState, "measure", lambda self, grads, grad_inv=None: None)
    assert_same(fast, run())


@needs_native
def test_a_dropped_step_leaves_the_state_bitwise_unchanged():
    named = params_like(*SHAPES, dtype=torch.float32)
    vgs = make(named, beta=0.8, statistic="temporal", rule="shrink", max_nonfinite_steps=None)
    for k in range(3):
        for (_, p), g in zip(named, _grads(torch.float32, k), strict=True):
            p.grad = g
        vgs.update_statistics()
    before = vgs.state_dict()
    for bad in (float("nan"), float("inf")):
        for (_, p), g in zip(named, _grads(torch.float32, 9, bad=bad), strict=True):
            p.grad = g
        vgs.update_statistics()
        vgs.update_statistics(skip=True)
    after = vgs.state_dict()
    assert_same(before["tensors"], after["tensors"])


def _state_after(steps, dtype=torch.float32):
    named = params_like(*SHAPES, dtype=dtype)
    vgs = make(named, beta=0.8, statistic="temporal", rule="shrink")
    for k in range(steps):
        for (_, p), g in zip(named, _grads(dtype, k), strict=True):
            p.grad = g
        vgs.update_statistics()
    return named, vgs


@needs_native
def test_a_stale_observation_takes_the_two_pass_path_with_the_same_result():
    """observe twice, apply the first: its prepared step is no longer the latest (the second
    observation replaced it), so the two-pass path runs on the gradients; then the second
    observation's step was prepared before the first was applied: also refused."""
    named, vgs = _state_after(3)
    _, reference = _state_after(3)
    grads = _grads(torch.float32, 7)
    for (_, p), (_, q), g in zip(named, _named_of(reference), grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    state, config = vgs.state, vgs.config
    first, second = observe(state), observe(state)
    state = update_(state, first, config)
    state = update_(state, second, config)
    expected = reference.state
    expected = update_(expected, observe(expected), config)
    expected = update_(expected, observe(expected), config)
    for a, b in zip(state.statistics, expected.statistics, strict=True):
        for j in range(len(SHAPES)):
            assert_same(a.tensor_state(j), b.tensor_state(j), f"tensor {j}")


def _named_of(vgs):
    return list(zip(vgs.state.layout.names, vgs.state.layout.tensors, strict=True))


@needs_native
def test_the_copying_update_after_one_pass_steps_equals_the_in_place_one():
    named, vgs = _state_after(4)
    for (_, p), g in zip(named, _grads(torch.float32, 11), strict=True):
        p.grad = g
    state, config = vgs.state, vgs.config
    copied = update(state, observe(state), config)  # state itself is left as it was
    in_place = update_(state, observe(state), config)
    for a, b in zip(copied.statistics, in_place.statistics, strict=True):
        for j in range(len(SHAPES)):
            assert_same(a.tensor_state(j), b.tensor_state(j), f"tensor {j}")


@needs_native
def test_load_state_dict_after_one_pass_steps_resumes_bitwise():
    named, vgs = _state_after(5)
    saved = vgs.state_dict()
    other_named, other = _state_after(2)  # its buffer pairs have flipped parities
    other.load_state_dict(saved)
    for k in range(5, 9):
        for (_, p), (_, q), g in zip(named, other_named, _grads(torch.float32, k), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        vgs.update_statistics()
        other.update_statistics()
    assert_same(vgs.state_dict()["tensors"], other.state_dict()["tensors"])


# ----------------------------------------------------------------------------- the kernel
def _unaligned(shape, dtype, seed):
    """A tensor whose data pointer is not 32-byte aligned (the plain-store branch)."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    base = torch.randn(numel + 1, generator=g, dtype=torch.float64).to(dtype)
    return base[1:].view(shape)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("multiplier", [None, 0.125], ids=["plain", "amp-unscale"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_the_kernel_equals_squared_norms_and_the_in_place_kernel(dtype, multiplier, aligned):
    shapes = [(37,), (16,), (3, 33), (0,), (1000,), (5,)]
    g = torch.Generator().manual_seed(0)
    make_buffer = (
        (lambda s, k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
        if aligned
        else (lambda s, k: _unaligned(s, dtype, k))
    )
    means = [make_buffer(s, k) * 3 for k, s in enumerate(shapes)]
    spares = [torch.full_like(m, float("nan")) for m in means]
    grads = [make_buffer(s, 10 + k) + 1e3 for k, s in enumerate(shapes)]
    parity = torch.tensor([False, True, False, True, True, False])
    for j in range(len(shapes)):  # where the bit is set, m_j lives in the spare
        if parity[j]:
            means[j], spares[j] = spares[j], means[j]
    current = [spares[j] if parity[j] else means[j] for j in range(len(shapes))]
    weights = torch.tensor([0.5, 0.3, 1.0, 0.2, 0.01, 0.7], dtype=torch.float64)
    s = None if multiplier is None else torch.tensor(multiplier, dtype=torch.float64)
    expected_m = [m.clone() for m in current]
    expected_dev = NativeDeviation(expected_m)(grads, weights, s)
    expected_sq = squared_norms(grads)
    before = [m.clone() for m in current]
    got = NativeDeviationInto(means, spares, parity)(grads, weights, s)
    assert got is not None
    assert expected_dev is not None
    sq, dev = got
    assert torch.equal(sq, expected_sq)
    assert torch.equal(dev, expected_dev)
    for j in range(len(shapes)):
        written = means[j] if parity[j] else spares[j]
        assert torch.equal(written, expected_m[j]), j
        assert torch.equal(current[j], before[j]), j  # m_j is only read


@needs_native
def test_the_kernel_declines_what_it_cannot_do():
    means = [torch.zeros(4, 3)]
    spares = [torch.zeros(4, 3)]
    parity = torch.zeros(1, dtype=torch.bool)
    into = NativeDeviationInto(means, spares, parity)
    weights = torch.tensor([0.5], dtype=torch.float64)
    assert into([torch.ones(3, 4).t()], weights) is None  # not contiguous
    assert into([torch.ones(4, 3, dtype=torch.float16)], weights) is None  # no fp16 kernel
    assert into([torch.ones(5)], weights) is None  # another size
    assert not NativeDeviationInto(means, [torch.zeros(5)], parity).ready  # pairs differ
    assert not NativeDeviationInto(means, spares, torch.zeros(1)).ready  # parity not bool
    set_native_kernels(False)
    assert into([torch.ones(4, 3)], weights) is None
    assert torch.equal(spares[0], torch.zeros(4, 3))  # nothing written


def test_without_native_kernels_the_spares_are_never_allocated():
    set_native_kernels(False)
    _, vgs = _state_after(3)
    (statistic,) = vgs.state.statistics
    assert statistic._spare is None
    assert not _engine.observe(vgs.state).prepared[0]


def _into_outputs():
    """(‖g‖², ‖δ‖², new means) of the one-pass kernel on fixed float32 inputs, unaligned."""
    shapes = [(37,), (16,), (3, 33), (1000,)]
    means = [_unaligned(s, torch.float32, k) for k, s in enumerate(shapes)]
    spares = [_unaligned(s, torch.float32, 5) for s in shapes]
    grads = [_unaligned(s, torch.float32, 9 + k) + 1e3 for k, s in enumerate(shapes)]
    parity = torch.zeros(len(shapes), dtype=torch.bool)
    weights = torch.tensor([0.5, 0.3, 1.0, 0.01], dtype=torch.float64)
    got = NativeDeviationInto(means, spares, parity)(grads, weights, torch.tensor(0.125))
    assert got is not None
    return got, spares


@needs_native
def test_the_portable_build_without_avx2_gives_the_same_bits(monkeypatch, tmp_path):
    """The plain-C loop (machines without AVX2) equals the AVX2 one and its own two-pass
    kernels."""
    from gradstats.scaling import _native

    with_avx2 = _into_outputs()
    flags = [f for f in _native._flags() if f not in ("-mavx2", "-mfma")]
    monkeypatch.setattr(_native, "_flags", lambda: flags)
    monkeypatch.setenv("GRADSTATS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_TRIED", False)
    monkeypatch.setattr(_native, "_LIB", None)
    assert_same(_into_outputs(), with_avx2)
    for aligned in (True, False):
        test_the_kernel_equals_squared_norms_and_the_in_place_kernel(torch.float32, 0.125, aligned)
    assert list(tmp_path.glob("kernels-*.so"))  # it was built here, without AVX2


@needs_native
def test_switching_the_native_kernels_off_mid_run_settles_the_buffers(monkeypatch):
    """One-pass steps, then the foreach kernels (as with several threads): the foreach path
    reads the means the one-pass steps left, exactly as after two-pass steps."""

    def run():
        named, vgs = _state_after(5)
        set_native_kernels(False)
        for k in range(5, 8):
            for (_, p), g in zip(named, _grads(torch.float32, k), strict=True):
                p.grad = g
            vgs.update_statistics()
        set_native_kernels(True)
        return vgs.state_dict()

    fast = run()
    monkeypatch.setattr(TemporalState, "measure", lambda self, grads, grad_inv=None: None)
    assert_same(fast, run())
