r"""The likelihood interface: a validated batch (:class:`Prepared`), the :class:`Likelihood` base
class, the user-callable likelihood and the checks the built-in likelihoods share.

Every likelihood returns the per-unit loss **sum-reduced over the unit's targets**,
l_i = −log p(y_i | x_i), so the per-unit gradient g_i = ∇_θ l_i carries no 1/n factor (see
:mod:`gradstats.fisher._likelihoods` for the built-in ones and their output-space Fisher Λ).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from gradstats._validation import check_choice
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "CallableLikelihood",
    "Likelihood",
    "Prepared",
    "extract_output",
]

IGNORE_INDEX = -100
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
        n_tokens: number of active targets: an int where it is known on the host (no token
            mask, or a mask of ones), else an int64 scalar tensor on the output's device.
    """

    output: torch.Tensor | None
    raw: object
    targets: torch.Tensor | None
    n_samples: int
    token_mask: torch.Tensor | None
    n_tokens: torch.Tensor | int
    lse: torch.Tensor | None = None  # cached log-sum-exp of the logits (closed forms)
    total: torch.Tensor | None = None  # a callable likelihood's (rescaled) loss

    @property
    def logits(self) -> torch.Tensor:
        """``output``, for the passes that need it (built-in likelihoods always have one)."""
        if self.output is None:
            raise ConfigurationError(
                "this pass needs the model output; a callable likelihood returns only its loss"
            )
        return self.output

    @property
    def active(self) -> torch.Tensor:
        """``token_mask``, for token units (token likelihoods always have one)."""
        if self.token_mask is None:
            raise ConfigurationError("unit='token' needs per-token losses (a [B, T] token mask)")
        return self.token_mask


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
    raise ConfigurationTypeError(
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
        raise ConfigurationError(
            f"empty batch: the model output has shape {tuple(output.shape)}; collect() needs at "
            "least one sample"
        )
    return output.shape[0]


def _check_integer_targets(targets: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise ConfigurationTypeError(
            f"targets must be a torch.Tensor of {what}; got {type(targets).__name__}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ConfigurationTypeError(
            f"targets must be an integer tensor of {what}; got dtype {targets.dtype}"
        )
    if tuple(targets.shape) != shape:
        raise ConfigurationError(
            f"targets must have shape {shape} ({what}); got {tuple(targets.shape)}"
        )
    return targets.long()


def _check_range(values: torch.Tensor, upper: int, what: str, allow_ignore: bool) -> None:
    """Range check of class indices; reads values only for CPU tensors (no device sync)."""
    if values.device.type != "cpu" or values.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(values))  # sync-ok: CPU tensor; one pass
    if low >= 0 and high < upper:
        return
    valid = (values >= 0) & (values < upper)
    if allow_ignore:
        valid |= values == IGNORE_INDEX
    if not bool(valid.all()):  # sync-ok: CPU tensor
        bad = values[~valid][0].item()  # sync-ok: CPU tensor, error path
        extra = f" or {IGNORE_INDEX}" if allow_ignore else ""
        raise ConfigurationError(f"{what} must lie in [0, {upper}){extra}; found {bad}")


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
            raise ConfigurationTypeError(
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
                raise ConfigurationError(
                    "loss_reduction='mean' is for callables returning a scalar; this one returned "
                    f"per-unit losses of shape {tuple(value.shape)} (sum them: use 'sum')"
                )
            total = value.sum()
            if value.dim() == 2:
                mask = torch.ones(value.shape, dtype=value.dtype, device=device)
        else:
            raise ConfigurationError(
                "the likelihood callable must return a scalar, per-sample losses [B] or per-token "
                f"losses [B, T] with B = {n}; got shape {tuple(value.shape)}"
            )
        tokens = n if mask is None else mask.numel()
        return Prepared(None, raw, targets, n, mask, tokens, total=total)

    def loss(self, prepared, labels):
        return prepared.total

    def config(self):
        return {"likelihood": f"callable:{self.name}", "loss_reduction": self.reduction}


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and probabilities); float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _column_probs(prepared: Prepared, columns: slice) -> torch.Tensor:
    """softmax(logits)[..., columns] in float64 without forming the other columns."""
    logits = prepared.logits.detach()
    if prepared.lse is None:
        prepared.lse = torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    return torch.exp(logits[..., columns].double() - prepared.lse)


def _batch_size(raw: object, value: torch.Tensor) -> int:
    try:
        n = extract_output(raw).shape[0]
    except (TypeError, IndexError):
        n = value.shape[0] if value.dim() else 0
    if n == 0:
        raise ConfigurationError("empty batch: collect() needs at least one sample")
    return n
