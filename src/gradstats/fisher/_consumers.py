r"""Consumers: what people collect a Fisher for. Every one takes a
:class:`~gradstats.fisher.FisherResult` or a collector (live or loaded) and checks kind, unit and
shapes.

* :func:`importance_ranking` — groups sorted by ``trace`` or ``mask`` Fisher.
* :func:`pruning_masks` — structured masks (heads, channels, FFN neurons) removing the least
  important groups under a budget (Michel et al. 2019; Kwon et al. 2022 use the ``mask`` Fisher).
* :func:`ewc_penalty` — elementwise EWC (Kirkpatrick et al. 2017):
  (λ/2) Σ_j F_jj (θ_j − θ*_j)², with F the per-sample Fisher of the old task.
* :func:`fisher_merge` — Fisher merging (Matena & Raffel 2022): θ*_j = Σ_m λ_m F̃_mj θ_mj /
  Σ_m λ_m F̃_mj with F̃ = max(F, floor), so coordinates no model has information about fall back
  to the λ-weighted average.
* :func:`task_overlap` — Fisher overlap of two tasks (Kirkpatrick et al. 2017): with F̂ = F/tr F,
  1 − ½‖F̂_a^{1/2} − F̂_b^{1/2}‖² = Σ_j sqrt(F̂_aj F̂_bj) ∈ [0, 1], globally and per parameter.
* :func:`gradient_conflicts` — cosines between per-sample gradients of two batches, labelled by
  the callers' true sample ids.

A Fisher of ``kind="batch_grad_sq"`` (the mistaken squared mini-batch gradient) is refused
everywhere: it depends on the batch size and is not a Fisher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gradstats._validation import check_choice
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._reads import FisherReads
from gradstats.fisher._result import FisherResult, as_result

__all__ = [
    "ewc_penalty",
    "fisher_merge",
    "gradient_conflicts",
    "importance_ranking",
    "pruning_masks",
    "task_overlap",
]

FISHER_KINDS = ("empirical", "mc", "exact")
Fisher = FisherResult | FisherReads  # a result, or a collector (live or loaded)
STRUCTURES = {"heads": ("heads",), "channels": ("channel",), "neurons": ("neurons",)}


def _check(
    fisher: object, what: str, kinds=FISHER_KINDS, units=("sample", "token")
) -> FisherResult:
    """The result of ``fisher`` (a collector or a result), after checking its kind and unit."""
    fisher = as_result(fisher, what)
    if fisher.kind not in kinds:
        extra = "" if fisher.estimand.is_fisher else " (the mistaken squared mini-batch gradient)"
        raise ConfigurationError(
            f"{what} has kind={fisher.kind!r}{extra}; this consumer needs one of {', '.join(kinds)}"
        )
    if fisher.unit not in units:
        raise ConfigurationError(
            f"{what} has unit={fisher.unit!r}; this consumer needs unit in {units}"
        )
    return fisher


def _same(fishers: Sequence[FisherResult], what: str) -> None:
    first = fishers[0]
    for index, other in enumerate(fishers[1:], start=1):
        for key in ("kind", "unit"):
            if getattr(other, key) != getattr(first, key):
                raise ConfigurationError(
                    f"{what}[{index}] has {key}={getattr(other, key)!r} but {what}[0] has "
                    f"{getattr(first, key)!r}; Fishers of different {key}s are not comparable"
                )
        if other.shapes != first.shapes:
            raise ConfigurationError(
                f"{what}[{index}] covers other parameters or shapes than {what}[0]"
            )


def importance_ranking(
    fisher: Fisher,
    kind: str = "mask",
    *,
    families: Sequence[str] | None = None,
    structure: str | None = None,
) -> list[tuple[str, float]]:
    """[(group name, value)] sorted from most to least important (host read).

    Which groups are ranked: ``families`` (names), else the families of ``structure``
    (``"heads"``, ``"neurons"`` or ``"channels"``), else — by default — the attention heads
    when the group map has any, and every family otherwise. Values of different structures
    are not comparable: the mask value of a LayerNorm is the Fisher of scaling the whole
    residual stream and dwarfs any head's, so a ranking over everything put the norms first.
    """
    fisher = _check(fisher, "fisher")
    if families is not None and structure is not None:
        raise ConfigurationError("pass families= or structure=, not both")
    values = fisher.group_fisher(kind)
    names = fisher.group_names()
    if structure is not None:
        check_choice("structure", structure, STRUCTURES)
        families = [f.name for f in fisher.families if f.kind in STRUCTURES[structure]]
        families = [f for f in families if f in values]
        if not families:
            raise ConfigurationError(f"the collector's group map has no {structure!r} families")
    elif families is None:
        heads = [f.name for f in fisher.families if f.kind == "heads" and f.name in values]
        families = heads or None
    chosen = list(values) if families is None else list(families)
    rows = []
    for fam in chosen:
        if fam not in values:
            raise ConfigurationError(f"families: no {kind!r} values for family {fam!r}")
        rows += list(zip(names[fam], values[fam].tolist(), strict=True))  # sync-ok: a report
    return sorted(rows, key=lambda row: -row[1])


def pruning_masks(
    fisher: Fisher,
    budget: float | int,
    *,
    structure: str = "heads",
    kind: str = "mask",
    scope: str = "global",
    min_keep: int = 1,
) -> dict[str, torch.Tensor]:
    """{family: bool [G]} (True = keep) pruning the least important groups of ``structure``.

    ``budget``: a fraction in (0, 1) of the groups to remove, or an int number of groups.
    ``scope="global"`` ranks all families' groups together; ``"layer"`` removes the same
    fraction from each family (largest-remainder rounding, so the families' counts add up to
    the budget exactly). Every family keeps at least ``min_keep`` groups.
    """
    fisher = _check(fisher, "fisher")
    check_choice("structure", structure, STRUCTURES)
    check_choice("scope", scope, ("global", "layer"))
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ConfigurationError(f"min_keep must be a non-negative int; got {min_keep!r}")
    fams = [f for f in fisher.families if f.kind in STRUCTURES[structure]]
    if not fams:
        raise ConfigurationError(f"the collector's group map has no {structure!r} families")
    values = fisher.group_fisher(kind)
    missing = [f.name for f in fams if f.name not in values]
    if missing:
        raise ConfigurationError(f"no {kind!r} values for {missing[0]!r} (no per-unit statistics)")
    total = sum(f.size for f in fams)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigurationTypeError(
            f"budget must be a fraction in (0, 1) or an int; got {type(budget).__name__}"
        )
    if isinstance(budget, float) and not 0.0 < budget < 1.0:
        raise ConfigurationError(f"budget as a fraction must lie in (0, 1); got {budget}")
    count = round(budget * total) if isinstance(budget, float) else budget
    if count < 0 or count > total - min_keep * len(fams):
        raise ConfigurationError(
            f"budget removes {count} of {total} groups but {min_keep} per family must stay"
        )
    masks = {f.name: torch.ones(f.size, dtype=torch.bool) for f in fams}
    if scope == "layer":
        counts = _layer_counts([f.size for f in fams], count, min_keep)
        for f, remove in zip(fams, counts, strict=True):
            order = values[f.name].cpu().argsort()
            masks[f.name][order[:remove]] = False
        return masks
    scores = torch.cat([values[f.name].cpu() for f in fams])
    owner = torch.cat([torch.full((f.size,), i) for i, f in enumerate(fams)])
    index = torch.cat([torch.arange(f.size) for f in fams])
    kept = {f.name: f.size for f in fams}
    removed = 0
    for j in scores.argsort().tolist():
        if removed == count:
            break
        fam = fams[int(owner[j])]
        if kept[fam.name] > min_keep:
            masks[fam.name][index[j]] = False
            kept[fam.name] -= 1
            removed += 1
    return masks


def _layer_counts(sizes: list[int], count: int, min_keep: int) -> list[int]:
    """Groups to remove per family: ``count`` shared in proportion to the sizes by the largest
    remainder method (exact integer quotas count·size/total), never more than size − min_keep
    per family; the counts always sum to ``count`` (the caller checked it fits)."""
    total = sum(sizes)
    caps = [max(0, size - min_keep) for size in sizes]
    quotas = [count * size for size in sizes]  # in units of 1/total
    counts = [min(q // total, cap) for q, cap in zip(quotas, caps, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] % total), i))
    left = count - sum(counts)
    while left > 0:  # caps may bind: go round again in the same order
        for i in order:
            if left > 0 and counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
    return counts


def ewc_penalty(
    fisher: Fisher,
    params: Mapping[str, torch.Tensor] | nn.Module,
    anchor: Mapping[str, torch.Tensor],
    *,
    strength: float = 1.0,
    units: Sequence[str] = ("sample",),
) -> torch.Tensor:
    """(λ/2) Σ_j F_jj (θ_j − θ*_j)² over the Fisher's parameters (differentiable in θ).

    ``params``: the current parameters (a module or a name -> tensor mapping); ``anchor``: θ*
    after the old task. The Fisher must be a per-sample Fisher (``units``) of kind empirical,
    mc or exact.
    """
    fisher = _check(fisher, "fisher", units=tuple(units))
    current = dict(params.named_parameters()) if isinstance(params, nn.Module) else dict(params)
    values = fisher.fisher()
    terms: list[torch.Tensor] = []
    for name, f in values.items():
        if name not in current or name not in anchor:
            raise ConfigurationError(
                f"parameter {name!r} of the Fisher is missing from params or anchor"
            )
        theta, star = current[name], anchor[name]
        if theta.shape != f.shape or star.shape != f.shape:
            raise ConfigurationError(
                f"{name}: Fisher shape {tuple(f.shape)}, params {tuple(theta.shape)}, anchor "
                f"{tuple(star.shape)} must agree"
            )
        terms.append((f.to(theta.dtype) * (theta - star.detach().to(theta.dtype)).square()).sum())
    return 0.5 * strength * torch.stack(terms).sum()


def fisher_merge(
    params: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Fisher],
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """Elementwise Fisher-weighted average of several models' parameters (see module doc)."""
    if len(params) != len(fishers) or len(params) < 2:
        raise ConfigurationError(
            "fisher_merge needs as many Fishers as parameter sets, at least two"
        )
    results = [_check(one, f"fishers[{index}]") for index, one in enumerate(fishers)]
    _same(results, "fishers")
    weights = [1.0] * len(params) if weights is None else list(weights)
    if len(weights) != len(params) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigurationError("weights must be one non-negative number per model, not all zero")
    if not floor > 0:
        raise ConfigurationError(f"floor must be positive; got {floor}")
    values = [f.fisher(dtype=torch.float64) for f in results]
    merged = {}
    for name in values[0]:
        numerator: list[torch.Tensor] = []
        denominator: list[torch.Tensor] = []
        for lam, theta, fisher in zip(weights, params, values, strict=True):
            if name not in theta or theta[name].shape != fisher[name].shape:
                raise ConfigurationError(
                    f"{name}: missing or of the wrong shape in a parameter set"
                )
            weighted = fisher[name].to(theta[name].device).clamp(min=floor) * lam
            numerator.append(weighted * theta[name].detach().double())
            denominator.append(weighted)
        total = torch.stack(numerator).sum(0) / torch.stack(denominator).sum(0)
        merged[name] = total.to(params[0][name].dtype)
    return merged


