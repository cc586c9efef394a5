r"""Cost floors of the ``per_sample`` statistic: the least work beyond a plain backward.

:func:`sequence_floor` is the same for sequence models (a lower bound; see its docstring), and
:func:`complete_sequence_floor` the same with every parameter's per-sequence norm (exact).

:func:`per_sample_floor` — a plain forward + backward of an MLP of ``nn.Linear`` layers on
[B, d] rows, plus exactly what the per-example noise needs and nothing a library adds: per
layer ‖a_i‖ and ‖b_i‖ (two row norms, written into one buffer from a hook on the layer output),
then Σ_i ‖a_i‖²‖b_i‖² (weights) and Σ_i ‖b_i‖² (biases) of every layer in three ops, and ‖ĝ‖²
of every ``.grad`` in one native pass (float64 sums). No finiteness handling, no statistics,
no bookkeeping: what ``statistic="per_sample"`` costs beyond it is the price of its structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from gradstats.fisher._handler import is_hf_conv1d
from gradstats.scaling._kernels import squared_norms
from gradstats.scaling._per_sample_norms import Index, norm_sum

__all__ = ["complete_sequence_floor", "per_sample_floor", "sequence_floor"]


def per_sample_floor(
    model: nn.Module, loss: Callable[[nn.Module], torch.Tensor], batch: int
) -> Callable[[], object]:
    """One step of the floor (``model`` is hooked: pass a copy); returns the sums."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    params = list(model.parameters())
    rows = torch.empty(3, len(linears), batch, dtype=params[0].dtype, device=params[0].device)
    seen = [0]

    def forward_hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        k, x = seen[0], args[0].detach()
        seen[0] += 1

        def on_grad(grad: torch.Tensor) -> None:
            torch.linalg.vector_norm(grad, dim=1, out=rows[1, k])
            torch.linalg.vector_norm(x, dim=1, out=rows[2, k])

        output.register_hook(on_grad)

    for module in linears:
        module.register_forward_hook(forward_hook)

    def run() -> object:
        seen[0] = 0
        model.zero_grad(set_to_none=False)
        loss(model).backward()
        torch.mul(rows[2], rows[1], out=rows[0])  # ‖a_i‖‖b_i‖
        sums = torch.linalg.vector_norm(rows[:2], dim=2, dtype=torch.float64).square()
        return sums, squared_norms([p.grad for p in params if p.grad is not None])

    return run


def sequence_floor(
    model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]
) -> Callable[[], object]:
    """A lower bound of ``per_sample``'s cost on a causal LM (``model`` is hooked: pass a copy).

    One forward; one ``torch.autograd.grad`` for the outputs of every 2-D weight layer (Hugging
    Face ``Conv1D``, ``nn.Linear``) and of every embedding whose weight such a layer shares
    (tied lm_head), and for the remaining parameters (norms, position embeddings) — so no
    weight-gradient GEMM of those layers runs; per layer the per-sequence weight gradients
    c_i = Σ_t a_t b_tᵀ by one batched matmul [B, d_in, d_out], their sum (ĝ of the weight) and
    ‖c‖ over the sequences; biases Σ_{i,t} b_it, a tied embedding's rows by ``index_add``; then
    ‖ĝ‖² of every parameter in one native pass. It leaves out what ``per_sample`` also computes
    (the per-sequence norms of biases, norms, embeddings and the tied weight's cross term), so
    it is cheaper than any exact implementation: the ratio ``per_sample`` ÷ this floor bounds
    from below what the library adds. Returns (‖c‖ per layer call, ‖ĝ‖², ĝ in
    ``model.parameters()`` order)."""
    sites = [m for m in model.modules() if is_hf_conv1d(m) or type(m) is nn.Linear]
    shared = {id(m.weight) for m in sites}
    tied = [m for m in model.modules() if type(m) is nn.Embedding and id(m.weight) in shared]
    grown = shared | {id(m.bias) for m in sites if m.bias is not None}
    grown |= {id(m.weight) for m in tied}
    others: list[torch.Tensor] = [p for p in model.parameters() if id(p) not in grown]
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    for module in [*sites, *tied]:
        module.register_forward_hook(lambda m, args, out: calls.append((m, args[0].detach(), out)))

    def run() -> object:
        calls.clear()
        objective = loss(model)
        wanted: list[torch.Tensor] = [out for _, _, out in calls]
        found = torch.autograd.grad(objective, wanted + others)
        grads = {id(p): g for p, g in zip(others, found[len(calls) :], strict=True)}
        norms = []
        for (module, x, _), b in zip(calls, found[: len(calls)], strict=True):
            weight = module.get_parameter("weight")
            if type(module) is nn.Embedding:
                _add(grads, weight, _embedding_grad(weight, x, b))
                continue
            b = b.reshape(b.shape[0], -1, b.shape[-1])
            per_unit = _products(module, x, b, grads)
            norms.append(torch.linalg.vector_norm(per_unit))
            if module.bias is not None:
                _add(grads, module.get_parameter("bias"), b.sum((0, 1)))
        total = [grads[id(p)] for p in model.parameters()]
        return torch.stack(norms), squared_norms(total), total

    return run


