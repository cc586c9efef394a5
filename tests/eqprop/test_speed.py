"""Speed fixes that must not change results: the growing check schedule, the Anderson ring
buffer (against the previous, restacking implementation) and flushed denormals."""

import pytest
import torch

from gradstats.eqprop import estimate_gradient, relax
from gradstats.eqprop._autodiff import per_sample_norm
from gradstats.eqprop._iterate import flush_denormal, iterate, tiny
from gradstats.eqprop._problem import prepare
from gradstats.eqprop.models import TanhModel

from ._cases import gen


def _tanh(gain: float, seed: int = 0, n: int = 16, batch: int = 4, dtype=torch.float64):
    g = gen(seed)
    model = TanhModel.random(n, 4, 3, gain=gain, generator=g, dtype=dtype)
    x = torch.randn(batch, 4, generator=g, dtype=dtype)
    y = torch.randn(batch, 3, generator=g, dtype=dtype)
    return model, x, y


def _plain_solve(model, x, *, tol, growing, check_every=10, eps=1.0, max_steps=500):
    problem = prepare(model, x, None)

    def step(main, aux, check):
        (z,) = main
        f = problem.force(z)
        if not check:
            return (z + eps * f,), aux, None, None
        res_abs = per_sample_norm(f)
        return (z + eps * f,), aux, res_abs / per_sample_norm(z).clamp_min(tiny(z)), res_abs

    with torch.no_grad():
        (z,), _, stats = iterate(
            step, (problem.z0,), phase="free", kind="free", tol=tol, max_steps=max_steps,
            check_every=check_every, growing=growing,
        )  # fmt: skip
    return problem, z, stats


@pytest.mark.parametrize(
    ("check_every", "expected"), [(10, (0, 1, 2, 4, 8, 10, 20)), (4, (0, 1, 2, 4, 8))]
)
@pytest.mark.filterwarnings("ignore::gradstats.eqprop.ConvergenceWarning")
def test_check_schedule_is_powers_of_two_then_multiples_of_the_cap(check_every, expected):
    model, x, _ = _tanh(0.9)
    _, _, stats = _plain_solve(model, x, tol=1e-300, growing=True, check_every=check_every,
                               max_steps=expected[-1])  # fmt: skip
    assert stats.trace_steps[: len(expected)] == expected


@pytest.mark.parametrize("gain", [0.01, 0.05])
def test_a_phase_that_converges_in_a_few_steps_stops_within_a_few(gain):
    model, x, _ = _tanh(gain)
    problem, z, stats = _plain_solve(model, x, tol=1e-6, growing=True)
    first = next(i for i, rel in enumerate(stats.trace) if bool((rel <= 1e-6).all()))
    assert int(stats.steps.max()) <= 4  # the fixed schedule ran such a phase for 10 steps
    assert stats.trace_steps[first] <= 4
    assert bool(stats.converged.all())
    res = per_sample_norm(problem.force(z)) / per_sample_norm(z)
    assert bool((res <= 1e-6).all())  # the stopping state satisfies the tolerance


def test_the_fixed_schedule_ran_the_same_fast_phase_for_ten_steps():
    model, x, _ = _tanh(0.01)
    _, _, stats = _plain_solve(model, x, tol=1e-6, growing=False)
    assert int(stats.steps.max()) == 10


@pytest.mark.parametrize("gain", [0.05, 0.6, 0.95])
def test_growing_and_fixed_schedules_agree_to_the_tolerance(gain):
    model, x, _ = _tanh(gain)
    tol = 1e-9
    _, z_new, new = _plain_solve(model, x, tol=tol, growing=True)
    _, z_old, old = _plain_solve(model, x, tol=tol, growing=False)
    assert bool(new.converged.all())
    assert bool(old.converged.all())
    assert int(new.steps.max()) <= int(old.steps.max())  # a superset of the old checks
    scale = z_old.norm(dim=1, keepdim=True)
    # both are within tol of the fixed point (rate q: distance <= tol·‖z‖/(1 − q))
    torch.testing.assert_close(z_new / scale, z_old / scale, rtol=0, atol=200 * tol)


