"""The trainer under two gloo ranks equals one process on the concatenated batch.

One spawn of two CPU processes (module fixture) computes everything the tests read: the
all-reduced gradients of two estimators on two shards, and 2-rank training runs (uninterrupted,
interrupted + resumed) in which rank 1 is forbidden to write files.
"""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from gradstats.data import load_corpus
from gradstats.eqprop import ConvergenceWarning, add_penalties, estimate_gradient
from gradstats.eqprop.train import (
    TrainConfig,
    TrainingDiverged,
    load_checkpoint,
    read_metrics,
    train,
)
from gradstats.eqprop.train._distributed import Group, draw_batch
from gradstats.errors import StateError
from gradstats.testing import run_gloo

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 40
BATCH = 2  # per rank; the single-process reference uses 2 * BATCH
#: method -> options of the gradient-equality cases (noise and a penalty exercise their paths)
GRAD_CASES = {
    # t1 short of convergence: the residual penalty is then signal, not amplified rounding; the
    # Hutchinson penalties draw their probe vectors for the global batch (equal draw for draw)
    "aep": {
        "force_noise": 0.1,
        "res_penalty": 0.1,
        "jac_penalty": 0.1,
        "homeostasis": 0.05,
        "t1": 6,
    },
    # the spectral norm: per-sample power iterations from the global batch's draw
    "bptt": {"jac_penalty": 0.1, "jac_norm": "spectral", "power_iterations": 2, "jac_bound": 1e-3},
}
RUN = {"method": "aep", "steps": 4, "force_noise": 0.05, "jac_penalty": 0.1}
BACKPROP = {"method": "backprop", "steps": 2, "spot_check_every": 0}
DIVERGE = {"method": "bptt", "lr": 1e30, "warmup": 0, "grad_clip": 0.0, "steps": 20,
           "max_skips": 2, "checkpoint_every": 1, "eval_every": 1}  # fmt: skip


