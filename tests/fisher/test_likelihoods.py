"""Likelihoods, kinds and units against references; the spec's golden cases; bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import CausalLMLikelihood, FisherCollector
from gradstats.testing import (
    causal_lm_objective,
    positionwise_fisher,
    reference_fisher,
)
from tests.fisher.models import hf_causal_lm, mlp


def _line(weight: float = 1.0) -> nn.Module:
    model = nn.Linear(1, 1, bias=False).double()
    model.weight.data.fill_(weight)
    return model


# ------------------------------------------------------------------ golden cases of the spec
def test_regression_golden_empirical_13_over_3():
    # f = w x with w = 1, x = [1, 2, 3], y = [-2, 1, 3]: residuals [3, 1, 0], g = x r = [3, 2, 0]
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[-2.0], [1.0], [3.0]])
    fc = FisherCollector(_line(), "empirical", "regression").collect(x, y)
    torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[13.0 / 3.0]]))


def test_regression_golden_exact_14_over_3():
    # exact Fisher of a σ² = 1 Gaussian: JᵀJ = mean of x² = 14/3, whatever the targets
    x = torch.tensor([[1.0], [2.0], [3.0]])
    fc = FisherCollector(_line(), "exact", "regression").collect(x)
    torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[14.0 / 3.0]]))


G = torch.tensor([1.0, -1.0, 2.0, 4.0])  # per-sample gradients of the spec's example


def _splits(n: int) -> list[tuple[int, ...]]:
    out = []
    for mask in range(2 ** (n - 1)):
        sizes, size = [], 1
        for bit in range(n - 1):
            if mask >> bit & 1:
                sizes.append(size)
                size = 1
            else:
                size += 1
        out.append((*sizes, size))
    return out


@pytest.mark.parametrize("sizes", _splits(4))
def test_g_1_m1_2_4_gives_5_5_for_every_split(sizes):
    # w = 1, x = 1, y = 1 - g: the residual (and the gradient) of sample i is g_i
    x, y = torch.ones(4, 1), (1.0 - G).unsqueeze(1)
    fc = FisherCollector(_line(), "empirical", "regression")
    start = 0
    for size in sizes:
        fc.collect(x[start : start + size], y[start : start + size])
        start += size
    torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[5.5]]))
    assert fc.counts["samples"] == 4
    assert fc.counts["batches"] == len(sizes)


def _mean_loss(out, y):
    return 0.5 * (out - y).square().sum(1).mean()


def test_mean_reduced_loss_is_undone_5_5_not_1_375():
    x, y = torch.ones(4, 1), (1.0 - G).unsqueeze(1)
    fc = FisherCollector(_line(), "empirical", _mean_loss, loss_reduction="mean").collect(x, y)
    torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[5.5]]))
    # declaring the mean loss as a sum reproduces the BackPACK-style Σ (g/4)² / 4 · 4 = 1.375
    wrong = FisherCollector(_line(), "empirical", _mean_loss, loss_reduction="sum")
    wrong.collect(x, y)
    torch.testing.assert_close(wrong.fisher("none")["weight"], torch.tensor([[1.375]]))


def test_callable_returning_per_sample_losses():
    x, y = torch.ones(4, 1), (1.0 - G).unsqueeze(1)

    def per_sample(out, target):
        return 0.5 * (out - target).square().sum(1)

    fc = FisherCollector(_line(), "empirical", per_sample).collect(x, y)
    torch.testing.assert_close(fc.fisher()["weight"], torch.tensor([[5.5]]))


def test_counts_of_a_callable_returning_per_token_losses():
    """Per-token losses [B, T] of a callable: every position is a token (a host count)."""
    x, y = torch.ones(4, 3), torch.zeros(4, 3)

    def per_token(out, target):
        return 0.5 * (out - target).square()

    torch.manual_seed(0)
    fc = FisherCollector(torch.nn.Linear(3, 3, dtype=torch.float64), "empirical", per_token)
    fc.collect(x.double(), y.double()).collect(x[:2].double(), y[:2].double())
    assert fc.counts["samples"] == 6
    assert fc.counts["tokens"] == 18
    assert fc.counts["batches"] == 2


def _masked_lm_batch():
    # lengths [5, 3] right-padded to T = 5; sequence 0 starts with a 2-token prompt
    ids = torch.tensor([[1, 2, 3, 4, 5], [3, 1, 4, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = ids.clone()
    labels[0, :2] = -100
    return {"input_ids": ids, "attention_mask": attention}, labels


def test_masked_causal_lm_counts_5_active_targets_not_8():
    inputs, labels = _masked_lm_batch()
    model = hf_causal_lm("gpt2", vocab=7)
    fc = FisherCollector(model, "empirical", "causal_lm", groups=None).collect(inputs, labels)
    assert inputs["attention_mask"].sum() == 8
    assert fc.counts == {"samples": 2, "tokens": 5, "batches": 1, "skipped": 0, "units": 2}
    token = FisherCollector(model, "empirical", "causal_lm", "token", groups=None)
    assert token.collect(inputs, labels).counts["units"] == 5


def test_causal_lm_labels_default_to_input_ids_with_padding_ignored():
    inputs, labels = _masked_lm_batch()
    labels[0, :2] = inputs["input_ids"][0, :2]  # no prompt: labels are the input ids
    model = hf_causal_lm("gpt2", vocab=7)
    a = FisherCollector(model, "empirical", "causal_lm", groups=None).collect(inputs)
    b = FisherCollector(model, "empirical", "causal_lm", groups=None).collect(inputs, labels)
    assert a.counts["tokens"] == 6
    for name, value in a.fisher().items():
        torch.testing.assert_close(value, b.fisher()[name])


# ---------------------------------------------------------------------------- kinds, units
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_regression_against_reference(kind):
    model = mlp((3, 5, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    fc = FisherCollector(model, kind, "regression").collect(x, y)
    expected = reference_fisher(model, x, y, kind=kind, likelihood="regression")
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_causal_lm_exact_equals_enumeration_of_label_sequences(model_type):
    model = hf_causal_lm(model_type, vocab=3)
    ids = torch.tensor([[0, 2, 1, 1], [2, 1, 0, 2]])
    labels = ids.clone()
    labels[0, 0] = -100
    fc = FisherCollector(model, "exact", "causal_lm", groups=None).collect(ids, labels)
    expected = reference_fisher(model, ids, labels, kind="exact", likelihood="causal_lm")
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name], msg=name)


def _token_mask(labels):
    mask = torch.zeros(labels.shape, dtype=torch.float64)
    mask[:, :-1] = (labels[:, 1:] != -100).double()
    return mask


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_token_unit_is_the_positionwise_gradient(model_type):
    inputs, labels = _masked_lm_batch()
    model = hf_causal_lm(model_type, vocab=7)
    fc = FisherCollector(model, "empirical", "causal_lm", "token", groups=None)
    fc.collect(inputs, labels)
    masked = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    expected = positionwise_fisher(model, inputs, causal_lm_objective(masked), _token_mask(masked))
    for name, value in fc.fisher("none").items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_token_unit_mean_gradient_covers_the_same_positions_as_the_fisher():
    inputs, labels = _masked_lm_batch()  # a 2-token prompt: position-wise sums drop it
    model = hf_causal_lm("gpt2", vocab=7)
    fc = FisherCollector(model, "empirical", "causal_lm", "token", groups=None)
    fc.collect(inputs, labels)
    masked = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    _, sums = positionwise_fisher(
        model, inputs, causal_lm_objective(masked), _token_mask(masked), with_sum=True
    )
    for name, value in fc.mean_gradient().items():
        torch.testing.assert_close(value, sums[name] / 5)
        assert (fc.variance()[name] > -1e-12).all()


def test_token_unit_output_layer_is_exact_per_token():
    # for lm_head, position t affects loss t only: the per-token gradient is exact (loop over t)
    model = hf_causal_lm("llama", vocab=7)
    inputs, labels = _masked_lm_batch()
    fc = FisherCollector(model, "empirical", "causal_lm", "token", params=["lm_head.weight"])
    fc.collect(inputs, labels)
    masked = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    logits = model(**inputs).logits
    total = torch.zeros_like(model.lm_head.weight)
    for i, t in (masked[:, 1:] != -100).nonzero().tolist():
        loss = nn.functional.cross_entropy(logits[i, t], masked[i, t + 1])
        (g,) = torch.autograd.grad(loss, model.lm_head.weight, retain_graph=True)
        total += g.square()
    torch.testing.assert_close(fc.fisher()["lm_head.weight"], total / 5)


def test_exact_output_layer_closed_form_equals_enumeration():
    model = hf_causal_lm("llama", vocab=5)
    ids = torch.tensor([[0, 2, 1, 4], [3, 1, 0, 2]])
    closed = FisherCollector(model, "exact", "causal_lm", params=["lm_head.weight"])
    closed.collect(ids)
    full = FisherCollector(model, "exact", "causal_lm", groups=None).collect(ids)
    assert closed._closed_form
    assert not full._closed_form
    torch.testing.assert_close(closed.fisher()["lm_head.weight"], full.fisher()["lm_head.weight"])


def test_exact_closed_form_chunks_over_the_vocabulary():
    model = hf_causal_lm("llama", vocab=9)
    ids = torch.tensor([[0, 2, 1, 4], [3, 8, 0, 2]])
    one = FisherCollector(model, "exact", "causal_lm", params=["lm_head.weight"]).collect(ids)
    tiny = FisherCollector(
        model, "exact", "causal_lm", params=["lm_head.weight"], chunk_bytes=8 * 8 * 2
    ).collect(ids)
    torch.testing.assert_close(one.fisher()["lm_head.weight"], tiny.fisher()["lm_head.weight"])


def _mc_error(model, x, exact, samples, seed):
    fc = FisherCollector(model, "mc", "classification", mc_samples=samples, seed=seed)
    fisher = fc.collect(x).fisher()
    num = sum((fisher[n] - exact[n]).square().sum() for n in exact)
    return float((num / sum(v.square().sum() for v in exact.values())).sqrt())


def test_mc_converges_to_exact_as_samples_grow():
    model = mlp((3, 6, 4))
    x = torch.randn(16, 3)
    exact = FisherCollector(model, "exact", "classification").collect(x).fisher()
    errors = [
        sum(_mc_error(model, x, exact, k, seed) for seed in range(3)) / 3 for k in (4, 64, 1024)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[1]
    assert errors[1] < 0.5 * errors[0]


def test_mc_is_reproducible_with_an_explicit_generator():
    model, x = mlp((3, 6, 4)), torch.randn(8, 3)
    runs = [
        FisherCollector(
            model, "mc", "classification", mc_samples=3, generator=torch.Generator().manual_seed(7)
        )
        .collect(x)
        .fisher()
        for _ in range(2)
    ]
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=0)


def test_sampled_label_score_has_mean_zero_within_its_standard_error():
    model = hf_causal_lm("llama", vocab=5)
    ids = torch.tensor([[0, 2, 1, 4, 3], [3, 1, 0, 2, 2], [1, 1, 4, 0, 3]])
    fc = FisherCollector(model, "mc", "causal_lm", mc_samples=200, seed=3).collect(ids)
    check = fc.score_check()
    assert check["n"] > 100
    assert 0.5 < check["mean_z2"] < 2.0
    assert check["max_abs_z"] < 5.0
    # the data labels of a random network are not its own samples: the check has power
    data = FisherCollector(model, "empirical", "causal_lm").collect(ids).score_check()
    assert data["mean_z2"] > 5.0


class UnshiftedSampler(CausalLMLikelihood):
    """The original bug: the label at position s is drawn from logits_s (no shift), although the
    loss scores it against logits_{s-1}."""

    def sample(self, prepared, generator):
        logits = prepared.output.detach()
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1)
        drawn = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])
        labels = torch.full_like(drawn, -100)
        labels[:, 1:] = torch.where(prepared.token_mask[:, :-1] > 0, drawn[:, 1:], -100)
        return labels


def test_score_check_catches_labels_sampled_at_the_unshifted_position():
    model = hf_causal_lm("llama", vocab=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # position-dependent, peaked predictions
    ids = torch.tensor([[0, 2, 1, 4, 3], [3, 1, 0, 2, 2], [1, 1, 4, 0, 3]])
    right = FisherCollector(model, "mc", "causal_lm", mc_samples=200, seed=3).collect(ids)
    assert right.score_check()["mean_z2"] < 2.0
    fc = FisherCollector(model, "mc", UnshiftedSampler(), mc_samples=200, seed=3).collect(ids)
    assert fc.score_check()["mean_z2"] > 5.0


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("likelihood", "targets", "error", "message"),
    [
        (
            "classification",
            torch.tensor([0, 1, 2]),
            ConfigurationError,
            r"targets must have shape \(4,\)",
        ),
        (
            "classification",
            torch.zeros(4),
            ConfigurationTypeError,
            "integer tensor of class indices",
        ),
        (
            "classification",
            torch.tensor([0, 1, 2, 7]),
            ConfigurationError,
            r"targets must lie in \[0, 3\)",
        ),
        (
            "regression",
            torch.zeros(4, 2),
            ConfigurationError,
            r"targets must have the output's shape",
        ),
        (
            "regression",
            torch.zeros(4, 3, dtype=torch.long),
            ConfigurationTypeError,
            "floating targets",
        ),
    ],
)
def test_bad_targets_are_clear_errors(likelihood, targets, error, message):
    model = mlp((2, 3))
    fc = FisherCollector(model, "empirical", likelihood)
    with pytest.raises(error, match=message):
        fc.collect(torch.randn(4, 2), targets)
    assert fc.counts["batches"] == 0


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (
            torch.zeros(2, 4, dtype=torch.long),
            ConfigurationError,
            r"targets must have shape \(2, 5\)",
        ),
        (torch.zeros(2, 5), ConfigurationTypeError, "integer tensor of token labels"),
        (torch.full((2, 5), 9), ConfigurationError, r"labels must lie in \[0, 7\) or -100"),
    ],
)
def test_bad_causal_lm_labels(labels, error, message):
    model = hf_causal_lm("gpt2", vocab=7)
    fc = FisherCollector(model, "empirical", "causal_lm", groups=None)
    with pytest.raises(error, match=message):
        fc.collect(torch.zeros(2, 5, dtype=torch.long), labels)


def test_empty_batch_is_an_error():
    fc = FisherCollector(mlp((2, 3)))
    with pytest.raises(ConfigurationError, match="empty batch"):
        fc.collect(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_empirical_needs_targets():
    with pytest.raises(ConfigurationError, match=r"kind='empirical' needs targets"):
        FisherCollector(mlp((2, 3))).collect(torch.randn(3, 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kind": "true"}, ConfigurationError, r"kind must be one of 'empirical', 'mc', 'exact'"),
        (
            {"likelihood": "poisson"},
            ConfigurationError,
            r"likelihood must be one of 'classification'",
        ),
        (
            {"unit": "token"},
            ConfigurationError,
            r"unit='token' needs a likelihood with token positions",
        ),
        ({"unit": "sequence"}, ConfigurationError, r"unit must be one of 'sample', 'token'"),
        ({"mc_samples": 3}, ConfigurationError, r"mc_samples applies to kind='mc' only"),
        ({"kind": "mc", "mc_samples": 0}, ConfigurationError, r"mc_samples must be an int >= 1"),
        (
            {"kind": "mc", "element_se": True},
            ConfigurationError,
            r"element_se=True needs kind='empirical'",
        ),
        (
            {"kind": "mc", "likelihood": _mean_loss},
            ConfigurationError,
            r"kind='mc' is not available",
        ),
        ({"mode": "window"}, ConfigurationError, r"mode must be one of 'cumulative', 'ema'"),
        ({"beta": 1.0}, ConfigurationError, r"beta must lie in the open interval"),
        ({"params": ["nope"]}, ConfigurationError, r"params: unknown parameter 'nope'"),
        ({"loss_reduction": "mean"}, ConfigurationError, r"loss_reduction applies to callable"),
        ({"generator": 3}, ConfigurationTypeError, r"generator must be a torch.Generator"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        FisherCollector(mlp((2, 3)), **kwargs)


def test_exact_refuses_enumerations_longer_than_the_limit():
    model = hf_causal_lm("gpt2", vocab=7)
    fc = FisherCollector(model, "exact", "causal_lm", groups=None, max_exact_passes=10)
    with pytest.raises(
        ConfigurationError, match=r"needs 28 backward passes .* max_exact_passes=10"
    ):
        fc.collect(torch.zeros(2, 5, dtype=torch.long))
