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

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from gradstats._validation import check_choice
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._likelihood_base import (
    IGNORE_INDEX,
    CallableLikelihood,
    Likelihood,
    Prepared,
    _check_batch,
    _check_integer_targets,
    _check_range,
    _column_probs,
    _upcast,
    extract_output,
)

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

LIKELIHOODS = ("classification", "regression", "causal_lm")


def _sampling_probs(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) for ``torch.multinomial``: rows made NaN by non-finite logits become
    uniform weights instead of an error (such a batch's loss is not finite either, so the
    collector skips or refuses it by its ``nonfinite`` policy; no host sync here)."""
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=1.0)


class ClassificationLikelihood(Likelihood):
    """Categorical likelihood on logits [B, C] with integer targets [B]."""

    name = "classification"

    def prepare(self, raw, targets, inputs) -> Prepared:
        logits = extract_output(raw)
        n = _check_batch(logits)
        if logits.dim() != 2:
            raise ConfigurationError(
                f"likelihood='classification' needs logits of shape [B, C]; got "
                f"{tuple(logits.shape)} (use 'causal_lm' for [B, T, V])"
            )
        if targets is not None:
            targets = _check_integer_targets(targets, (n,), "class indices, one per sample")
            _check_range(targets, logits.shape[1], "targets", allow_ignore=False)
        return Prepared(logits, raw, targets, n, None, n)

    def loss(self, prepared, labels):
        return F.cross_entropy(_upcast(prepared.output), labels, reduction="sum")

    def sample(self, prepared, generator):
        probs = _sampling_probs(_upcast(prepared.output.detach()))
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
                raise ConfigurationTypeError(
                    f"targets must be a torch.Tensor; got {type(targets).__name__}"
                )
            if not targets.is_floating_point():
                raise ConfigurationTypeError(
                    "likelihood='regression' needs floating targets like the model output; got "
                    f"dtype {targets.dtype}"
                )
            if targets.shape != output.shape:
                raise ConfigurationError(
                    f"targets must have the output's shape {tuple(output.shape)}; got "
                    f"{tuple(targets.shape)}"
                )
        return Prepared(output, raw, targets, n, None, n)

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
            raise ConfigurationError(
                f"likelihood='causal_lm' needs logits of shape [B, T, V]; got {tuple(logits.shape)}"
            )
        _, length, vocab = logits.shape
        attention = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if targets is None:
            targets = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
            if not isinstance(targets, torch.Tensor):
                raise ConfigurationError(
                    "likelihood='causal_lm' needs labels: pass targets=labels, or inputs as the "
                    "input_ids tensor or a mapping with 'input_ids'"
                )
        labels = _check_integer_targets(targets, (n, length), "token labels [B, T], -100 ignored")
        _check_range(labels, vocab, "labels", allow_ignore=True)
        if attention is not None:
            if tuple(attention.shape) != (n, length):
                raise ConfigurationError(
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
        probs = _sampling_probs(_upcast(logits.reshape(-1, logits.shape[-1])))
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


def make_likelihood(likelihood: object, loss_reduction: str = "sum") -> Likelihood:
    """A :class:`Likelihood` from a name, a ``Likelihood`` instance or a callable."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        name = check_choice("likelihood", likelihood, LIKELIHOODS)
        if loss_reduction != "sum":
            raise ConfigurationError(
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
    raise ConfigurationError(
        f"likelihood must be one of {valid}, a Likelihood or a callable; got {likelihood!r}"
    )
