"""Fisher information: gradstats vs a plain backward and the per-sample libraries, side by side.

* ``fisher/mlp_ef``: per-sample empirical Fisher diagonal Σ_i g_i² of an MLP 784-512-512-10,
  batch 256, float32, CPU. Baseline: a plain forward + backward of the summed loss (what any
  training step costs). Candidates: gradstats (EF only; and with its defaults: mean gradient +
  channel groups), BackPACK ``SumGradSquared``, ``torch.func.vmap(grad)``, Opacus
  ``GradSampleModule``. Peak memory per call.
* ``fisher/mlp_ef_same_numbers``: the same per-sample candidates, checked against
  ``vmap(grad)`` (ratios relative to gradstats: how many times slower each peer is).
* ``fisher/lm_sequence``: per-sequence empirical Fisher of a small causal transformer LM (GPT-2
  architecture with tied input/output embeddings, 4 layers, width 128, vocabulary 2048,
  8 × 128 tokens) vs a plain forward + backward; peak memory.
* ``fisher/lm_same_numbers``: gradstats against a loop of one backward per sequence.

Goals (DESIGN.md): MLP ≤ 2.0× a plain backward, ≥ 4× faster than BackPACK, ≥ 20× faster than
vmap; LM ≤ 3× a plain backward. The BackPACK goal cannot be met by any exact method: for Linear
layers BackPACK's ``SumGradSquared`` forms the same (b²)ᵀ(a²) product, after a full backward
(≈ 1.6× a plain backward here), and gradstats still needs the forward and the activation
gradients (≈ 2/3 of a plain backward) plus that product; measured: 1.3× faster.

Optional: BackPACK and Opacus (peers) and ``transformers`` (the ``hf`` extra, for the LM
cases). A missing one removes its candidate, or skips the LM comparisons, with a note.

Run: ``gradstats bench fisher`` (``--smoke`` for tiny sizes).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from gradstats.bench._harness import SETTLE, Candidate, Comparison
from gradstats.bench._optional import Skipped, missing
from gradstats.bench.suites._fisher_floors import (
    count_ops,
    ef_checked_floor,
    ef_floor,
    ef_groups_floor,
    floor_same_numbers,
)
from gradstats.fisher import FisherCollector

__all__ = ["comparisons"]

LM_CASES = ("fisher/lm_sequence", "fisher/lm_sequence_t256", "fisher/lm_same_numbers")


def _mlp(smoke: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, object]]:
    sizes = (32, 16, 16, 10) if smoke else (784, 512, 512, 10)
    batch = 16 if smoke else 256
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (batch,), generator=g)
    return model, x, y, {"sizes": list(sizes), "batch": batch, "dtype": "float32"}


def _plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    params = list(model.parameters())

    def run():
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        return torch.autograd.grad(loss, params)

    return run


def _ours(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    read: bool = False,
    *,
    ef_only: bool = False,
) -> Callable[[], object]:
    """One ``collect()`` (what a user's loop pays per batch); ``read``: from a fresh state, and
    return Σ_i g_i² for the agreement check."""
    fc = FisherCollector(
        model, "empirical", "classification", signal=not ef_only, groups=_groups(ef_only)
    )

    def run() -> object:
        if not read:
            fc.collect(x, y)
            return None
        fc.reset().collect(x, y)
        return fc.fisher("none")

    return run


def _groups(ef_only: bool) -> str | None:
    """EF only: no groups (and no mean gradient); else the collector's default groups."""
    return None if ef_only else "auto"


def _peers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[Candidate], dict[str, str]]:
    """The per-sample peers available here, as (candidates, unavailable)."""
    names = [n for n, _ in model.named_parameters()]
    candidates: list[Candidate] = []
    unavailable: dict[str, str] = {}
    note = missing("backpack")
    if note is not None:
        unavailable["BackPACK SumGradSquared"] = note
    else:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        bp_model = extend(_clone(model))
        bp_loss = extend(nn.CrossEntropyLoss(reduction="sum"))

        def backpack_sgs():
            bp_model.zero_grad(set_to_none=True)
            loss = bp_loss(bp_model(x), y)
            with backpack(SumGradSquared()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss.backward()
            return {n: p.sum_grad_squared for n, p in bp_model.named_parameters()}

        candidates.append(Candidate("BackPACK SumGradSquared", backpack_sgs, "hooks + extension"))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))

    def vmap_grad():
        grads = per_sample(params, x, y)
        return {n: grads[n].square().sum(0) for n in names}

    candidates.append(Candidate("torch.func vmap(grad)", vmap_grad, "materialises [B, P]"))
    note = missing("opacus")
    if note is not None:
        unavailable["Opacus GradSampleModule"] = note
    else:
        from opacus import GradSampleModule

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(_clone(model), loss_reduction="sum")

        def opacus():
            gsm.zero_grad(set_to_none=True)
            for p in gsm.parameters():
                p.grad_sample = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "full backward hook ... no inputs require grad"
                nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
            return {
                n: p.grad_sample.square().sum(0)
                for n, p in zip(names, gsm.parameters(), strict=True)
            }

        candidates.append(Candidate("Opacus GradSampleModule", opacus, "materialises [B, P]"))
    return candidates, unavailable


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def _mlp_comparisons(smoke: bool) -> list[Comparison]:
    model, x, y, params = _mlp(smoke)
    peers, unavailable = _peers(model, x, y)
    out = []
    for batch in (8, 16) if smoke else (32, 256):
        out.append(_mlp_cost(model, x[:batch], y[:batch], params | {"batch": batch}, smoke))
    checked = Candidate(
        "gradstats (EF only)", _ours(model, x, y, read=True, ef_only=True), "fresh state + read"
    )
    same = Comparison(
        name="fisher/mlp_ef_same_numbers",
        candidates=[checked, *peers, Candidate("floor: EF", _floor_read(model, x, y), "")],
        baseline="gradstats (EF only)",
        reference="torch.func vmap(grad)",
        rtol=1e-4,  # float32: GEMM-on-squares vs per-sample squares sum in another order
        atol=1e-7,
        params=params,
        unavailable=unavailable,
    )
    return [*out, same, floor_same_numbers(model, x, y, params)]