def task_overlap(fisher_a: Fisher, fisher_b: Fisher) -> dict[str, object]:
    """Fisher overlap Σ sqrt(F̂_a F̂_b) (F̂ = F / tr F), globally and per parameter, plus the
    cosine of the two Fisher vectors (host reads)."""
    fisher_a, fisher_b = _check(fisher_a, "fisher_a"), _check(fisher_b, "fisher_b")
    _same([fisher_a, fisher_b], "fishers")
    fa, fb = fisher_a.fisher(dtype=torch.float64), fisher_b.fisher(dtype=torch.float64)

    def overlap(x: torch.Tensor, y: torch.Tensor) -> float:
        sx, sy = x.sum(), y.sum()
        if sx <= 0 or sy <= 0:
            return float("nan")
        return float((x / sx * y / sy).clamp(min=0).sqrt().sum())  # sync-ok: a report

    flat_a = torch.cat([fa[n].reshape(-1) for n in fa])
    flat_b = torch.cat([fb[n].reshape(-1).to(flat_a.device) for n in fa])
    cosine = float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))  # sync-ok: a report
    return {
        "overlap": overlap(flat_a, flat_b),
        "cosine": cosine,
        "per_parameter": {n: overlap(fa[n], fb[n].to(fa[n].device)) for n in fa},
    }


