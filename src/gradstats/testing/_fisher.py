r"""Obviously-correct references for ``gradstats.fisher``: loops over samples, labels, positions.

Each function computes from the definition, with one ``torch.autograd.grad`` call per sample,
per label (sequence) and per position; they are slow and meant for tiny models in float64.

* :func:`labelled_gradients` — for every sample i, the list of (weight w, gradient g) pairs whose
  weighted squares define the estimand: the data label (empirical); every class c with
  w = p_c (exact, softmax); every output o with g = ∂f_o/∂θ (exact, Gaussian σ² = 1, since
  E_ε[(Jᵀε)²] = Σ_o J_o²); every label *sequence* y ∈ V^(active targets) with
  w = Π_t p_t(y_t) (exact, causal LM — full enumeration, no independence argument used).
* :func:`reference_fisher` — F = (1/N) Σ_i Σ_(w,g) w g².
* :func:`reference_group_values` — per-sample trace Σ_{j∈k} Σ w g_j² and mask
  Σ w (Σ_{j∈mask(k)} θ_j g_j)² of one group family, and their means.
* :func:`positionwise_fisher` — ``unit="token"``: for each sample i and position s, the gradient
  that flows through the owning modules' outputs at (i, s) only (every other position of those
  outputs detached), squared and summed over positions with an active target.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "labelled_gradients",
    "per_sample_gradients",
    "positionwise_fisher",
    "reference_fisher",
    "reference_group_values",
]


Inputs = torch.Tensor | Mapping[str, Any] | Sequence[Any]
"""A model's input: a tensor, keyword arguments (a mapping) or positional arguments."""


class _Member(Protocol):
    @property
    def param(self) -> str: ...
    @property
    def axis(self) -> int: ...
    @property
    def assign(self) -> Sequence[int]: ...
    @property
    def in_mask(self) -> bool: ...


class _Family(Protocol):
    """What :func:`reference_group_values` reads of a ``gradstats.fisher`` group family."""

    @property
    def size(self) -> int: ...
    @property
    def members(self) -> Sequence[_Member]: ...


def _slice(inputs: Inputs, i: int) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[i : i + 1]
    if isinstance(inputs, Mapping):
        return {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return tuple(v[i : i + 1] if isinstance(v, torch.Tensor) else v for v in inputs)


def _call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        out = model(inputs)
    elif isinstance(inputs, Mapping):
        out = model(**inputs)
    else:
        out = model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out[0])
    if not isinstance(logits, torch.Tensor):
        raise ConfigurationTypeError(f"the model returned no logits tensor: {type(out).__name__}")
    return logits