_NORM_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm)


def complete_sequence_floor(
    model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]
) -> Callable[[], object]:
    """:func:`sequence_floor` with nothing left out: Σ_i ‖c_i‖² of *every* parameter of a causal
    LM built of Hugging Face ``Conv1D``, ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``
    (``model`` is hooked: pass a copy), each module called once per forward.

    One forward; one ``torch.autograd.grad`` for the outputs of every such module (a batch-1
    output, such as GPT-2's position embeddings, is expanded to the batch first), so autograd
    forms no parameter gradient. Then per call, written as tightly as it goes:

    * Linear/Conv1D weight: c_i = Σ_t a_t b_tᵀ by one batched matmul, ĝ = Σ_i c_i, ‖c‖²;
      bias: rows Σ_t b_t, their sum and ‖·‖²;
    * LayerNorm: x̂ = (y − β)/γ from its own output (γ ≠ 0), rows Σ_t b_t ⊙ x̂_t and Σ_t b_t;
    * Embedding: ĝ by ``index_add``; Σ_i ‖c_i‖² with equal ids of a sequence summed first (one
      sort and segment sum, the library's own identity: half the time of a masked [T, T] Gram
      matrix per sequence at 8×128, width 128);
    * a weight shared by a Linear and an Embedding (tied lm_head): the cross term
      2 Σ_i Σ_t ⟨c_i^lm[x_t], b_t⟩ by one gather from the Linear's products;

    then ‖ĝ‖² of every parameter in one native pass, and ĝ accumulated into ``.grad`` (zeroed
    first, as the timed candidates do: a user's optimizer needs it, and :func:`sequence_floor`
    skips it). Returns (Σ_i ‖c_i‖², ‖ĝ‖², ĝ), each in ``model.parameters()`` order (float64
    norms). A model with other parameters, or a weight shared otherwise, is a ValueError."""
    # (a LayerNorm without affine parameters has nothing to compute)
    typed = [m for m in model.modules() if is_hf_conv1d(m) or type(m) in _NORM_TYPES]
    modules = [m for m in typed if isinstance(getattr(m, "weight", None), nn.Parameter)]
    owners: dict[int, list[nn.Module]] = {}
    for module in modules:
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    params = list(model.parameters())
    for param in params:
        kinds = sorted(type(m).__name__ for m in owners.get(id(param), []))
        if kinds not in (["Conv1D"], ["Linear"], ["Embedding"], ["LayerNorm"],
                         ["Embedding", "Linear"]):  # fmt: skip
            raise ValueError(f"complete_sequence_floor: a parameter owned by {kinds or 'none'}")
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        x, batch = args[0].detach(), calls[0][2].shape[0] if calls else out.shape[0]
        if out.shape[0] == 1 and batch > 1:  # broadcast over the batch: per-sequence rows
            out, x = out.expand(batch, *out.shape[1:]), x.expand(batch, *x.shape[1:])
            calls.append((module, x, out))
            return out
        calls.append((module, x, out))
        return None

    for module in modules:
        module.register_forward_hook(record)

    def run() -> object:
        calls.clear()
        model.zero_grad(set_to_none=False)
        objective = loss(model)
        found = torch.autograd.grad(objective, [out for _, _, out in calls])
        grads: dict[int, torch.Tensor] = {}
        norms: dict[int, torch.Tensor] = {}
        dense: dict[int, torch.Tensor] = {}
        rows_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for (module, x, out), b in zip(calls, found, strict=True):
            b = b.reshape(b.shape[0], -1, b.shape[-1])  # [B, T, d_out]
            weight = module.get_parameter("weight")
            if type(module) is nn.Embedding:
                ids = x.reshape(x.shape[0], -1)
                _add(grads, weight, _embedding_grad(weight, ids, b))
                _add(norms, weight, norm_sum(Index(ids, b, weight.shape[0]), 0))
                rows_of[id(weight)] = (ids, b)
                continue
            bias = cast(torch.Tensor | None, module.bias)
            if type(module) is nn.LayerNorm:
                xhat = (out.detach() - (0.0 if bias is None else bias)) / weight
                scaled = (b * xhat.reshape(b.shape)).sum(1)  # [B, d]
                _add(grads, weight, scaled.sum(0).view(weight.shape))
                _add(norms, weight, scaled.square().sum().double())
            else:
                per_unit = _products(module, x, b, grads)
                _add(norms, weight, torch.linalg.vector_norm(per_unit).double().square())
                dense[id(weight)] = per_unit
            if bias is not None:
                summed_rows = b.sum(1)  # [B, d_out]
                _add(grads, bias, summed_rows.sum(0).view(bias.shape))
                _add(norms, bias, summed_rows.square().sum().double())
        for key in dense.keys() & rows_of.keys():  # tied: + 2 Σ_i ⟨c_i^lm, c_i^emb⟩
            ids, b = rows_of[key]
            per_unit = dense[key]  # [B, d, V]: c_i^lm transposed
            picked = per_unit.gather(2, ids.unsqueeze(1).expand(-1, per_unit.shape[1], -1))
            norms[key] = norms[key] + 2.0 * (picked * b.transpose(1, 2)).sum().double()
        total = [grads[id(p)] for p in params]
        torch._foreach_add_([cast(torch.Tensor, p.grad) for p in params], total)
        return torch.stack([norms[id(p)] for p in params]), squared_norms(total), total

    return run


def _products(
    module: nn.Module, x: torch.Tensor, b: torch.Tensor, grads: dict[int, torch.Tensor]
) -> torch.Tensor:
    """The per-sequence products c_i = Σ_t a_t b_tᵀ [B, d_in, d_out] of a Linear/Conv1D call
    (input x, output gradient b [B, T, d_out]) by one batched matmul; their sum goes to
    ``grads`` in the weight's layout."""
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    per_unit = torch.bmm(a.transpose(1, 2), b)
    summed = per_unit.sum(0)
    _add(grads, module.get_parameter("weight"), summed if is_hf_conv1d(module) else summed.T)
    return per_unit


def _embedding_grad(weight: torch.Tensor, ids: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ĝ of an embedding weight: the output gradient rows b added at their ids."""
    return torch.zeros_like(weight).index_add_(0, ids.reshape(-1), b.reshape(-1, b.shape[-1]))


def _add(grads: dict[int, torch.Tensor], param: torch.Tensor, value: torch.Tensor) -> None:
    key = id(param)
    grads[key] = value if key not in grads else grads[key] + value