def _anderson_reference(fn, z0, *, eps, m, steps):
    """The previous implementation: restack the history every step (readable reference)."""
    z, hist_z, hist_r = z0, [], []
    for _ in range(steps):
        r = eps * fn(z)
        batch = z.shape[0]
        flat_z, flat_r = z.reshape(batch, -1), r.reshape(batch, -1)
        if hist_z:
            d_z = flat_z.unsqueeze(1) - torch.stack(hist_z, 1)
            d_r = flat_r.unsqueeze(1) - torch.stack(hist_r, 1)
            gram = d_r.conj() @ d_r.transpose(1, 2)
            n = gram.shape[-1]
            scale = torch.diagonal(gram, dim1=1, dim2=2).real.mean(-1)
            ridge = scale * torch.finfo(scale.dtype).eps ** 0.5 + torch.finfo(scale.dtype).tiny
            eye = torch.eye(n, dtype=gram.dtype)
            rhs = (d_r.conj() @ flat_r.unsqueeze(-1)).squeeze(-1)
            gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, rhs)
            proposal = (flat_z + flat_r - (gamma.unsqueeze(1) @ (d_z + d_r)).squeeze(1)).reshape(
                z.shape
            )
        else:
            proposal = z + r
        hist_z = [*hist_z, flat_z][-m:]
        hist_r = [*hist_r, flat_r][-m:]
        z = proposal
    return z


@pytest.mark.parametrize(("m", "steps"), [(1, 12), (3, 12), (5, 25)])
def test_anderson_ring_buffer_matches_the_restacking_implementation(m, steps):
    model, x, _ = _tanh(0.9, n=12)
    problem = prepare(model, x, None)
    z_ref = _anderson_reference(problem.force, problem.z0, eps=0.3, m=m, steps=steps)
    z, _ = relax(model, x, tol=0.0, max_steps=steps, step_size=0.3, anderson=m)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flushing_denormals_leaves_gradients_identical(dtype):
    """BPTT through many steps of a strongly contracting map drives the adjoint into the
    subnormal range; flushing it changes nothing above ``finfo.tiny``."""
    model, x, y = _tanh(0.3, n=16, dtype=dtype)
    steps = 800 if dtype == torch.float64 else 150  # 0.3^steps is below finfo(dtype).tiny
    kept = estimate_gradient(model, x, y, "bptt", step_size=1.0, steps=steps).grads
    with flush_denormal() as active:
        flushed = estimate_gradient(model, x, y, "bptt", step_size=1.0, steps=steps).grads
    if not active:
        pytest.skip("this CPU cannot flush denormals")
    for name, grad in kept.items():
        assert torch.equal(grad, flushed[name]), name


def test_flush_denormal_restores_the_previous_setting():
    tiny32 = torch.tensor(1e-40, dtype=torch.float32)  # a subnormal float32
    with flush_denormal() as active:
        if not active:
            pytest.skip("this CPU cannot flush denormals")
        with flush_denormal(False):
            assert float(tiny32 * 1.0) != 0.0  # the inner block keeps them
        assert float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) == 0.0
    assert float(tiny32 * 1.0) != 0.0  # torch's default again


def test_small_model_gradients_identical_with_and_without_flush(tmp_path):
    """The trainer's model: one BPTT gradient with and without flushed denormals."""
    from gradstats.data import load_corpus
    from gradstats.eqprop.train import TrainConfig

    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40)
    cfg = TrainConfig(method="bptt", data=str(text), d_model=8, n_heads=2, block_size=6,
                      t1=30, dtype="float32")  # fmt: skip
    corpus = load_corpus(cfg.data)
    model = cfg.build_model(corpus.vocab_size)
    xb, yb = corpus.batch("train", 2, 6, generator=torch.Generator().manual_seed(0))
    kept = estimate_gradient(model, xb, yb, "bptt", steps=30).grads
    with flush_denormal():
        flushed = estimate_gradient(model, xb, yb, "bptt", steps=30).grads
    for name, grad in kept.items():
        assert torch.equal(grad, flushed[name]), name