def _cfg(data, out, batch_size, **kw):
    base = {
        "method": "aep",
        "out": out,
        "data": data,
        "d_model": 16,
        "n_heads": 2,
        "block_size": 8,
        "batch_size": batch_size,
        "t1": 40,
        "t2": 60,
        "dtype": "float64",
        "eval_every": 2,
        "eval_batches": 1,
        "spot_check_every": 2,
        "checkpoint_every": 4,
        "progress": False,
        "init_std": 0.1,
    }
    if kw.get("method") in ("bptt", "backprop"):
        del base["t2"]  # no nudged/adjoint phase: setting t2 is an error
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- on each rank
def _grads(data, group):
    from gradstats.eqprop.train._distributed import reduce_estimate, shard_noise

    out = {}
    for method, kw in GRAD_CASES.items():
        cfg = _cfg(data, "unused", BATCH, method=method, **kw)
        corpus = load_corpus(data)
        model = cfg.build_model(corpus.vocab_size)
        gen = torch.Generator().manual_seed(5)
        x, y = draw_batch(corpus, "train", BATCH, cfg.block_size, gen, group)
        noise_gen = torch.Generator().manual_seed(6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # t1 = 6 stops short on purpose
            est = estimate_gradient(model, x, y, method, noise=shard_noise(model, x, noise_gen,
                                    group), **cfg.estimator_settings())  # fmt: skip
        tokens = x.numel() * group.world
        est, record = reduce_estimate(model, cfg, est, x, noise_gen, tokens, group)
        out[method] = {"grads": est.grads, **record}
    return out


def _on_rank(rank, world, data, folder):
    import gradstats.eqprop.train._loop as loop

    torch.set_default_dtype(torch.float64)  # spawned ranks do not inherit conftest's default
    group = Group(rank, world)
    result = {"grads": _grads(data, group)}
    models = []
    make_optimizer = loop._optimizer

    def capture(cfg, model):
        models.append(model)
        return make_optimizer(cfg, model)

    loop._optimizer = capture
    if rank == 1:  # only rank 0 may write the run folder

        def forbidden(*args, **kwargs):
            raise RuntimeError("rank 1 wrote a file")

        loop.save_checkpoint = loop._plot = forbidden
        loop.MetricsLog.write = loop.MetricsLog.truncate = forbidden
    for name, kw in (("full", {}), ("parts", {"until": 2}), ("parts", {"resume": True})):
        if rank == 0 and name == "parts":
            loop._plot = lambda *args: None  # curves.png is checked on "full" (plots are slow)
        until = kw.pop("until", None)
        train(_cfg(data, os.path.join(folder, name), BATCH, **RUN, **kw), until=until)
        result[name + ("_resumed" if kw else "")] = {
            k: v.detach().clone() for k, v in models[-1].state_dict().items()
        }
    train(_cfg(data, os.path.join(folder, "backprop"), BATCH, **BACKPROP))
    result["backprop"] = {k: v.detach().clone() for k, v in models[-1].state_dict().items()}
    try:  # every rank must stop at the same step, none left waiting in a collective
        train(_cfg(data, os.path.join(folder, "diverge"), BATCH, **DIVERGE))
    except TrainingDiverged as error:
        result["diverged"] = str(error)
    return result


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("runs")
    return folder, run_gloo(_on_rank, world_size=2, args=(data, str(folder)))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", list(GRAD_CASES))
def test_all_reduced_gradient_equals_one_process_on_the_concatenated_batch(ranks, data, method):
    _, results = ranks
    cfg = _cfg(data, "unused", 2 * BATCH, method=method, **GRAD_CASES[method])
    corpus = load_corpus(data)
    model = cfg.build_model(corpus.vocab_size)
    gen = torch.Generator().manual_seed(5)
    x, y = draw_batch(corpus, "train", 2 * BATCH, cfg.block_size, gen, Group())
    noise_gen = torch.Generator().manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = estimate_gradient(
            model, x, y, method, generator=noise_gen, **cfg.estimator_settings()
        )
    weights = cfg.penalties()  # the trainer's order: the plain penalties, then the jacobian
    plain = {k: v for k, v in weights.items() if k != "jacobian"}
    if plain:
        est = add_penalties(est, model, x, plain, generator=noise_gen)
    if "jacobian" in weights:
        with model.relaxation_map(cfg.step_size):
            est = add_penalties(est, model, x, {"jacobian": weights["jacobian"]},
                                generator=noise_gen, jac_norm=cfg.jac_norm,
                                iterations=cfg.power_iterations,
                                jac_bound=cfg.jac_bound)  # fmt: skip
    tokens = x.numel()
    free = est.stats.get("free", est.stats.get("bptt")).summary()
    for rank in results:
        got = rank["grads"][method]
        assert got["skipped"] is False
        for name, grad in est.grads.items():
            # float64; only the summation order differs (per-sample solves stop identically)
            torch.testing.assert_close(got["grads"][name], grad / tokens, rtol=1e-10, atol=1e-13)
        assert got["train_ce"] == pytest.approx(float(est.loss) / tokens, rel=1e-12)
        assert got["res_free"] == pytest.approx(free["residual_max"], rel=1e-9)
        assert got["steps_free"] == free["steps_max"]
        assert got["unconverged"] == sum(not s.all_converged() for s in est.stats.values()
                                         if s.phase != "bptt")  # fmt: skip
        for name, pen in est.penalties.items():  # value: mean over the global batch
            value, scale = got[f"penalty.{name}"]
            assert value == pytest.approx(float(pen["value"]), rel=1e-10)
            assert scale == pytest.approx(float(pen["scale"]), rel=1e-10)
            assert value > 1e-12  # t1 = 6: a real residual (converged: ~1e-26, rounding)
    assert set(est.penalties) == set(cfg.penalties())
    for name, grad in results[0]["grads"][method]["grads"].items():
        assert torch.equal(grad, results[1]["grads"][method]["grads"][name])


def test_two_ranks_keep_identical_weights_equal_to_one_process(ranks, data, monkeypatch):
    import gradstats.eqprop.train._loop as loop

    monkeypatch.setattr(loop, "_plot", lambda *args: None)  # slow, and not what is tested here
    folder, results = ranks
    for run in ("full", "parts_resumed"):
        for name, tensor in results[0][run].items():
            assert torch.equal(tensor, results[1][run][name]), (run, name)
    single = train(_cfg(data, folder / "single", 2 * BATCH, **RUN))
    reference = load_checkpoint(single.checkpoint)["model"]
    for name, tensor in results[0]["full"].items():
        # four Adam steps of the same float64 gradients up to summation order
        torch.testing.assert_close(tensor, reference[name], rtol=1e-9, atol=1e-12)
    two = read_metrics(folder / "full" / "metrics.jsonl")
    one = read_metrics(single.metrics)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone wrote the log
    for a, b in zip(two, one, strict=True):
        for key in ("train_ce", "val_ce", "grad_norm", "res_free", "cos_implicit_min"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-8), key
        for key in ("steps_free", "steps_adjoint", "unconverged", "skipped"):
            assert a.get(key) == b.get(key), key
        for key in ("penalty.residual", "penalty.jacobian"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-8), key
    assert "penalty.jacobian" in one[0]
    two_state, one_state = load_checkpoint(folder / "full"), load_checkpoint(single.checkpoint)
    # the noise generator advanced by the same draws (force noise and Hutchinson vectors)
    assert torch.equal(two_state["rng"]["noise"], one_state["rng"]["noise"])
    assert "cos_implicit_min" in two[1]  # the spot check ran (with its reduce) at step 2
    assert "val_ce" in two[1]


def test_backprop_baseline_under_two_ranks_equals_one_process(ranks, data, monkeypatch):
    import gradstats.eqprop.train._loop as loop

    monkeypatch.setattr(loop, "_plot", lambda *args: None)
    folder, results = ranks
    single = train(_cfg(data, folder / "single-backprop", 2 * BATCH, **BACKPROP))
    reference = load_checkpoint(single.checkpoint)["model"]
    for name, tensor in results[0]["backprop"].items():
        assert torch.equal(tensor, results[1]["backprop"][name]), name
        torch.testing.assert_close(tensor, reference[name], rtol=1e-9, atol=1e-12)
    two = read_metrics(folder / "backprop" / "metrics.jsonl")
    one = read_metrics(single.metrics)
    for key in ("train_ce", "grad_norm", "val_ce"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-9), key


def test_resume_under_two_ranks_matches_the_uninterrupted_run(ranks):
    folder, results = ranks
    for name, tensor in results[0]["full"].items():
        assert torch.equal(tensor, results[0]["parts_resumed"][name]), name
    full = load_checkpoint(folder / "full")
    parts = load_checkpoint(folder / "parts")
    assert full["world_size"] == parts["world_size"] == 2
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
    strip = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(folder / "full" /
             "metrics.jsonl")]  # fmt: skip
    resumed = read_metrics(folder / "parts" / "metrics.jsonl")
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in resumed]
    assert {p.name for p in (folder / "full").iterdir()} == {
        "checkpoint.pt",
        "metrics.jsonl",
        "curves.png",
    }


def test_a_diverging_run_stops_on_every_rank_at_the_same_step(ranks):
    folder, results = ranks
    pattern = r"training diverged at step (\d+) .*last good checkpoint \(step (\d+)\)"
    stops = [re.search(pattern, rank["diverged"]).groups() for rank in results]
    assert stops[0] == stops[1]
    assert int(stops[0][0]) < DIVERGE["steps"]
    assert load_checkpoint(folder / "diverge")["step"] == int(stops[0][1])


def test_resume_on_a_different_number_of_ranks_is_rejected(ranks, data):
    folder, _ = ranks
    with pytest.raises(StateError, match=r"trained on 2 process\(es\).*not 1"):
        train(_cfg(data, folder / "parts", BATCH, **RUN, resume=True))


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path, data):
    """``torchrun --nproc_per_node 2 -m gradstats eqprop train`` (about 10 s: kept out of CI)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "gradstats", "eqprop", "train", "--steps", "2", "--out", str(run), "--data",
           data, "--d-model", "16", "--n-heads", "2", "--block-size", "8", "--batch-size", "2",
           "--eval-every", "2", "--eval-batches", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("step 2: val CE") == 1  # rank 0 alone reports
    assert load_checkpoint(run)["world_size"] == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
