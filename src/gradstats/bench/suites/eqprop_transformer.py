"""The equilibrium transformer: time and peak memory of one training gradient, AEP vs BPTT.

``eqprop_transformer/step_T1=<T>``: one gradient of the token-summed cross-entropy of an
:class:`~gradstats.eqprop.models.EquilibriumTransformer` (float32, CPU) on a batch of
character windows, with the free phase run exactly T1 steps in every candidate — the default
T1 of ``gradstats eqprop train`` (30) and 4× it:

* ``aep`` (the baseline of neither: EP with the asymmetry correction, nudged phases to the
  trainer's tolerance): no graph of the free phase is kept, so its memory is flat in T1;
* ``bptt`` (the baseline): autograd through T1 steps, memory linear in T1;
* ``implicit`` (the reference of the agreement check): an adjoint solve at the same state.

Ratios to ``bptt`` at equal T1 are the numbers to read (goal: time ≤ 1.5×, memory flat).
"same" compares each gradient with the implicit one (rtol 5e-2: AEP carries an O(β²) bias and
BPTT's unroll is only as converged as T1 steps make it).

``eqprop_transformer/generate_block=<T>``: greedy text generation at block size T (256; the
small model's width, d_model 64, 4 heads, ``init_std`` 0.1 so that attention and FFN shape the
fixed point), batch 1, float32, ms per generated token after the prompt (T − 16 tokens, relaxed
once beforehand: the cost both candidates share):

* ``re-relax`` (the baseline): for every token, relax the whole window again (``relax`` of all
  the tokens so far, then the last position's logits) — what ``model(idx)[:, -1]`` in a loop does;
* ``incremental``: what :func:`~gradstats.eqprop.models.generate` does for every token — one
  relaxation of ONE position against the cached keys/values of the converged prefix.

Both use the model's own solver settings; "same" checks that they pick the same tokens (goal:
incremental ≤ 0.1× re-relax at T = 256).

Every candidate runs with denormal floats flushed to zero (``torch.set_flush_denormal(True)``,
restored after each call): backpropagation through many relaxation steps otherwise decays into
denormals, which are ~10× slower on CPUs, and BPTT would be timed in them.

Run: ``gradstats bench eqprop_transformer`` (``--smoke``: a tiny model, seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gradstats.bench._harness import Candidate, Comparison
from gradstats.eqprop import estimate_gradient, relax
from gradstats.eqprop._settings import resolve_settings
from gradstats.eqprop.models import EquilibriumTransformer
from gradstats.eqprop.models._generate import _Equilibrium

DEFAULT_T1 = 30  # TrainConfig.t1


def flushes_denormals() -> bool:
    """Whether denormal floats are flushed to zero now (one tiny computation: x86 FTZ/DAZ)."""
    denormal = torch.tensor([1e-40], dtype=torch.float32)
    return bool((denormal * 1.0)[0] == 0)  # sync-ok: set-up, not timed


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormals to zero inside the block; the previous setting is restored after."""
    previous = flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def _flushed(fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with flush_denormals():
            return fn()

    return call


def _candidate(name: str, fn: Callable[[], object], note: str) -> Candidate:
    return Candidate(name, _flushed(fn), note)


def _case(smoke: bool):
    vocab, block, width, heads, batch = (65, 16, 32, 2, 4) if smoke else (65, 64, 64, 4, 16)
    g = torch.Generator().manual_seed(0)
    model = EquilibriumTransformer(vocab, block, width, heads, generator=g).float()
    idx = torch.randint(vocab, (batch, block), generator=g)
    y = torch.randint(vocab, (batch, block), generator=g)
    return model, idx, y


def _step(t1: int, smoke: bool) -> Comparison:
    model, idx, y = _case(smoke)
    free = {"max_steps": t1, "tol": 0.0}

    def run(method, **kw):
        def fn():
            return estimate_gradient(model, idx, y, method, **kw).grads

        return fn

    nudged = {"beta": 0.05, "tol_adjoint": 1e-3, "max_steps_adjoint": 100}  # the small config
    return Comparison(
        name=f"eqprop_transformer/step_T1={t1}",
        candidates=[
            _candidate(
                "aep", run("aep", **free, **nudged), "tracking anchor, beta 0.05, tol_adj 1e-3"
            ),
            _candidate("bptt", run("bptt", steps=t1), "baseline: autograd through T1 steps"),
            _candidate(
                "implicit", run("implicit", **free, tol_adjoint=1e-6), "reference: adjoint solve"
            ),
        ],
        baseline="bptt",
        reference="implicit",
        rtol=5e-2,
        atol=5e-3,
        memory=True,
        params={
            "T1": t1,
            "config": model.config(),
            "batch": list(idx.shape),
            "dtype": "float32",
        },
    )


def _generation(smoke: bool) -> Comparison:
    vocab, block, width, heads, tokens = (65, 16, 16, 2, 4) if smoke else (65, 256, 64, 4, 16)
    g = torch.Generator().manual_seed(0)
    model = EquilibriumTransformer(vocab, block, width, heads, init_std=0.1, generator=g).float()
    prompt = torch.randint(vocab, (1, block - tokens), generator=g)
    start = prompt.shape[1]
    settings = resolve_settings("implicit", model.solver_defaults, torch.float32)
    stepper = _Equilibrium(model, 1, settings)
    with torch.no_grad(), flush_denormals():
        first = stepper.window(prompt).argmax(-1)  # the prompt, relaxed once for both

    @torch.no_grad()
    def incremental() -> torch.Tensor:
        token, out = first, [first]
        for n in range(start, start + tokens - 1):  # overwrites only cache slots >= start
            token = stepper.extend(token, n).argmax(-1)
            out.append(token)
        return torch.cat(out)

    @torch.no_grad()
    def re_relax() -> torch.Tensor:
        ids, out = torch.cat([prompt, first[:, None]], 1), [first]
        for _ in range(tokens - 1):
            z, _ = relax(model, ids)
            token = model.logits(z[:, -1]).argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
            out.append(token)
        return torch.cat(out)

    per = f"{tokens - 1} tokens after the prompt's first"
    return Comparison(
        name=f"eqprop_transformer/generate_block={block}",
        candidates=[
            _candidate("incremental", incremental, f"one position per token ({per})"),
            _candidate("re-relax", re_relax, f"baseline: the whole window per token ({per})"),
        ],
        baseline="re-relax",
        rtol=0.0,
        atol=0.5,  # token ids: equal
        work=tokens - 1,
        work_unit="token",
        params={
            "block_size": block,
            "prompt": start,
            "tokens": tokens - 1,
            "config": model.config(),
            "batch": 1,
            "dtype": "float32",
            "solver": {"tol": settings.tol, "max_steps": settings.max_steps},
        },
    )


def comparisons(smoke: bool) -> list[Comparison]:
    """The suite's comparisons (``smoke``: tiny sizes)."""
    t1s = (DEFAULT_T1 // 3, 4 * DEFAULT_T1 // 3) if smoke else (DEFAULT_T1, 4 * DEFAULT_T1)
    return [*(_step(t1, smoke) for t1 in t1s), _generation(smoke)]
