"""Data-parallel training under ``torch.distributed`` (``torchrun``): shards, one all-reduce.

Convention. Under a process group of W ranks, ``batch_size`` (``--batch-size``) is the batch of
*one rank*: every rank draws the same global batch of W·B windows from the shared data generator
(so generator states, and hence the checkpoint, are identical on every rank) and keeps the
contiguous rows ``r·B : (r+1)·B``. A single process with ``batch_size = W·B`` draws exactly the
same global batch. Force noise (``force_noise > 0``) is likewise drawn once for the global batch
and sliced, so a W-rank step equals the single-process step on the concatenated batch.

Reduction. Each rank estimates the gradient of its *token-summed* cross-entropy (as the
single-process trainer does); one flattened ``all_reduce(SUM)`` per step adds the ranks' sums
and the trainer divides by the W·B·T tokens of the global batch — the mean over the global
batch's tokens, equal to the single-process gradient up to the order of the summation. The same
buffer carries, per rank, a small diagnostics block (skip flag, loss sum, residual maxima, step
maxima, unconverged flags of each phase, penalty values), written at that rank's slot and zero
elsewhere, so after the SUM every rank holds every rank's diagnostics and takes the *same*
decision (skip if any rank's estimate failed; a phase is unconverged if it is on any rank;
residuals and steps are maxima over ranks). Bytes per step: 4 or 8 (float32/float64) times
``n_params · (1 + #penalties) + W · (7 + 4 + #penalties)``.

Stabiliser penalties (``jac_penalty`` etc.) are reduced separately from the task gradient —
task gradients summed, penalty gradients averaged (each is a batch mean) — and only then scaled
relative to the *global* task-gradient norm, as in the single-process trainer. The Hutchinson
probe vectors of the ``jacobian``/``asymmetry`` penalties are, like the force noise, drawn for
the global batch and sliced to this rank's rows, so every penalty — and the noise generator's
state — equals the single-process run draw for draw.
Solves stop per sample, so shards relax exactly like the concatenated batch — except a phase's
stall stop (``stall_checks``), which looks at the whole (local) batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from gradstats._torchrun import torchrun_process_group
from gradstats.eqprop._module import NoiseRealization
from gradstats.eqprop._penalties import (
    free_tolerance,
    global_norm,
    penalty_value,
    relative_scale,
)

__all__ = [
    "Group",
    "current_group",
    "draw_batch",
    "process_group_from_env",
    "rank_device",
    "reduce_backprop",
    "reduce_estimate",
    "reduce_reference",
    "reduce_sums",
    "shard_noise",
]

_MAX_PHASES = 4  # estimators report at most two non-BPTT phases (free + nudged/adjoint)
_HEAD = 7  # skipped, loss, res_free, steps_free, res_adjoint, steps_adjoint, phases


@dataclass(frozen=True)
class Group:
    """This process's place in the process group (``rank 0 of 1`` without one)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes files and shows a progress bar."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def current_group() -> Group:
    """The default process group if one is initialised, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def rank_device(device: str, group: Group) -> torch.device:
    """``cuda`` without an index means ``cuda:LOCAL_RANK`` under a process group."""
    out = torch.device(device)
    if group.active and out.type == "cuda" and out.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return out


@contextmanager
def process_group_from_env(device: str, timeout: float | None = None) -> Iterator[Group]:
    """:func:`gradstats._torchrun.torchrun_process_group` (``timeout``: seconds a collective
    waits for the other ranks), yielding this trainer's ``Group``."""
    with torchrun_process_group(device, timeout):
        yield current_group()


def draw_batch(corpus, split: str, batch_size: int, block_size: int, generator, group: Group):
    """This rank's rows of the global batch of ``world · batch_size`` windows."""
    x, y = corpus.batch(split, batch_size * group.world, block_size, generator=generator)
    if group.active:
        rows = slice(group.rank * batch_size, (group.rank + 1) * batch_size)
        x, y = x[rows], y[rows]
    return x, y


