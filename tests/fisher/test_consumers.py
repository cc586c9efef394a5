"""Consumers: ranking, pruning masks, EWC, Fisher merging, task overlap, gradient conflicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import (
    FisherCollector,
    ewc_penalty,
    fisher_merge,
    gradient_conflicts,
    importance_ranking,
    pruning_masks,
    task_overlap,
)
from gradstats.testing import per_sample_gradients
from tests.fisher.models import hf_causal_lm, mlp


@pytest.fixture
def lm_fisher():
    model = hf_causal_lm("llama", num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(0))
    return FisherCollector(model, "empirical", "causal_lm").collect(ids)


def _mlp_fisher(seed=0, kind="empirical", **kwargs):
    g = torch.Generator().manual_seed(seed)
    model = mlp((3, 5, 4))
    x, y = torch.randn(10, 3, generator=g), torch.randint(0, 4, (10,), generator=g)
    return model, FisherCollector(model, kind, **kwargs).collect(x, y if kind != "exact" else None)


def test_importance_ranking_is_sorted_and_complete(lm_fisher):
    ranking = importance_ranking(
        lm_fisher, "mask", families=["layers.0.attn.heads", "layers.1.attn.heads"]
    )
    values = [v for _, v in ranking]
    assert values == sorted(values, reverse=True)
    assert len(ranking) == 8
    assert {n for n, _ in ranking} == {
        f"layers.{layer}.attn.heads.{h}" for layer in (0, 1) for h in range(4)
    }


def test_pruning_masks_remove_the_least_important_heads_globally(lm_fisher):
    masks = pruning_masks(lm_fisher, 3, structure="heads")
    mask_values = lm_fisher.group_fisher("mask")
    scores = torch.cat([mask_values["layers.0.attn.heads"], mask_values["layers.1.attn.heads"]])
    removed = torch.cat([~masks["layers.0.attn.heads"], ~masks["layers.1.attn.heads"]])
    assert int(removed.sum()) == 3
    assert scores[removed].max() <= scores[~removed].min()


def test_pruning_masks_per_layer_and_min_keep(lm_fisher):
    masks = pruning_masks(lm_fisher, 0.5, structure="neurons", scope="layer")
    assert all(int((~m).sum()) == 6 for m in masks.values())  # 12 neurons per layer
    masks = pruning_masks(lm_fisher, 6, structure="heads", min_keep=1)
    assert all(int(m.sum()) >= 1 for m in masks.values())
    with pytest.raises(
        ConfigurationError, match="budget removes 8 of 8 groups but 1 per family must stay"
    ):
        pruning_masks(lm_fisher, 8, structure="heads")


def test_channel_pruning_of_a_plain_network():
    _, fc = _mlp_fisher()
    masks = pruning_masks(fc, 0.25, structure="channels", kind="trace")
    assert set(masks) == {"0", "2"}
    assert sum(int((~m).sum()) for m in masks.values()) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 1.5}, r"budget as a fraction must lie in \(0, 1\)"),
        (
            {"budget": 1, "structure": "rows"},
            r"structure must be one of 'heads', 'channels', 'neurons'",
        ),
        ({"budget": 1, "structure": "channels"}, r"has no 'channels' families"),
        ({"budget": 1, "scope": "model"}, r"scope must be one of 'global', 'layer'"),
    ],
)
def test_pruning_bad_arguments(lm_fisher, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        pruning_masks(lm_fisher, **kwargs)


def test_ewc_penalty_is_half_lambda_sum_of_fisher_weighted_squares():
    model, fc = _mlp_fisher()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    penalty = ewc_penalty(fc, model, anchor, strength=3.0)
    expected = 1.5 * sum((f * 0.01).sum() for f in fc.fisher().values())
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # differentiable in θ
    torch.testing.assert_close(model[0].weight.grad, 3.0 * fc.fisher()["0.weight"] * 0.1)


def _anchor(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _ewc_wrong_kind():
    model, _ = _mlp_fisher()
    _, wrong_kind = _mlp_fisher(kind="batch_grad_sq", groups=None)
    ewc_penalty(wrong_kind, model, _anchor(model))


def _ewc_wrong_shape():
    model, fc = _mlp_fisher()
    anchor = _anchor(model)
    ewc_penalty(fc, {**anchor, "0.weight": torch.zeros(2, 2)}, anchor)


def _ewc_missing():
    model, fc = _mlp_fisher()
    ewc_penalty(fc, {}, _anchor(model))


def _ewc_token_unit():
    lm = hf_causal_lm("gpt2")
    token = FisherCollector(lm, "empirical", "causal_lm", "token").collect(
        torch.randint(0, 11, (2, 4))
    )
    ewc_penalty(token, lm, _anchor(lm))


def _overlap_other_kind():
    _, fc = _mlp_fisher()
    _, exact = _mlp_fisher(kind="exact")
    task_overlap(fc, exact)


def _overlap_not_a_collector():
    _, fc = _mlp_fisher()
    task_overlap(fc, {"0.weight": torch.ones(5, 3)})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (_ewc_wrong_kind, ConfigurationError, r"kind='batch_grad_sq' \(the mistaken squared"),
        (_ewc_wrong_shape, ConfigurationError, r"0.weight: Fisher shape \(5, 3\), params"),
        (_ewc_missing, ConfigurationError, "missing from params or anchor"),
        (
            _ewc_token_unit,
            ConfigurationError,
            r"unit='token'; this consumer needs unit in \('sample',\)",
        ),
        (
            _overlap_other_kind,
            ConfigurationError,
            r"has kind='exact' but fishers\[0\] has 'empirical'",
        ),
        (_overlap_not_a_collector, ConfigurationTypeError, "must be a FisherCollector"),
    ],
)
def test_consumers_check_kind_unit_and_shapes(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fisher_merge_weights_each_coordinate_by_its_fisher():
    model_a, fa = _mlp_fisher(seed=0)
    model_b, fb = _mlp_fisher(seed=1)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(1.0)
    pa = {n: p.detach() for n, p in model_a.named_parameters()}
    pb = {n: p.detach() for n, p in model_b.named_parameters()}
    merged = fisher_merge([pa, pb], [fa, fb], weights=[1.0, 2.0], floor=1e-12)
    for name in pa:
        a, b = fa.fisher()[name].clamp(min=1e-12), 2.0 * fb.fisher()[name].clamp(min=1e-12)
        torch.testing.assert_close(merged[name], (a * pa[name] + b * pb[name]) / (a + b))
    # with no information anywhere, the merge is the λ-weighted average
    zero = fisher_merge([pa, pb], [fa, fb], weights=[1.0, 1.0], floor=1e6)
    torch.testing.assert_close(zero["0.bias"], (pa["0.bias"] + pb["0.bias"]) / 2)


def test_task_overlap_of_a_fisher_with_itself_is_one():
    _, fa = _mlp_fisher(seed=0)
    _, fb = _mlp_fisher(seed=3)
    same = task_overlap(fa, fa)
    assert same["overlap"] == pytest.approx(1.0)
    assert same["cosine"] == pytest.approx(1.0)
    other = task_overlap(fa, fb)
    fa_flat = torch.cat([v.reshape(-1) for v in fa.fisher().values()])
    fb_flat = torch.cat([v.reshape(-1) for v in fb.fisher().values()])
    expected = ((fa_flat / fa_flat.sum()) * (fb_flat / fb_flat.sum())).sqrt().sum()
    assert other["overlap"] == pytest.approx(float(expected))
    assert 0.0 < other["overlap"] < 1.0
    assert set(other["per_parameter"]) == set(fa.fisher())


def test_gradient_conflicts_carry_the_true_sample_ids():
    model = mlp((3, 4, 2))
    g = torch.Generator().manual_seed(0)
    xa, ya = torch.randn(3, 3, generator=g), torch.randint(0, 2, (3,), generator=g)
    xb, yb = torch.randn(2, 3, generator=g), torch.randint(0, 2, (2,), generator=g)
    ga, gb = per_sample_gradients(model, xa, ya), per_sample_gradients(model, xb, yb)
    result = gradient_conflicts(ga, gb, ids_a=[10, 11, 12], ids_b=["x", "y"])
    flat_a = torch.cat([ga[n].reshape(3, -1) for n in sorted(ga)], 1)
    flat_b = torch.cat([gb[n].reshape(2, -1) for n in sorted(gb)], 1)
    expected = nn.functional.cosine_similarity(flat_a[:, None], flat_b[None], dim=-1)
    torch.testing.assert_close(result["cosine"], expected)
    assert result["ids_a"] == [10, 11, 12]
    assert result["ids_b"] == ["x", "y"]
    with pytest.raises(ConfigurationError, match="every row needs its true sample id"):
        gradient_conflicts(ga, gb, ids_a=[1, 2], ids_b=["x", "y"])
