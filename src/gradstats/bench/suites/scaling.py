"""Variance gradient scaler: cost of one statistics update plus factor, side by side.

* ``scaling/step-cost`` — a ~5M-parameter, 100-tensor model with gradients in place. Baseline:
  one ``AdamW(fused=True)`` step (the bandwidth floor of an optimizer step: it reads p, g, m, v
  and writes p, m, v, 28 B/element in float32), beside ``AdamW(foreach=True)``. Candidates: the
  scaler's update + factor (``temporal`` with the native kernels it uses on the CPU when a C
  compiler exists, and with the foreach kernels it falls back to; ``same_point`` with two
  recorded micro-batches), and a per-tensor implementation of the same temporal statistic that
  reads each tensor's sums with ``.item()`` (the original's style). Goals: ``temporal`` <= 1.0x
  the fused AdamW step, <= 16 B/element, O(1) ops per dtype group; >= 10x faster than the
  ``.item()`` implementation (mostly a GPU effect: every ``.item()`` syncs).
* ``scaling/step-cost-vs-foreach`` — the same ``temporal`` update ÷ one ``AdamW(foreach=True)``
  step, timed side by side in the same run.

  Traffic and op counts are measured, not assumed: one untimed steady-state call of each runs under
  a ``TorchDispatchMode`` that counts every aten op and the bytes of its tensor arguments
  (inputs read; arguments the op's schema marks as mutated, and fresh outputs, written; a copy
  does not read its destination), plus the native kernel calls, which a dispatcher cannot see,
  with the bytes each reads and writes (:func:`gradstats.scaling._kernels.native_traffic`).
  Recorded in the params: ``<candidate>_bytes_per_element`` (total ÷ parameter count),
  ``<candidate>_ops`` (every op of the call, small per-tensor-scalar ops included) and
  ``<candidate>_bulk_ops`` (those moving >= 1 B per parameter element). Native ``temporal``:
  one pass reading g and m and writing the new m to the other buffer of a pair (‖g‖² from the
  same pass) = 12 B, one bulk call.
  (The count follows the schemas: ``_fused_adamw_`` marks the gradients mutable, so fused AdamW
  counts 32 B although it writes them only when unscaling: its real traffic is 28 B.)
  Foreach ``temporal``: ‖g‖² in float64 (torch casts to float64 on the CPU), then copy, (mul),
  subtract, scale, ‖cδ‖², NaN clean, m += (a/c)·(c·δ) — seven bulk ops per dtype group.
* ``scaling/same-numbers`` — ours and the ``.item()`` implementation on the same gradient
  sequence give the same ρ.
* ``scaling/per-sample-mlp`` and ``scaling/per-sample-gpt2`` — ``statistic="per_sample"``
  (forward + backward with the module hooks + ``step()``) ÷ a plain forward + backward, on the
  MLP 784-512-512-10 at batch 256 and a GPT-2 config (4 layers, width 128, vocab 2048) at
  8×128 tokens. Goal: <= 1.1x. Both time a cost floor (``_scaling_floors``: MLP, a plain
  backward + the row norms and ‖ĝ‖² the estimator needs; GPT-2, a lower bound: per-sequence
  weight products in place of the weight GEMMs + ‖ĝ‖²): the method's share of the ratio. The MLP
  also times the peer a user would reach for, BackPACK's ``BatchL2Grad`` (per-sample ‖g_i‖² from
  its own hooks, ``_scaling_peers``), where installed.

Persistent extra memory (state) is recorded in the comparison's params: the temporal statistic
keeps one buffer per parameter, two with the native one-pass update (AdamW keeps two; the
foreach fallback one more scratch buffer), the others only per-tensor scalars.

Run: ``gradstats bench scaling`` (``--smoke`` for a seconds-long check).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gradstats import VarianceGradientScaler
from gradstats.bench._harness import SETTLE, Candidate, Comparison
from gradstats.bench._optional import Skipped, missing
from gradstats.bench.suites._scaling_floors import (
    complete_sequence_floor,
    per_sample_floor,
    sequence_floor,
)
from gradstats.bench.suites._scaling_peers import ItemwiseTemporal, backpack_batch_l2
from gradstats.scaling._kernels import native_kernels_available, native_traffic, set_native_kernels

__all__ = ["comparisons"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(smoke: bool, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    blocks, rows, cols = (4, 16, 24) if smoke else (50, 256, 384)
    g = torch.Generator().manual_seed(seed)
    named = []
    for b in range(blocks):
        for name, shape in ((f"{b}.weight", (rows, cols)), (f"{b}.bias", (cols,))):
            p = torch.nn.Parameter(torch.zeros(shape, device=DEVICE))
            p.grad = (torch.randn(shape, generator=g) + 0.1).to(DEVICE)
            named.append((name, p))
    return named


def _nbytes(value: object) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor)
    )


class _Traffic(TorchDispatchMode):
    """Count aten ops and the bytes they move (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema, moved = func._schema, 0
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            reads = not (written and schema.name.endswith("copy_"))  # a copy overwrites
            moved += _nbytes(value) * (int(reads) + int(written))
        returns = schema.returns
        if returns and all(r.alias_info is not None for r in returns) and not schema.is_mutable:
            moved = 0  # a view (detach, select, ...) moves nothing
        elif not schema.name.startswith("aten::empty"):
            fresh = [r.alias_info is None for r in schema.returns]
            outs = out if isinstance(out, tuple) else (out,)
            moved += sum(_nbytes(o) for o, f in zip(outs, fresh, strict=False) if f)
        self.ops.append((str(func), moved))
        return out


def _traffic(fn: Callable[[], object], numel: int, label: str) -> dict[str, object]:
    """One untimed steady-state call of ``fn`` (after one that may allocate lazily
    initialised state): bytes per element and op counts (aten + native)."""
    fn()
    with native_traffic() as native, _Traffic() as aten:
        fn()
    ops = aten.ops + [(name, read + written) for name, read, written in native]
    total = sum(moved for _, moved in ops)
    return {
        f"{label}_bytes_per_element": round(total / numel, 2),
        f"{label}_ops": len(ops),
        f"{label}_bulk_ops": sum(moved >= numel for _, moved in ops),
    }


def _foreach_kernels(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` with the scaler's native kernels switched off (its fallback path)."""

    def run() -> None:
        previous = set_native_kernels(False)
        try:
            fn()
        finally:
            set_native_kernels(previous)

    return run


def _step_cost(smoke: bool) -> list[Comparison]:
    named = _params(smoke)
    params = [p for _, p in named]
    adamw = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    temporal = VarianceGradientScaler(named, beta=0.99, statistic="temporal", rule="shrink")
    fallback = VarianceGradientScaler(named, beta=0.99, statistic="temporal", rule="shrink")
    same_point = VarianceGradientScaler(named, statistic="same_point", rule="shrink", beta=0.99)
    itemwise = ItemwiseTemporal(params, beta=0.99)
    grads = [p.grad for p in params]
    foreach_temporal = _foreach_kernels(fallback.update_statistics)
    for _ in range(2):  # an estimate exists from the start
        temporal.update_statistics()
        foreach_temporal()
        itemwise.step()

    def ours_same_point():
        same_point.observe(grads)  # what the backward hooks record for two micro-batches
        same_point.observe(grads)
        same_point.update_statistics()

    numel = sum(p.numel() for p in params)
    native = native_kernels_available()
    measured: dict[str, object] = {"native_kernels": native}
    for label, fn in (
        ("adamw_fused", fused.step),
        ("adamw_foreach", adamw.step),
        ("temporal", temporal.update_statistics),
        ("temporal_foreach_kernels", foreach_temporal),
        ("same_point", ours_same_point),
    ):
        measured.update(_traffic(fn, numel, label))

    def note(label: str, what: str) -> str:
        traffic, bulk = measured[f"{label}_bytes_per_element"], measured[f"{label}_bulk_ops"]
        return f"{what}; {traffic} B/el, {bulk} bulk ops"

    ours = Candidate(
        "gradstats temporal",
        temporal.update_statistics,
        note("temporal", "native kernels" if native else "no compiler: foreach kernels"),
    )
    foreach_step = Candidate("AdamW(foreach) step", adamw.step, note("adamw_foreach", "foreach"))
    params_record = {
        "parameters": numel,
        "tensors": len(params),
        "state_bytes_adamw": 2 * 4 * numel,
        # the native one-pass update keeps a second mean buffer (the new means go there)
        "state_bytes_temporal": (8 if native else 4) * numel + 16 * len(params),
        "scratch_bytes_temporal": 0 if native else 4 * numel,
        "state_bytes_same_point": 32 * len(params),
        **measured,
    }
    return [
        Comparison(
            name="scaling/step-cost",
            candidates=[
                Candidate(
                    "AdamW(fused) step", fused.step, note("adamw_fused", "baseline: one pass")
                ),
                foreach_step,
                ours,
                Candidate(
                    "temporal, foreach kernels",
                    foreach_temporal,
                    note("temporal_foreach_kernels", "the fallback path"),
                ),
                Candidate(
                    "gradstats same_point",
                    ours_same_point,
                    note("same_point", "2 micro-batches + update"),
                ),
                Candidate("per-tensor .item()", itemwise.step, "same statistic, host reads"),
            ],
            baseline="AdamW(fused) step",
            check=False,
            memory=True,
            device=DEVICE,
            params=params_record,
        ),
        Comparison(
            name="scaling/step-cost-vs-foreach",
            candidates=[foreach_step, ours],
            baseline="AdamW(foreach) step",
            check=False,
            device=DEVICE,
            params={"parameters": numel, "tensors": len(params), "native_kernels": native},
        ),
    ]


def _same_numbers(smoke: bool) -> Comparison:
    steps = 3 if smoke else 8

    def run(kind: str) -> torch.Tensor:
        named = _params(True, seed=1)
        params = [p for _, p in named]
        ours = VarianceGradientScaler(named, beta=0.9, statistic="temporal", rule="shrink")
        reference = ItemwiseTemporal(params, beta=0.9)
        g = torch.Generator().manual_seed(2)
        rho = float("nan")
        for _ in range(steps):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) + 0.5).to(DEVICE)
            if kind == "ours":
                ours.update_statistics()
                rho = ours.get_normalized_variance()
            else:
                rho = reference.step()
        return torch.tensor(rho)

    return Comparison(
        name="scaling/same-numbers",
        candidates=[
            Candidate("gradstats temporal", lambda: run("ours")),
            Candidate("per-tensor .item()", lambda: run("itemwise")),
        ],
        baseline="per-tensor .item()",
        rtol=1e-4,  # float32 state on both sides, different summation order
        device=DEVICE,
    )


def _per_sample_cost(
    name: str,
    model: torch.nn.Module,
    loss: Callable[[torch.nn.Module], torch.Tensor],
    floor: Candidate,
    **params,
) -> Comparison:
    """Forward + backward (+ the scaler's step) with and without the per-sample hooks, and
    the cost ``floor``."""
    plain, hooked = model, copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgs = VarianceGradientScaler(
            hooked.named_parameters(), statistic="per_sample", model=hooked, beta=0.99
        )

    def backward() -> None:
        plain.zero_grad(set_to_none=False)
        loss(plain).backward()

    def per_sample() -> None:
        hooked.zero_grad(set_to_none=False)
        loss(hooked).backward()
        vgs.step()

    return Comparison(
        name=name,
        candidates=[
            Candidate("plain backward", backward, "baseline: forward + backward"),
            Candidate("gradstats per_sample", per_sample, "forward + backward + step"),
            floor,
        ],
        baseline="plain backward",
        check=False,
        device=DEVICE,
        params=params,
        settle=SETTLE,
        pairs=[("gradstats per_sample", floor.name)],
    )


def _per_sample_mlp(smoke: bool) -> Comparison:
    sizes, batch = ((32, 16, 16, 10), 8) if smoke else ((784, 512, 512, 10), 256)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=g).to(DEVICE)
    y = torch.randint(0, sizes[-1], (batch,), generator=g).to(DEVICE)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    floor = Candidate(
        "floor: row norms + grad norms",
        per_sample_floor(copy.deepcopy(model), loss, batch),
        "plain backward + ‖a_i‖, ‖b_i‖ per layer + one native ‖ĝ‖² pass",
    )
    comparison = _per_sample_cost(
        "scaling/per-sample-mlp", model, loss, floor, sizes=list(sizes), batch=batch
    )
    note = missing("backpack")
    if note is not None:
        return replace(comparison, unavailable={"BackPACK BatchL2Grad": note})
    peer = Candidate("BackPACK BatchL2Grad", backpack_batch_l2(copy.deepcopy(model), x, y),
                     "peer: its per-sample ‖g_i‖² + ‖ĝ‖²")  # fmt: skip
    return replace(comparison, candidates=[*comparison.candidates, peer])


def _per_sample_gpt2(smoke: bool) -> Comparison | Skipped:
    note = missing("transformers")
    if note is not None:
        return Skipped("scaling/per-sample-gpt2", note)
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    layers, width, heads, vocab, batch, length = (
        (1, 16, 2, 64, 2, 16) if smoke else (4, 128, 4, 2048, 8, 128)
    )
    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=length,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(DEVICE)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        logits = m(ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    floor = Candidate(
        "floor (lower bound)",
        sequence_floor(copy.deepcopy(model), loss),
        "per-sequence weight products + ‖ĝ‖²; norms of biases, LN, embeddings left out",
    )
    comparison = _per_sample_cost(
        "scaling/per-sample-gpt2", model, loss, floor, n_layer=layers, n_embd=width,
        vocab_size=vocab, batch=batch, length=length, tied_embeddings=True,
    )  # fmt: skip
    complete = Candidate(
        "floor (complete)",
        complete_sequence_floor(copy.deepcopy(model), loss),
        "the lower bound + the per-sequence norms it leaves out, written by hand (exact)",
    )
    return replace(
        comparison,
        candidates=[*comparison.candidates, complete],
        pairs=[*comparison.pairs, ("gradstats per_sample", complete.name)],
    )


def comparisons(smoke: bool) -> list[Comparison | Skipped]:
    """The suite's comparisons (``smoke``: tiny sizes)."""
    return [
        *_step_cost(smoke),
        _same_numbers(smoke),
        _per_sample_mlp(smoke),
        _per_sample_gpt2(smoke),
    ]
