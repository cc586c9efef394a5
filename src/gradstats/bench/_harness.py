"""Side-by-side timing: warm-up, interleaved repeats, medians, ratios and an agreement check.

A :class:`Comparison` lists :class:`Candidate` implementations of the same computation (ours, a
baseline, peers). :func:`run_comparison` warms each up, then times them in rotating order
(repeat r starts with candidate r mod k, so drift and thermal effects hit all alike), with a
device synchronisation before and after every call. With ``settle`` = s, each timed call is
preceded by s untimed calls of the same candidate, so that it follows itself (a steady state)
rather than whichever candidate ran before it: a peer that allocates a gigabyte per call would
otherwise leave the next candidate a cold cache and a cold allocator. The clock (recorded as
``"clock"``): on the CPU the CPU time of the calling thread (``time.thread_time``; with one
intra-op thread that is all the work, and other processes on a shared machine do not inflate
it), or of the whole process (``time.process_time``) when torch runs several threads; on an
accelerator the wall time (``time.perf_counter``) between synchronisations. It reports the
median and inter-quartile range per candidate, the ratio of each median to the baseline's and
the *paired* ratio (the median over repeats of the two calls' ratio within one repeat, see
:func:`paired_ratio`; also for the ``pairs`` a comparison names), optional peak memory, the
median minor page faults per timed call on Linux (``minor_faults_per_call``: kernel time inside
the CPU clock, see :mod:`gradstats.bench._allocator`), and whether each candidate's output
matches the reference candidate's ("same numbers").
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gradstats.bench._memory import peak_memory_bytes
from gradstats.errors import ConfigurationError, ConfigurationTypeError

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "CLOCKS",
    "SETTLE",
    "Candidate",
    "Comparison",
    "clock_name",
    "paired_ratio",
    "run_comparison",
]

# the ``settle`` of the suites' cost comparisons whose candidates include a peer that allocates
# per-sample gradients (hundreds of MiB per call): one untimed call before each timed one
SETTLE = 1


@dataclass(frozen=True)
class Candidate:
    """One implementation: ``fn()`` is a single timed call that returns its output."""

    name: str
    fn: Callable[[], object]
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    """Candidates of one computation, run side by side in one process.

    Attributes:
        name: ``"<suite>/<case>"``.
        candidates: the implementations; names must be unique.
        baseline: name of the candidate that ratios are relative to.
        reference: name of the candidate whose output the others must match (``None``: the
            baseline).
        check: whether to run the agreement check at all.
        rtol, atol: tolerances of the agreement check (``torch.allclose`` in float64).
        memory: also measure each candidate's peak memory (one extra, untimed call).
        device: where the candidates run (``"cuda"`` adds synchronisation around calls).
        work: units of work per call (e.g. samples) for a derived throughput, with ``work_unit``.
        params: the sizes and settings to record with the result.
        unavailable: candidates that could not run here (e.g. a missing peer) and why.
        settle: untimed calls of a candidate right before each of its timed calls (0: none).
        pairs: (numerator, denominator) candidate names whose paired ratio to report besides
            the ratios to the baseline (e.g. ours ÷ a cost floor).
    """

    name: str
    candidates: Sequence[Candidate]
    baseline: str
    reference: str | None = None
    check: bool = True
    rtol: float = 1e-5
    atol: float = 1e-8
    memory: bool = False
    device: str = "cpu"
    work: float | None = None
    work_unit: str = ""
    params: Mapping[str, object] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict)
    settle: int = 0
    pairs: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.settle, bool) or not isinstance(self.settle, int) or self.settle < 0:
            raise ConfigurationError(f"settle must be an int >= 0; got {self.settle!r}")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"candidate names must be unique; got {names}")
        if self.baseline not in names:
            raise ConfigurationError(f"baseline must be one of {names}; got {self.baseline!r}")
        for pair in self.pairs:
            if len(pair) != 2 or any(name not in names for name in pair):
                raise ConfigurationError(
                    f"pairs must be (numerator, denominator) names from {names}; got {pair!r}"
                )
        if self.reference is not None and self.reference not in names:
            raise ConfigurationError(
                f"reference must be one of {names} or None; got {self.reference!r}"
            )

    @property
    def reference_name(self) -> str:
        """The candidate whose output the others must match."""
        return self.baseline if self.reference is None else self.reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(output: object) -> list[torch.Tensor]:
    """Flatten a candidate's output (tensor, number, or nested dict/list/tuple of them)."""
    if isinstance(output, torch.Tensor):
        return [output.detach()]
    if isinstance(output, (int, float)):
        return [torch.tensor(float(output))]
    if isinstance(output, Mapping):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    raise ConfigurationTypeError(
        f"benchmark outputs must be tensors, numbers, dicts or lists; got {type(output)}"
    )


