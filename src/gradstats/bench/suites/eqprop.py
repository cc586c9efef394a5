"""Equilibrium propagation: gradient cost and memory as T1 grows, relaxation throughput, peers.

* ``eqprop/gradient_T1=<T>``: one gradient of a non-symmetric tanh fixed-point network
  (F = −z + W tanh z + Ux + b, float32) with the free phase run exactly T1 steps. Candidates:
  ``aep`` (EP with the asymmetry correction; nudged phases stop on the contrast residual),
  ``implicit`` (adjoint solve by Richardson iteration) and ``bptt`` (autograd through T1 steps,
  the baseline). Peak memory is measured: EP and implicit keep no graph of the free phase, so
  their memory is flat in T1 while BPTT's grows linearly. "same" checks every candidate against
  the implicit gradient (rtol 2e-2: AEP carries an O(β²) bias).
  At T1 = 30 a ``bptt, denormals kept`` candidate shows what the flush-denormal setting saves.
* ``eqprop/relax``: T relaxation steps of the same network, reported as sample-steps per second.
  Ours checks the residual at a growing interval (steps 0, 1, 3, 7, … then every 10; one host
  read per check); the baseline reads the residual back every step (the usual ``.item()``
  loop); torchdeq's ``fixed_point_iter`` (a peer) does the same bookkeeping every step.
* ``eqprop/relax_to_tol_fast`` and ``eqprop/relax_to_tol_slow``: relax to a relative residual of
  1e-4 on a strongly contracting network (n = 1024, ‖W‖₂ = 0.05, ε = 1: 4 steps) and a slowly
  converging one (‖W‖₂ = 0.8, ε = 0.1: about 110 steps), ours vs torchdeq's
  ``fixed_point_iter`` with the same tolerance (``stop_mode="rel"``; its residual is relative to
  the step εF, so its tol is scaled by ε): the cost of stopping, not of the steps.
* ``eqprop/anderson``: time to relax to a relative residual of 1e-4 on a slowly contracting
  network (ε = 0.1): plain iteration vs our Anderson acceleration vs torchdeq's Anderson solver.
* ``eqprop/implicit_gradient``: time per exact implicit gradient, ours vs torchdeq's IFT backward.

Every candidate runs with denormal CPU floats flushed to zero
(:func:`gradstats.eqprop._iterate.flush_denormal`; the trainer does the same): a backward
through many relaxation steps otherwise computes on subnormal floats, 6-10x slower on x86,
which would make BPTT an unfairly slow baseline.

Optional: torchdeq (a peer). Without it its candidates are left out with a note.

Run: ``gradstats bench eqprop`` (``--smoke`` for a seconds-long check).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from gradstats.bench._harness import Candidate, Comparison
from gradstats.bench._optional import missing
from gradstats.eqprop import estimate_gradient, relax
from gradstats.eqprop._iterate import flush_denormal
from gradstats.eqprop.models import TanhModel

__all__ = ["comparisons"]

EPS = 1.0  # ‖W‖₂ = 0.8 (0.5 in smoke runs), so z ← z + F(z) contracts at rate ≤ ‖W‖₂


def _flushed(fn: Callable[[], object], flush: bool = True) -> Callable[[], object]:
    """``fn`` run with denormal CPU floats flushed to zero (``flush=False``: kept)."""

    def run() -> object:
        with flush_denormal(flush):
            return fn()

    return run


def _case(
    smoke: bool, seed: int = 0, gain: float | None = None, width: int = 256
) -> tuple[TanhModel, torch.Tensor, torch.Tensor]:
    n, m, p, batch = (32, 16, 8, 8) if smoke else (width, 64, 16, 64)
    g = torch.Generator().manual_seed(seed)
    if gain is None:
        gain = 0.5 if smoke else 0.8  # smoke: faster contraction, so short runs still agree
    model = TanhModel.random(n, m, p, gain=gain, generator=g, dtype=torch.float32)
    x = torch.randn(batch, m, generator=g, dtype=torch.float32)
    y = torch.randn(batch, p, generator=g, dtype=torch.float32)
    return model, x, y


def _gradient(t1: int, smoke: bool) -> Comparison:
    model, x, y = _case(smoke)

    def run(method: str) -> Callable[[], object]:
        def fn() -> object:
            if method == "bptt":
                est = estimate_gradient(model, x, y, method, step_size=EPS, steps=t1)
            else:  # the free phase runs exactly T1 steps
                beta = 0.01 if method == "aep" else None
                est = estimate_gradient(
                    model, x, y, method, step_size=EPS, tol=0.0, max_steps=t1, beta=beta
                )
            return est.grads

        return fn

    candidates = [
        Candidate("aep", run("aep"), "tracking anchor, β = 0.01"),
        Candidate("implicit", run("implicit"), "Richardson adjoint to tol"),
        Candidate("bptt", run("bptt"), "baseline: autograd through T1 steps"),
    ]
    if t1 == 30:
        candidates.append(
            Candidate(
                "bptt, denormals kept",
                _flushed(run("bptt"), flush=False),
                "what flush-denormal saves (torch's default on CPU)",
            )
        )
    return Comparison(
        name=f"eqprop/gradient_T1={t1}",
        candidates=candidates,
        baseline="bptt",
        reference="implicit",
        rtol=2e-2,
        atol=2e-3,
        memory=True,
        params={"T1": t1, "state": list(model.W.shape), "batch": x.shape[0], "dtype": "float32"},
    )


def _add_torchdeq_iteration(
    candidates: list[Candidate],
    unavailable: dict[str, str],
    model: TanhModel,
    x: torch.Tensor,
    eps: float,
    *,
    max_iter: int,
    tol: float,
    return_final: bool,
    note: str,
) -> None:
    """torchdeq's ``fixed_point_iter`` on z ← z + εF(z) as a peer candidate (or the note that
    torchdeq is missing)."""
    name = "torchdeq fixed_point_iter"
    why = missing("torchdeq")
    if why is not None:
        unavailable[name] = why
        return
    from torchdeq.solver import fixed_point_iter

    def deq() -> object:
        with torch.no_grad():
            out, _, _ = fixed_point_iter(
                lambda z: z + eps * model.force(z, x),
                model.init_state(x),
                max_iter=max_iter,
                tol=tol,
                stop_mode="rel",
                return_final=return_final,
            )
            return out

    candidates.append(Candidate(name, deq, note))


def _relax(smoke: bool) -> Comparison:
    model, x, _ = _case(smoke)
    steps = 20 if smoke else 400
    unavailable: dict[str, str] = {}
    candidates = [
        Candidate(
            "gradstats.relax",
            lambda: relax(model, x, tol=0.0, max_steps=steps, step_size=EPS)[0],
            "residual checked every 10 steps",
        )
    ]

    def item_loop() -> torch.Tensor:
        with torch.no_grad():
            z = model.init_state(x)
            for _ in range(steps):
                f = model.force(z, x)
                if (f.norm() / z.norm().clamp_min(1e-30)).item() < 0.0:  # read back every step
                    break
                z = z + EPS * f
            return z

    candidates.append(Candidate("item() every step", item_loop, "baseline: host read per step"))
    _add_torchdeq_iteration(
        candidates, unavailable, model, x, EPS, max_iter=steps, tol=0.0, return_final=True,
        note="peer",
    )  # fmt: skip
    return Comparison(
        name="eqprop/relax",
        candidates=candidates,
        baseline="item() every step",
        reference="item() every step",
        rtol=1e-4,
        atol=1e-5,
        work=steps * x.shape[0],
        work_unit="sample-steps",
        params={"steps": steps, "state": list(model.W.shape), "batch": x.shape[0]},
        unavailable=unavailable,
    )


def _relax_to_tol(speed: str, smoke: bool) -> Comparison:
    gain, eps = {"fast": (0.05, EPS), "slow": (0.8, 0.1)}[speed]
    model, x, _ = _case(smoke, seed=3, gain=gain, width=1024)  # the steps dominate, not overhead
    tol = 1e-4
    unavailable: dict[str, str] = {}

    def ours() -> object:
        return relax(model, x, tol=tol, max_steps=5000, step_size=eps)[0]

    candidates = [Candidate("gradstats.relax", ours, "growing check interval, per-sample freeze")]
    _add_torchdeq_iteration(  # its residual ‖εF‖/‖z + εF‖: tol scaled by ε
        candidates, unavailable, model, x, eps, max_iter=5000, tol=tol * eps, return_final=False,
        note="peer: reads every step",
    )  # fmt: skip
    baseline = candidates[-1].name
    return Comparison(
        name=f"eqprop/relax_to_tol_{speed}",
        candidates=candidates,
        baseline=baseline,
        rtol=1e-2,
        atol=1e-3,
        params={
            "gain": gain,
            "eps": eps,
            "tol": tol,
            "state": list(model.W.shape),
            "batch": x.shape[0],
        },
        unavailable=unavailable,
    )


def _anderson(smoke: bool) -> Comparison:
    model, x, _ = _case(smoke, seed=1)
    eps, tol = 0.1, 1e-4
    unavailable: dict[str, str] = {}

    def ours(anderson: int) -> Callable[[], object]:
        def fn() -> object:
            return relax(model, x, tol=tol, max_steps=5000, step_size=eps, anderson=anderson)[0]

        return fn

    candidates = [
        Candidate("plain relaxation", ours(0), "baseline: z ← z + εF(z)"),
        Candidate("gradstats Anderson (m=5)", ours(5), "per-sample least squares"),
    ]
    note = missing("torchdeq")
    if note is not None:
        unavailable["torchdeq anderson_solver (m=5)"] = note
    else:
        from torchdeq.solver import anderson_solver

        def deq() -> object:
            with torch.no_grad():
                out, _, _ = anderson_solver(
                    lambda z: z + eps * model.force(z, x),
                    model.init_state(x),
                    max_iter=5000,
                    tol=tol * 0.1,
                    stop_mode="rel",
                    m=5,
                )
                return out

        candidates.append(Candidate("torchdeq anderson_solver (m=5)", deq, "peer"))
    return Comparison(
        name="eqprop/anderson",
        candidates=candidates,
        baseline="plain relaxation",
        rtol=1e-2,
        atol=1e-3,
        params={"eps": eps, "tol": tol, "state": list(model.W.shape), "batch": x.shape[0]},
        unavailable=unavailable,
    )


def _implicit(smoke: bool) -> Comparison:
    model, x, y = _case(smoke, seed=2)
    unavailable: dict[str, str] = {}
    names = [n for n, _ in model.named_parameters()]

    def ours() -> object:
        return estimate_gradient(
            model, x, y, "implicit", step_size=EPS, tol=1e-6, tol_adjoint=1e-6
        ).grads

    candidates = [Candidate("gradstats implicit", ours, "relax + Richardson adjoint")]
    note = missing("torchdeq")
    if note is not None:
        unavailable["torchdeq IFT backward"] = note
    else:
        import torchdeq

        deq = torchdeq.get_deq(
            core="indexing",
            ift=True,
            f_solver="fixed_point_iter",
            b_solver="fixed_point_iter",
            f_max_iter=500,
            b_max_iter=500,
            f_tol=1e-6,
            b_tol=1e-6,
            f_stop_mode="rel",
            b_stop_mode="rel",
        )
        deq.train()

        def theirs() -> object:
            model.zero_grad()
            z_out, _ = deq(lambda z: z + EPS * model.force(z, x), model.init_state(x))
            model.loss(z_out[-1], y).backward()
            return {
                n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in zip(names, model.parameters(), strict=True)
            }

        candidates.append(Candidate("torchdeq IFT backward", theirs, "peer"))
    return Comparison(
        name="eqprop/implicit_gradient",
        candidates=candidates,
        baseline="gradstats implicit",
        rtol=1e-2,
        atol=1e-3,
        params={"tol": 1e-6, "state": list(model.W.shape), "batch": x.shape[0]},
        unavailable=unavailable,
    )


def comparisons(smoke: bool) -> list[Comparison]:
    """The suite: gradient cost per T1, relaxation throughput and stopping cost, Anderson,
    implicit gradient."""
    t1s = (20, 30) if smoke else (30, 120, 400)
    suite = [
        *(_gradient(t1, smoke) for t1 in t1s),
        _relax(smoke),
        _relax_to_tol("fast", smoke),
        _relax_to_tol("slow", smoke),
        _anderson(smoke),
        _implicit(smoke),
    ]
    return [  # every candidate with denormals flushed (nested settings restore correctly)
        replace(c, candidates=[replace(k, fn=_flushed(k.fn)) for k in c.candidates]) for c in suite
    ]