def _labels(inputs: Inputs, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        source = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        if not isinstance(source, torch.Tensor):
            raise ConfigurationTypeError("causal_lm without targets needs input ids as a tensor")
        targets = source
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        targets = targets.masked_fill(inputs["attention_mask"] == 0, -100)
    return targets


def _targets(targets: torch.Tensor | None, likelihood: str) -> torch.Tensor:
    if targets is None:
        raise ConfigurationError(f"likelihood={likelihood!r} needs targets")
    return targets


def _grads(value: torch.Tensor, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True, retain_graph=True)
    return {
        n: torch.zeros_like(p) if g is None else g.detach()
        for (n, p), g in zip(params.items(), grads, strict=True)
    }


def labelled_gradients(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor | None = None,
    *,
    kind: str = "empirical",
    likelihood: str = "classification",
    max_sequences: int = 4096,
) -> list[list[tuple[float, dict[str, torch.Tensor]]]]:
    """Per sample, the (weight, gradient of the per-sample loss) pairs of the estimand."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n = next(v for v in _leaves(inputs)).shape[0]
    out = []
    for i in range(n):
        x = _slice(inputs, i)
        f = _call(model, x)[0]
        pairs: list[tuple[float, dict[str, torch.Tensor]]] = []
        if likelihood == "classification":
            logp = torch.log_softmax(f, -1)
            if kind == "empirical":
                label = _targets(targets, likelihood)[i]
                pairs.append((1.0, _grads(-logp[label], params)))
            else:
                for c in range(f.shape[-1]):
                    pairs.append((logp[c].exp().item(), _grads(-logp[c], params)))
        elif likelihood == "regression":
            if kind == "empirical":
                target = _targets(targets, likelihood)[i]
                pairs.append((1.0, _grads(0.5 * (f - target).square().sum(), params)))
            else:
                for o in range(f.numel()):
                    pairs.append((1.0, _grads(f.reshape(-1)[o], params)))
        elif likelihood == "causal_lm":
            labels = _labels(x, None if targets is None else targets[i : i + 1])[0]
            logp = torch.log_softmax(f[:-1], -1)
            active = [t for t in range(f.shape[0] - 1) if labels[t + 1] != -100]
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            if kind == "empirical":
                loss = -sum((logp[t, labels[t + 1]] for t in active), zero)
                pairs.append((1.0, _grads(loss, params)))
            else:
                vocab = f.shape[-1]
                if vocab ** len(active) > max_sequences:
                    raise ConfigurationError(f"{vocab}^{len(active)} label sequences: too many")
                for ys in itertools.product(range(vocab), repeat=len(active)):
                    loss = -sum((logp[t, y] for t, y in zip(active, ys, strict=True)), zero)
                    weight = torch.exp(-loss).item()
                    pairs.append((weight, _grads(loss, params)))
        else:
            raise ConfigurationError(f"unknown likelihood {likelihood!r}")
        out.append(pairs)
    return out


def _leaves(inputs: Inputs) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
    elif isinstance(inputs, Mapping):
        yield from (v for v in inputs.values() if isinstance(v, torch.Tensor))
    else:
        yield from (v for v in inputs if isinstance(v, torch.Tensor))


def per_sample_gradients(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor | None = None,
    *,
    likelihood: str = "classification",
    max_sequences: int = 4096,
) -> dict[str, torch.Tensor]:
    """{name: [N, *shape]} gradients of each sample's loss at its data labels (a loop)."""
    pairs = labelled_gradients(
        model,
        inputs,
        targets,
        kind="empirical",
        likelihood=likelihood,
        max_sequences=max_sequences,
    )
    names = pairs[0][0][1].keys()
    return {name: torch.stack([p[0][1][name] for p in pairs]) for name in names}


def reference_fisher(
    model: nn.Module,
    inputs: Inputs,
    targets: torch.Tensor | None = None,
    *,
    kind: str = "empirical",
    likelihood: str = "classification",
) -> dict[str, torch.Tensor]:
    """F_jj = (1/N) Σ_i Σ_(w, g) w g_j² over :func:`labelled_gradients` (float64 loops)."""
    pairs = labelled_gradients(model, inputs, targets, kind=kind, likelihood=likelihood)
    total = {name: torch.zeros_like(g, dtype=torch.float64) for name, g in pairs[0][0][1].items()}
    for unit in pairs:
        for w, g in unit:
            for name in total:
                total[name] += w * g[name].double().square()
    return {name: value / len(pairs) for name, value in total.items()}


def reference_group_values(
    pairs: list[list[tuple[float, dict[str, torch.Tensor]]]],
    params: Mapping[str, torch.Tensor],
    family: _Family,
) -> dict[str, torch.Tensor]:
    """Per-sample and mean ``trace`` and ``mask`` values of a ``GroupFamily`` from the pairs.

    trace_ik = Σ_(w,g) w Σ_{j ∈ k} g_j²;  mask_ik = Σ_(w,g) w (Σ_{j ∈ mask set of k} θ_j g_j)².
    """
    size = family.size
    trace = torch.zeros(len(pairs), size, dtype=torch.float64)
    mask = torch.zeros(len(pairs), size, dtype=torch.float64)
    for i, unit in enumerate(pairs):
        for w, g in unit:
            lin = torch.zeros(size, dtype=torch.float64)
            for m in family.members:
                grad, theta = g[m.param].double(), params[m.param].detach().double()
                for index, k in enumerate(m.assign):
                    if k < 0:
                        continue
                    part = grad.select(m.axis, index)
                    trace[i, k] += w * part.square().sum()
                    if m.in_mask:
                        lin[k] += (theta.select(m.axis, index) * part).sum()
            mask[i] += w * lin.square()
    return {"trace": trace.mean(0), "mask": mask.mean(0), "trace_rows": trace, "mask_rows": mask}


def positionwise_fisher(
    model: nn.Module,
    inputs: Inputs,
    objective: Callable[[torch.Tensor], torch.Tensor],
    token_mask: torch.Tensor,
    *,
    with_sum: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Σ over samples i and positions s with ``token_mask[i, s] > 0`` of the squared
    position-wise gradient g_is = Σ_calls ∂/∂θ ⟨m(x)[i, s], b[i, s]⟩, where every call of a
    module m owning θ is re-run on its recorded input and b = ∂ objective / ∂ m(x) is the full
    gradient of its output (autograd, ``retain_grad``). An output with a batch dimension of 1 is
    broadcast over the batch: it is expanded to B rows first.

    Returns the *sum* (normalise by the number of active positions yourself); with
    ``with_sum`` also Σ g_is (the position-wise gradients themselves, summed).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = token_mask.shape[0]
    calls: list[tuple[nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor]] = []

    def record(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
    ) -> torch.Tensor:
        if output.shape[0] == 1 and batch > 1:
            output = output.expand(batch, *output.shape[1:])
            args = tuple(
                a.expand(batch, *a.shape[1:]) if isinstance(a, torch.Tensor) else a for a in args
            )
        output.retain_grad()
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        calls.append((module, args, kwargs, output))
        return output

    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(False))]
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in owners]
    try:
        objective(_call(model, inputs)).backward(inputs=[c[3] for c in calls])
    finally:
        for h in hooks:
            h.remove()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    linear = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i, s in token_mask.nonzero().tolist():
        g = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        for module, args, kwargs, output in calls:
            own = {n: p for n, p in params.items() if any(p is q for q in module.parameters(False))}
            if output.grad is None:  # the output did not reach the objective
                continue
            value = (module(*args, **kwargs)[i, s] * output.grad[i, s]).sum()
            for name, grad in zip(own, torch.autograd.grad(value, list(own.values())), strict=True):
                g[name] += grad.double()
        for name in total:
            total[name] += g[name].square()
            linear[name] += g[name]
    return (total, linear) if with_sum else total


def causal_lm_objective(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Σ_t −log softmax(logits_t)[labels_{t+1}] over active targets (the shifted HF loss)."""

    def objective(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )

    return objective


__all__ += ["causal_lm_objective"]