def _mlp_cost(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: dict[str, object], smoke: bool
) -> Comparison:
    """Every candidate at one batch size, as ratios to a plain backward; ops per call."""
    peers, unavailable = _peers(model, x, y)
    ours = [
        Candidate("plain backward", _plain(model, x, y), "baseline: loss.backward()"),
        Candidate("gradstats (defaults)", _ours(model, x, y), "+ mean gradient + channel groups"),
        Candidate(
            "gradstats (EF only)", _ours(model, x, y, ef_only=True), "signal=False, groups=None"
        ),
        Candidate("floor: EF", ef_floor(_clone(model), x, y), "activation grads + (b²)ᵀ(a²)"),
        Candidate(
            "floor: EF + checks",
            ef_checked_floor(_clone(model), x, y),
            "+ target/finiteness checks, counts, float64 folds",
        ),
        Candidate(
            "floor: EF + mean gradient + channel groups",
            ef_groups_floor(_clone(model), x, y),
            "+ weight grads + group rows",
        ),
    ]
    ops = {c.name: count_ops(c.fn) for c in ours}
    ours = [replace(c, note=f"{c.note}; {ops[c.name]} ops/call") for c in ours]
    return Comparison(
        name="fisher/mlp_ef" if x.shape[0] == (16 if smoke else 256) else "fisher/mlp_ef_b32",
        candidates=[*ours, *peers],
        baseline="plain backward",
        check=False,
        memory=True,
        work=x.shape[0],
        work_unit="samples",
        params=params | {"ops_per_call": ops},
        unavailable=unavailable,
        settle=SETTLE,
        pairs=[
            ("gradstats (EF only)", "floor: EF"),
            ("gradstats (EF only)", "floor: EF + checks"),
            ("gradstats (defaults)", "floor: EF + mean gradient + channel groups"),
        ],
    )