def shard_noise(model, x: torch.Tensor, generator, group: Group) -> NoiseRealization | None:
    """Force noise drawn for the global batch, this rank's rows (``None``: let the estimator
    draw it itself — single process, or a model without noise)."""
    if not group.active or not getattr(model, "force_noise", 0):
        return None
    param = next(model.parameters())
    batch, length = x.shape
    proxy = torch.empty((batch * group.world, length, model.d_model), dtype=param.dtype,
                        device=param.device)  # fmt: skip
    noise = model.sample_noise(proxy, generator)
    rows = slice(group.rank * batch, (group.rank + 1) * batch)
    return NoiseRealization({k: t[rows] for k, t in noise.tensors.items()}, noise.seed)


def reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """All-reduce (SUM) a few host numbers in float64 (evaluation)."""
    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.tolist()  # sync-ok: evaluation


def _all_reduce(parts: list[torch.Tensor], block: torch.Tensor, group: Group):
    """One SUM over ``parts`` (flattened) and the per-rank ``block`` ([world, k] slot)."""
    slots = block.new_zeros((group.world, block.numel()))
    slots[group.rank] = block
    flat = torch.cat([p.reshape(-1) for p in parts] + [slots.reshape(-1)])
    dist.all_reduce(flat)
    sizes = [p.numel() for p in parts] + [slots.numel()]
    *out, slots = flat.split(sizes)
    out = [o.view_as(p) for o, p in zip(out, parts, strict=True)]
    return out, slots.view(group.world, -1).tolist()  # sync-ok: the step's one read


def _penalty_order(cfg, weights=None) -> dict[str, float]:
    """The single-process trainer's order: the plain penalties, then ``jacobian``."""
    weights = cfg.penalties() if weights is None else weights
    order = [k for k in weights if k != "jacobian"] + [k for k in weights if k == "jacobian"]
    return {k: weights[k] for k in order}


def _jacobian(cfg) -> dict[str, Any]:
    """The ``jacobian`` penalty's norm settings (``penalty_value`` keywords)."""
    return {"norm": cfg.jac_norm, "iterations": cfg.power_iterations, "bound": cfg.jac_bound}