def gradient_conflicts(
    per_sample_a: Mapping[str, torch.Tensor],
    per_sample_b: Mapping[str, torch.Tensor],
    ids_a: Sequence[object],
    ids_b: Sequence[object],
) -> dict[str, object]:
    """Cosines between per-sample gradients of two tasks ({name: [N, *shape]} each, e.g. from
    :func:`gradstats.testing.per_sample_gradients`), with rows labelled by the *true* sample ids
    (the ids must come with the gradients; they are never re-derived from positions).

    Returns ``cosine`` [N_a, N_b], ``ids_a``, ``ids_b`` and ``conflict_fraction`` (cos < 0).
    """
    if set(per_sample_a) != set(per_sample_b):
        raise ConfigurationError("per_sample_a and per_sample_b must cover the same parameters")
    names = sorted(per_sample_a)
    flat_a = torch.cat([per_sample_a[n].reshape(per_sample_a[n].shape[0], -1) for n in names], 1)
    flat_b = torch.cat([per_sample_b[n].reshape(per_sample_b[n].shape[0], -1) for n in names], 1)
    if len(ids_a) != flat_a.shape[0] or len(ids_b) != flat_b.shape[0]:
        raise ConfigurationError(
            f"ids: {len(ids_a)} and {len(ids_b)} ids for {flat_a.shape[0]} and {flat_b.shape[0]} "
            "per-sample gradients; every row needs its true sample id"
        )
    flat_a, flat_b = flat_a.double(), flat_b.double()
    norms = flat_a.norm(dim=1, keepdim=True) * flat_b.norm(dim=1).unsqueeze(0)
    cosine = torch.where(norms > 0, flat_a @ flat_b.T / norms.clamp(min=1e-300), 0.0)
    return {
        "cosine": cosine,
        "ids_a": list(ids_a),
        "ids_b": list(ids_b),
        "conflict_fraction": float((cosine < 0).double().mean()),  # sync-ok: a report
    }