def _floor_read(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """The EF floor on a fresh copy: {name: Σ_i g_i²} (the floors only add)."""
    names = [n for n, _ in model.named_parameters()]

    def run() -> object:
        sq = ef_floor(_clone(model), x, y)()["sq"]  # type: ignore[index]
        order = names[0::2] + names[1::2]  # weights, then biases
        return dict(zip(order, sq, strict=True))

    return run


def _lm(smoke: bool, long: bool = False) -> tuple[nn.Module, torch.Tensor, dict[str, object]]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    if smoke:
        layers, width, heads, vocab, positions, batch, length = 1, 16, 2, 64, 16, 2, 16
    else:
        layers, width, heads, vocab, positions, batch, length = 4, 128, 4, 2048, 128, 8, 128
    if long:  # the same model on sequences twice as long
        positions, length = 2 * positions, 2 * length
    sizes = {
        "n_layer": layers,
        "n_embd": width,
        "n_head": heads,
        "vocab_size": vocab,
        "n_positions": positions,
    }
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=positions,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))
    params: dict[str, object] = {**sizes, "batch": batch, "length": length}
    return model, ids, params | {"tied_embeddings": True}


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits[:, :-1]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )


def _lm_comparisons(smoke: bool) -> list[Comparison | Skipped]:
    note = missing("transformers")
    if note is not None:
        return [Skipped(name, note) for name in LM_CASES]
    out: list[Comparison | Skipped] = []
    for long in (False, True):
        model, ids, params = _lm(smoke, long)
        ours = _lm_candidates(model, ids, defaults=not long)
        ops = {c.name: count_ops(c.fn) for c in ours if "loop" not in c.name}
        ours = [
            replace(c, note=f"{c.note}; {ops[c.name]} ops/call") if c.name in ops else c
            for c in ours
        ]
        out.append(
            Comparison(
                name=LM_CASES[1] if long else LM_CASES[0],
                candidates=ours,
                baseline="plain backward",
                check=False,
                memory=True,
                work=ids.numel(),
                work_unit="tokens",
                params=params | {"ops_per_call": ops},
                settle=SETTLE,
            )
        )
    model, ids, params = _lm(smoke)
    checked = Candidate("gradstats (EF only)", _lm_ours(model, ids, True, True), "read")
    loop = next(c for c in _lm_candidates(model, ids, False) if "loop" in c.name)
    same = Comparison(
        name=LM_CASES[2],
        candidates=[checked, loop],
        baseline="gradstats (EF only)",
        reference="loop over sequences",
        rtol=1e-4,  # float32 reductions in another order
        atol=1e-7,
        params=params,
    )
    return [*out, same]


def _lm_ours(
    model: nn.Module, ids: torch.Tensor, read: bool, ef_only: bool
) -> Callable[[], object]:
    fc = FisherCollector(
        model, "empirical", "causal_lm", signal=not ef_only, groups=_groups(ef_only)
    )

    def run() -> object:
        if not read:
            fc.collect(ids)
            return None
        fc.reset().collect(ids)
        return fc.fisher("none")

    return run


def _lm_candidates(model: nn.Module, ids: torch.Tensor, defaults: bool) -> list[Candidate]:
    weights = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def plain():
        return torch.autograd.grad(_lm_loss(model, ids), weights)

    def loop():
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for i in range(ids.shape[0]):
            grads = torch.autograd.grad(_lm_loss(model, ids[i : i + 1]), weights)
            for n, g in zip(names, grads, strict=True):
                total[n] += g.square()
        return total

    out = [
        Candidate("plain backward", plain, "baseline: loss.backward()"),
        Candidate("gradstats (EF only)", _lm_ours(model, ids, False, True), "per sequence"),
    ]
    if defaults:
        out.append(
            Candidate(
                "gradstats (defaults)",
                _lm_ours(model, ids, False, False),
                "+ mean gradient + head/neuron groups",
            )
        )
    return [*out, Candidate("loop over sequences", loop, "B backward passes")]


def comparisons(smoke: bool) -> list[Comparison | Skipped]:
    """The suite: the MLP comparisons, then the LM ones (skipped without ``transformers``)."""
    return [*_mlp_comparisons(smoke), *_lm_comparisons(smoke)]
