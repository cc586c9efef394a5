"""Streaming moments: gradstats vs the naive sums people write by hand, side by side.

* ``moments/running``: exact streaming mean/variance of a stream of batches. Baseline: float64
  running sums Σx, Σx² (fast, but E[x²] − E[x]² cancels catastrophically when |mean| ≫ std).
  Also shown: ``torch.var_mean`` on the whole stream at once (not streaming: a lower bound).
* ``moments/ema``: debiased EMA mean/variance of a stream of vectors. Baseline: two in-place
  ``lerp_`` EMAs of x and x² (zero-initialised, debiased at read, same cancellation risk).

Run: ``gradstats bench moments`` (add ``--smoke`` for a seconds-long check).
"""

from __future__ import annotations

import torch

from gradstats.bench._harness import Candidate, Comparison
from gradstats.moments import EMAMoments, RunningMoments


def _running(smoke: bool) -> Comparison:
    batches, rows, width = (4, 16, 256) if smoke else (32, 256, 4096)
    g = torch.Generator().manual_seed(0)
    stream = [3.0 + torch.randn(rows, width, generator=g) for _ in range(batches)]
    whole = torch.cat(stream)

    def ours():
        rm = RunningMoments(width)
        for batch in stream:
            rm.update(batch)
        return rm.variance()

    def naive_sums():
        s1 = torch.zeros(width, dtype=torch.float64)
        s2 = torch.zeros(width, dtype=torch.float64)
        for batch in stream:
            b = batch.double()
            s1 += b.sum(0)
            s2 += b.square().sum(0)
        n = batches * rows
        return (s2 - s1.square() / n) / (n - 1)

    def all_at_once():
        return torch.var_mean(whole.double(), dim=0)[0]

    return Comparison(
        name="moments/running",
        candidates=[
            Candidate("gradstats.RunningMoments", ours, "exact Welford/Chan, float64 state"),
            Candidate("naive float64 sums", naive_sums, "baseline: cancellation-prone"),
            Candidate("torch.var_mean (whole)", all_at_once, "not streaming: lower bound"),
        ],
        baseline="naive float64 sums",
        rtol=1e-6,
        work=batches * rows * width,
        work_unit="elements",
        params={"batches": batches, "rows": rows, "width": width, "dtype": "float32 data"},
    )


def _ema(smoke: bool) -> Comparison:
    steps, width = (5, 1024) if smoke else (50, 1_000_000)
    beta = 0.99
    g = torch.Generator().manual_seed(1)
    stream = [3.0 + torch.randn(width, generator=g) for _ in range(steps)]

    def ours():
        ema = EMAMoments(beta, width, dtype=torch.float32)
        for x in stream:
            ema.update(x)
        return ema.variance

    def naive_lerp():
        m = torch.zeros(width)
        q = torch.zeros(width)
        for x in stream:
            m.lerp_(x, 1 - beta)
            q.lerp_(x.square(), 1 - beta)
        debias = 1 - beta**steps
        return q / debias - (m / debias).square()

    return Comparison(
        name="moments/ema",
        candidates=[
            Candidate("gradstats.EMAMoments", ours, "deviation form, shift, skip-safe"),
            Candidate("naive lerp_ EMAs", naive_lerp, "baseline: E[x²]−E[x]², float32"),
        ],
        baseline="naive lerp_ EMAs",
        rtol=1e-2,  # the float32 baseline cancels: |mean|²/var = 9 costs ~3 digits
        atol=1e-4,
        memory=True,
        work=steps * width,
        work_unit="elements",
        params={"steps": steps, "width": width, "beta": beta, "dtype": "float32 state"},
    )


def comparisons(smoke: bool) -> list[Comparison]:
    """The suite's comparisons (``smoke``: tiny sizes)."""
    return [_running(smoke), _ema(smoke)]
