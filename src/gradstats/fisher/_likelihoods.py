r"""Likelihoods: the per-unit loss, label sampling and the exact output-space Fisher.

A likelihood turns a model output into the objective whose gradient the collector squares. The
per-unit loss is always **sum-reduced over the unit's targets**, l_i = −log p(y_i | x_i), so the
per-unit gradient g_i = ∇_θ l_i carries no 1/n factor.

* ``"classification"``: logits [B, C], integer targets [B]; l_i = −log softmax(f_i)[y_i].
  Output-space Fisher Λ_i = diag(p_i) − p_i p_iᵀ.
* ``"regression"``: Gaussian with σ² = 1, outputs and targets [B, *]; l_i = ½‖y_i − f_i‖².
  Output-space Fisher Λ_i = I, so the exact Fisher is JᵀJ.
* ``"causal_lm"``: logits [B, T, V], labels [B, T] (Hugging Face convention). Logit position t
  scores label t + 1 (the shift happens here, never in the caller); labels −100 are ignored and
  positions where ``attention_mask`` is 0 are ignored too. An *active target* is a position
  t < T − 1 whose label t + 1 is kept; ``n_tokens`` counts them.

Kinds (see :class:`gradstats.FisherCollector`) use three methods:

* ``loss(prepared, labels)`` — Σ_units l_i at the given labels (``"empirical"`` uses the data's,
  ``"mc"`` sampled ones);
* ``sample(prepared, generator)`` — labels drawn from p_θ(·|x) at temperature 1, for active
  targets only (for ``causal_lm`` at the **shifted** position: label t + 1 ~ softmax(logits_t));
* ``exact_directions(prepared)`` — output-gradient vectors v_c with Σ_c (Jᵀ v_c)² equal to the
  diagonal of JᵀΛJ per unit: for the softmax, v_c = √p_c (p − e_c) (the gradient at label c,
  weighted by √p_c: label enumeration); for σ² = 1 Gaussians, v_o = e_o.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradstats._validation import check_choice

__all__ = [
    "IGNORE_INDEX",
    "CallableLikelihood",
    "CausalLMLikelihood",
    "ClassificationLikelihood",
    "Likelihood",
    "Prepared",
    "RegressionLikelihood",
    "extract_output",
    "make_likelihood",
]

IGNORE_INDEX = -100
LIKELIHOODS = ("classification", "regression", "causal_lm")
REDUCTIONS = ("sum", "mean")


@dataclass
class Prepared:
    """A validated batch: what the passes differentiate and how units are laid out.

    Attributes:
        output: the tensor whose gradient starts every pass (logits or predictions); ``None``
            for a callable likelihood, which returns its own loss.
        raw: the model's raw output (what a callable likelihood receives).
        targets: validated labels / regression targets (``None`` when not given).
        n_samples: B, the number of samples (sequences) in the batch.
        token_mask: for token likelihoods, a [B, T] mask (output dtype) of the positions whose
            loss is active; ``None`` otherwise.
        n_tokens: number of active targets, an int64 scalar tensor on the output's device.
    """

    output: torch.Tensor | None
    raw: object
    targets: torch.Tensor | None
    n_samples: int
    token_mask: torch.Tensor | None
    n_tokens: torch.Tensor
    lse: torch.Tensor | None = None  # cached log-sum-exp of the logits (closed forms)
    total: torch.Tensor | None = None  # a callable likelihood's (rescaled) loss


def extract_output(raw: object) -> torch.Tensor:
    """The logits/prediction tensor of a model output: the tensor itself, ``out["logits"]`` /
    ``out.logits`` for mappings and ``ModelOutput``, or the first element of a tuple."""
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, Mapping) and "logits" in raw:
        return raw["logits"]
    logits = getattr(raw, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        return raw[0]
    raise TypeError(
        "the model output must be a tensor, a mapping or ModelOutput with 'logits', or a tuple "
        f"whose first element is the output tensor; got {type(raw).__name__}"
    )


class Likelihood:
    """Base class. Subclass it (``name``, ``prepare``, ``loss`` and, for ``"mc"`` /
    ``"exact"``, ``sample`` / ``exact_directions``) to plug in another likelihood."""

    name = "custom"
    has_tokens = False
    kinds: tuple[str, ...] = ("empirical", "mc", "exact", "batch_grad_sq")

    def prepare(self, raw: object, targets: torch.Tensor | None, inputs: object) -> Prepared:
        raise NotImplementedError

    def loss(self, prepared: Prepared, labels: torch.Tensor | None) -> torch.Tensor:
        """Σ over units of the per-unit loss at ``labels`` (a scalar)."""
        raise NotImplementedError

    def sample(self, prepared: Prepared, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError(f"likelihood {self.name!r} cannot sample labels")

    def exact_passes(self, prepared: Prepared) -> int:
        raise NotImplementedError(f"likelihood {self.name!r} has no exact Fisher")

    def exact_directions(self, prepared: Prepared) -> Iterator[torch.Tensor]:
        raise NotImplementedError(f"likelihood {self.name!r} has no exact Fisher")

    def output_fisher_diagonal(self, prepared: Prepared, columns: slice) -> torch.Tensor:
        """diag(Λ) for the output ``columns`` (last dim; masked for tokens), float64: the exact
        Fisher of an output layer is Σ_rows diag(Λ)ᵀ(h²) in closed form (cross-position terms
        vanish in expectation because every position's score has mean zero)."""
        raise NotImplementedError(f"likelihood {self.name!r} has no closed-form Fisher")

    def config(self) -> dict[str, object]:
        return {"likelihood": self.name}


def _check_batch(output: torch.Tensor) -> int:
    if output.dim() == 0 or output.shape[0] == 0:
        raise ValueError(
            f"empty batch: the model output has shape {tuple(output.shape)}; collect() needs at "
            "least one sample"
        )
    return output.shape[0]


def _check_integer_targets(targets: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of {what}; got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of {what}; got dtype {targets.dtype}")
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have shape {shape} ({what}); got {tuple(targets.shape)}")
    return targets.long()


def _check_range(values: torch.Tensor, upper: int, what: str, allow_ignore: bool) -> None:
    """Range check of class indices; reads values only for CPU tensors (no device sync)."""
    if values.device.type != "cpu" or values.numel() == 0:
        return
    valid = (values >= 0) & (values < upper)
    if allow_ignore:
        valid |= values == IGNORE_INDEX
    if not bool(valid.all()):  # sync-ok: CPU tensor
        bad = values[~valid][0].item()  # sync-ok: CPU tensor, error path
        extra = f" or {IGNORE_INDEX}" if allow_ignore else ""
        raise ValueError(f"{what} must lie in [0, {upper}){extra}; found {bad}")


class ClassificationLikelihood(Likelihood):
    """Categorical likelihood on logits [B, C] with integer targets [B]."""

    name = "classification"

    def prepare(self, raw, targets, inputs) -> Prepared:
        logits = extract_output(raw)
        n = _check_batch(logits)
        if logits.dim() != 2:
            raise ValueError(
                f"likelihood='classification' needs logits of shape [B, C]; got "
                f"{tuple(logits.shape)} (use 'causal_lm' for [B, T, V])"
            )
        if targets is not None:
            targets = _check_integer_targets(targets, (n,), "class indices, one per sample")
            _check_range(targets, logits.shape[1], "targets", allow_ignore=False)
        count = torch.full((), n, dtype=torch.int64, device=logits.device)
        return Prepared(logits, raw, targets, n, None, count)

    def loss(self, prepared, labels):
        return F.cross_entropy(_upcast(prepared.output), labels, reduction="sum")

    def sample(self, prepared, generator):
        probs = torch.softmax(_upcast(prepared.output.detach()), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def exact_passes(self, prepared):
        return prepared.output.shape[1]

    def exact_directions(self, prepared):
        logits = prepared.output.detach()
        probs = torch.softmax(logits.double(), dim=-1)
        root = probs.sqrt()
        for c in range(logits.shape[1]):
            direction = probs.clone()
            direction[:, c] -= 1.0
            yield (direction * root[:, c : c + 1]).to(logits.dtype)

    def output_fisher_diagonal(self, prepared, columns):
        probs = _column_probs(prepared, columns)
        return probs * (1.0 - probs)


class RegressionLikelihood(Likelihood):
    """Gaussian likelihood with unit variance: l_i = ½‖y_i − f_i‖², outputs and targets [B, *]."""

    name = "regression"

    def prepare(self, raw, targets, inputs) -> Prepared:
        output = extract_output(raw)
        n = _check_batch(output)
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise TypeError(f"targets must be a torch.Tensor; got {type(targets).__name__}")
            if not targets.is_floating_point():
                raise TypeError(
                    "likelihood='regression' needs floating targets like the model output; got "
                    f"dtype {targets.dtype}"
                )
            if targets.shape != output.shape:
                raise ValueError(
                    f"targets must have the output's shape {tuple(output.shape)}; got "
                    f"{tuple(targets.shape)}"
                )
        count = torch.full((), n, dtype=torch.int64, device=output.device)
        return Prepared(output, raw, targets, n, None, count)

    def loss(self, prepared, labels):
        out = _upcast(prepared.output)
        residual = out - labels.to(out.dtype)
        return 0.5 * residual.square().sum()

    def sample(self, prepared, generator):
        out = prepared.output.detach()
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return out + noise

    def exact_passes(self, prepared):
        return prepared.output[0].numel()

    def exact_directions(self, prepared):
        out = prepared.output
        flat = torch.zeros(out.shape[0], out[0].numel(), dtype=out.dtype, device=out.device)
        for o in range(flat.shape[1]):
            flat.zero_()
            flat[:, o] = 1.0
            yield flat.view(out.shape).clone()

    def output_fisher_diagonal(self, prepared, columns):
        return torch.ones_like(prepared.output[..., columns], dtype=torch.float64)


class CausalLMLikelihood(Likelihood):
    """Next-token likelihood on logits [B, T, V] and labels [B, T] (shifted inside)."""

    name = "causal_lm"
    has_tokens = True

    def prepare(self, raw, targets, inputs) -> Prepared:
        logits = extract_output(raw)
        n = _check_batch(logits)
        if logits.dim() != 3:
            raise ValueError(
                f"likelihood='causal_lm' needs logits of shape [B, T, V]; got {tuple(logits.shape)}"
            )
        _, length, vocab = logits.shape
        attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if targets is None:
            targets = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
            if not isinstance(targets, torch.Tensor):
                raise ValueError(
                    "likelihood='causal_lm' needs labels: pass targets=labels, or inputs as the "
                    "input_ids tensor or a mapping with 'input_ids'"
                )
        labels = _check_integer_targets(targets, (n, length), "token labels [B, T], -100 ignored")
        _check_range(labels, vocab, "labels", allow_ignore=True)
        if attention is not None:
            if tuple(attention.shape) != (n, length):
                raise ValueError(
                    f"attention_mask must have shape {(n, length)}; got {tuple(attention.shape)}"
                )
            labels = labels.masked_fill(attention == 0, IGNORE_INDEX)
        mask = torch.zeros(n, length, dtype=logits.dtype, device=logits.device)
        mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).to(logits.dtype)
        count = (labels[:, 1:] != IGNORE_INDEX).sum()
        return Prepared(logits, raw, labels, n, mask, count)

    def loss(self, prepared, labels):
        logits = prepared.output[:, :-1]
        return F.cross_entropy(
            _upcast(logits.reshape(-1, logits.shape[-1])),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def sample(self, prepared, generator):
        logits = prepared.output.detach()[:, :-1]
        probs = torch.softmax(_upcast(logits.reshape(-1, logits.shape[-1])), dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])
        labels = torch.full_like(prepared.targets, IGNORE_INDEX)
        active = prepared.token_mask[:, :-1] > 0
        labels[:, 1:] = torch.where(active, drawn, IGNORE_INDEX)
        return labels

    def exact_passes(self, prepared):
        return (prepared.output.shape[1] - 1) * prepared.output.shape[2]

    def exact_directions(self, prepared):
        logits = prepared.output.detach()
        probs = torch.softmax(logits.double(), dim=-1) * prepared.token_mask[..., None].double()
        root = probs.sqrt()
        for t in range(logits.shape[1] - 1):
            for c in range(logits.shape[2]):
                direction = torch.zeros_like(probs)
                direction[:, t] = probs[:, t] * root[:, t, c : c + 1]
                direction[:, t, c] -= root[:, t, c]
                yield direction.to(logits.dtype)

    def output_fisher_diagonal(self, prepared, columns):
        probs = _column_probs(prepared, columns)
        return probs * (1.0 - probs) * prepared.token_mask[..., None].double()


class CallableLikelihood(Likelihood):
    """A user loss ``fn(model_output, targets)`` returning per-unit losses.

    The return value may be per-sample losses [B] (``unit="sample"``), per-token losses [B, T]
    (every position is a token unit), or a scalar with ``reduction`` telling how it was reduced
    over the B samples: ``"sum"``, or ``"mean"`` (the per-sample gradients then come back scaled
    by 1/B; the collector multiplies the objective by B to undo it). Only ``kind="empirical"`` and
    ``"batch_grad_sq"`` are available: a callable cannot sample labels.
    """

    kinds = ("empirical", "batch_grad_sq")

    def __init__(self, fn: Callable, reduction: str = "sum") -> None:
        self.fn = fn
        self.reduction = check_choice("loss_reduction", reduction, REDUCTIONS)
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def prepare(self, raw, targets, inputs) -> Prepared:
        value = self.fn(raw, targets)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(
                f"the likelihood callable must return a floating tensor; got {type(value).__name__}"
            )
        n = _batch_size(raw, value)
        device = value.device
        mask = None
        if value.dim() == 0:
            scale = float(n) if self.reduction == "mean" else 1.0
            total = value * scale
        elif value.dim() in (1, 2) and value.shape[0] == n:
            if self.reduction == "mean":
                raise ValueError(
                    "loss_reduction='mean' is for callables returning a scalar; this one returned "
                    f"per-unit losses of shape {tuple(value.shape)} (sum them: use 'sum')"
                )
            total = value.sum()
            if value.dim() == 2:
                mask = torch.ones(value.shape, dtype=value.dtype, device=device)
        else:
            raise ValueError(
                "the likelihood callable must return a scalar, per-sample losses [B] or per-token "
                f"losses [B, T] with B = {n}; got shape {tuple(value.shape)}"
            )
        tokens = n if mask is None else mask.numel()
        count = torch.full((), tokens, dtype=torch.int64, device=device)
        return Prepared(None, raw, targets, n, mask, count, total=total)

    def loss(self, prepared, labels):
        return prepared.total

    def config(self):
        return {"likelihood": f"callable:{self.name}", "loss_reduction": self.reduction}


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and probabilities); float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _column_probs(prepared: Prepared, columns: slice) -> torch.Tensor:
    """softmax(logits)[..., columns] in float64 without forming the other columns."""
    logits = prepared.output.detach()
    if prepared.lse is None:
        prepared.lse = torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    return torch.exp(logits[..., columns].double() - prepared.lse)


def _batch_size(raw: object, value: torch.Tensor) -> int:
    try:
        n = extract_output(raw).shape[0]
    except (TypeError, IndexError):
        n = value.shape[0] if value.dim() else 0
    if n == 0:
        raise ValueError("empty batch: collect() needs at least one sample")
    return n


def make_likelihood(likelihood: object, loss_reduction: str = "sum") -> Likelihood:
    """A :class:`Likelihood` from a name, a ``Likelihood`` instance or a callable."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        name = check_choice("likelihood", likelihood, LIKELIHOODS)
        if loss_reduction != "sum":
            raise ValueError(
                "loss_reduction applies to callable likelihoods only; the built-in likelihoods "
                f"are always sum-reduced per unit (got loss_reduction={loss_reduction!r})"
            )
        return {
            "classification": ClassificationLikelihood,
            "regression": RegressionLikelihood,
            "causal_lm": CausalLMLikelihood,
        }[name]()
    if callable(likelihood):
        return CallableLikelihood(likelihood, loss_reduction)
    valid = ", ".join(repr(c) for c in LIKELIHOODS)
    raise ValueError(
        f"likelihood must be one of {valid}, a Likelihood or a callable; got {likelihood!r}"
    )
