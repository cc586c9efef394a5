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

Run: ``gradstats bench eqprop_transformer`` (``--smoke``: a tiny model, seconds).
"""

from __future__ import annotations

import torch

from gradstats.bench._harness import Candidate, Comparison
from gradstats.eqprop import estimate_gradient
from gradstats.eqprop.models import EquilibriumTransformer

DEFAULT_T1 = 30  # TrainConfig.t1


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
            Candidate(
                "aep", run("aep", **free, **nudged), "tracking anchor, beta 0.05, tol_adj 1e-3"
            ),
            Candidate("bptt", run("bptt", steps=t1), "baseline: autograd through T1 steps"),
            Candidate(
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


def comparisons(smoke: bool) -> list[Comparison]:
    """The suite's comparisons (``smoke``: tiny sizes)."""
    t1s = (DEFAULT_T1 // 3, 4 * DEFAULT_T1 // 3) if smoke else (DEFAULT_T1, 4 * DEFAULT_T1)
    return [_step(t1, smoke) for t1 in t1s]