def _penalty_grads(model, cfg, est, x, generator, params, group: Group, weights=None):
    """Raw penalty values and gradients, in :func:`_penalty_order` (Hutchinson vectors drawn
    for the global batch, this rank's rows)."""
    out = {}
    for name in _penalty_order(cfg, weights):
        context = model.relaxation_map(cfg.step_size) if name == "jacobian" else nullcontext()
        with context:
            value = penalty_value(model, x, est.state, name, noise=est.noise,
                                  probes=cfg.penalty_probes, generator=generator,
                                  shard=(group.rank, group.world),
                                  tol=free_tolerance(est),
                                  **(_jacobian(cfg) if name == "jacobian" else {}))  # fmt: skip
            grads = torch.autograd.grad(value, params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        out[name] = (value.detach(), grads)
    return out


def reduce_estimate(model, cfg, est, x, generator, tokens: int, group: Group, weights=None):
    """All-reduce one rank's estimate: ``(global_estimate, record)``, the same on every rank.

    ``global_estimate`` is ``est`` with ``grads`` the global total divided by ``tokens`` (the
    global batch's), ``task_grads`` the global task-gradient *sum* (what the spot check
    compares), ``loss`` and ``penalties`` global; its ``stats`` stay local. ``record`` is the
    step's metrics record, ``{"skipped": True, ...}`` if any rank's estimate failed.
    ``weights``: the step's penalty weights (default ``cfg.penalties()``).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    weights = _penalty_order(cfg, weights)
    pens = (
        {}
        if est.skipped or not weights
        else _penalty_grads(model, cfg, est, x, generator, params, group, weights)
    )
    ref = params[0]
    zero = ref.new_zeros(())
    parts = [est.grads[n].detach() for n in names]
    for name in weights:
        grads = pens[name][1] if name in pens else [torch.zeros_like(p) for p in params]
        parts += [g.detach() / group.world for g in grads]  # batch means: averaged
    free = adj = None
    phases = []
    if not est.skipped:
        free = est.stats.get("free", est.stats.get("bptt"))
        adj = est.stats.get("nudged", est.stats.get("adjoint"))
        phases = [s for s in est.stats.values() if s.phase != "bptt"]
    if len(phases) > _MAX_PHASES:
        raise RuntimeError(f"{len(phases)} phases: the diagnostics block holds {_MAX_PHASES}")

    def stat(s, which):
        if s is None:
            return zero
        t = s.final_residual if which == "res" else s.steps
        return t.detach().max().to(ref.dtype)

    flags = [(~s.converged.all()).to(ref.dtype) for s in phases]
    flags += [zero] * (_MAX_PHASES - len(flags))
    head = [zero + est.skipped, zero if est.loss is None else est.loss.detach().to(ref.dtype)]
    head += [stat(free, "res"), stat(free, "steps"), stat(adj, "res"), stat(adj, "steps")]
    head += [zero + len(phases)]
    pen_values = [pens[k][0].to(ref.dtype) / group.world if k in pens else zero for k in weights]
    block = torch.stack(head + flags + pen_values)
    out, slots = _all_reduce(parts, block, group)
    failed = sum(row[0] > 0 for row in slots)
    if failed:
        reason = est.reason if est.skipped else f"the estimate failed on {failed} other rank(s)"
        return est, {"skipped": True, "reason": reason}
    n = len(names)
    task = dict(zip(names, out[:n], strict=True))
    total = {k: v.clone() for k, v in task.items()}
    task_norm = global_norm(task)
    record = {"skipped": False, "train_ce": sum(row[1] for row in slots) / tokens}
    record.update(_phase_fields(slots, free is not None, adj is not None, len(phases)))
    penalties = {}
    for i, (name, weight) in enumerate(weights.items()):
        grads = dict(zip(names, out[n * (i + 1) : n * (i + 2)], strict=True))
        scale = relative_scale(weight, task_norm, global_norm(grads))
        for k in total:
            total[k] = total[k] + scale * grads[k]
        value = sum(row[_HEAD + _MAX_PHASES + i] for row in slots)
        penalties[name] = {"value": torch.tensor(value), "scale": scale.detach()}
        record[f"penalty.{name}"] = [value, float(scale)]  # sync-ok: logging
    loss = torch.tensor(record["train_ce"] * tokens)
    grads = {k: v / tokens for k, v in total.items()}
    est = replace(est, grads=grads, task_grads=task, loss=loss, penalties=penalties)
    return est, record


def _phase_fields(slots, has_free: bool, has_adj: bool, phases: int) -> dict[str, object]:
    out: dict[str, object] = {}
    if has_free:
        out.update(res_free=max(r[2] for r in slots), steps_free=int(max(r[3] for r in slots)))
    if has_adj:
        out.update(
            res_adjoint=max(r[4] for r in slots), steps_adjoint=int(max(r[5] for r in slots))
        )
    out["phases"] = phases
    out["unconverged"] = sum(
        max(r[_HEAD + i] for r in slots) > 0 for i in range(min(phases, _MAX_PHASES))
    )
    return out


def reduce_backprop(model, loss: torch.Tensor, ok: bool, tokens: int, group: Group) -> dict:
    """All-reduce the ``.grad`` of ``(local loss sum) / tokens`` (written back); the record."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = [p.grad if ok and p.grad is not None else torch.zeros_like(p) for p in params]
    zero = params[0].new_zeros(())
    block = torch.stack([zero + (not ok), loss.detach().to(zero.dtype) if ok else zero])
    out, slots = _all_reduce(parts, block, group)
    failed = sum(row[0] > 0 for row in slots)
    if failed:
        return {"skipped": True, "reason": f"non-finite loss on {failed} rank(s)"}
    for p, g in zip(params, out, strict=True):
        p.grad = g
    return {"skipped": False, "train_ce": sum(row[1] for row in slots) / tokens}


def reduce_reference(model, ref, group: Group):
    """The spot check's implicit reference summed over ranks: ``(grads | None, res_adjoint)``."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    dtype = next(model.parameters()).dtype
    zero = ref.grads[names[0]].new_zeros((), dtype=dtype)
    res = zero if ref.skipped else ref.stats["adjoint"].final_residual.max().to(dtype)
    out, slots = _all_reduce([ref.grads[n] for n in names], torch.stack([zero + ref.skipped, res]),
                             group)  # fmt: skip
    if any(row[0] > 0 for row in slots):
        return None, None
    return dict(zip(names, out, strict=True)), max(row[1] for row in slots)