def _agreement(output: object, reference: object, rtol: float, atol: float) -> dict[str, object]:
    ours, theirs = _tensors(output), _tensors(reference)
    if len(ours) != len(theirs) or any(
        a.shape != b.shape for a, b in zip(ours, theirs, strict=True)
    ):
        return {"agrees": False, "max_abs_diff": None, "max_rel_diff": None}
    abs_diff = rel_diff = 0.0
    agrees = True
    for a, b in zip(ours, theirs, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        if a.numel() == 0:
            continue
        diff = (a - b).abs()
        abs_diff = max(abs_diff, diff.max().item())
        rel_diff = max(rel_diff, (diff / b.abs().clamp(min=atol)).max().item())
        agrees = agrees and torch.allclose(a, b, rtol=rtol, atol=atol)
    return {"agrees": agrees, "max_abs_diff": abs_diff, "max_rel_diff": rel_diff}


CLOCKS: dict[str, Callable[[], float]] = {
    "thread_time": time.thread_time,
    "process_time": time.process_time,
    "perf_counter": time.perf_counter,
}


def minor_faults() -> int | None:
    """Minor page faults of the calling thread so far (Linux), else None: a timed call that
    faults pages in pays kernel time inside its CPU time (see ``bench/_allocator.py``)."""
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    if who is None:
        return None
    return resource.getrusage(who).ru_minflt


def clock_name(device: torch.device) -> str:
    """The clock :func:`run_comparison` uses on ``device`` (see the module docstring)."""
    if device.type != "cpu":
        return "perf_counter"
    return "thread_time" if torch.get_num_threads() == 1 else "process_time"


def run_comparison(
    comparison: Comparison, *, warmup: int = 3, repeats: int = 20, progress: bool = True
) -> dict[str, object]:
    """Time the candidates of ``comparison`` side by side; return a JSON-ready record."""
    device = torch.device(comparison.device)
    clock_used = clock_name(device)
    clock = CLOCKS[clock_used]
    candidates = list(comparison.candidates)
    outputs: dict[str, object] = {}
    for candidate in candidates:  # warm-up; keep the first output for the agreement check
        for index in range(max(warmup, 1)):
            _sync(device)
            result = candidate.fn()
            _sync(device)
            if index == 0:
                outputs[candidate.name] = result
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    faults: dict[str, list[int]] = {c.name: [] for c in candidates}
    bar = tqdm(
        total=repeats * len(candidates), desc=comparison.name, leave=False, disable=not progress
    )
    for repeat in range(repeats):
        shift = repeat % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            for _ in range(comparison.settle):
                candidate.fn()
            _sync(device)
            before = minor_faults()
            start = clock()
            candidate.fn()
            _sync(device)
            times[candidate.name].append(clock() - start)
            after = minor_faults()
            if before is not None and after is not None:
                faults[candidate.name].append(after - before)
            bar.update(1)
    bar.close()
    baseline_median = statistics.median(times[comparison.baseline])
    rows = []
    for candidate in candidates:
        samples = sorted(times[candidate.name])
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
        row: dict[str, object] = {
            "name": candidate.name,
            "note": candidate.note,
            "median_s": median,
            "iqr_s": quartiles[2] - quartiles[0],
            "times_s": times[candidate.name],
            "ratio_to_baseline": median / baseline_median if baseline_median > 0 else math.nan,
            "paired_ratio": paired_ratio(times[candidate.name], times[comparison.baseline])[0],
        }
        if faults[candidate.name]:  # page faults inside the timed calls (Linux)
            row["minor_faults_per_call"] = statistics.median(faults[candidate.name])
        if comparison.work:
            row["throughput"] = comparison.work / median
        if comparison.memory:
            row["peak_bytes"] = peak_memory_bytes(candidate.fn, device)
        if comparison.check:
            reference = outputs[comparison.reference_name]
            row.update(
                _agreement(outputs[candidate.name], reference, comparison.rtol, comparison.atol)
            )
        rows.append(row)
    return {
        "comparison": comparison.name,
        "baseline": comparison.baseline,
        "reference": comparison.reference_name if comparison.check else None,
        "device": str(device),
        "clock": clock_used,
        "warmup": warmup,
        "repeats": repeats,
        "settle": comparison.settle,
        "work_unit": comparison.work_unit,
        "params": dict(comparison.params),
        "unavailable": dict(comparison.unavailable),
        "candidates": rows,
        "pairs": [
            {
                "numerator": a,
                "denominator": b,
                "paired_ratio": ratio,
                "paired_iqr": iqr,
                "ratio_of_medians": top / bottom if bottom > 0 else math.nan,
            }
            for a, b in comparison.pairs
            for ratio, iqr in [paired_ratio(times[a], times[b])]
            for top, bottom in [(statistics.median(times[a]), statistics.median(times[b]))]
        ],
    }


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, list[float]]:
    """(median, [first, third quartile]) of the per-repeat ratios t_a(r) / t_b(r).

    The two calls of one repeat run back to back, so they share the machine's state of the
    moment (a neighbour's load, the clock frequency): the paired ratio is a lower-variance
    estimate of the cost ratio than the ratio of the two medians when that state drifts."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    if not ratios:
        return math.nan, [math.nan, math.nan]
    if len(ratios) == 1:
        return ratios[0], [ratios[0], ratios[0]]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), [quartiles[0], quartiles[2]]
