"""Head / neuron masks applied to Hugging Face models, and what importance_ranking ranks."""

from __future__ import annotations

import copy

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import FisherCollector, apply_masks, importance_ranking, pruning_masks
from tests.fisher.models import hf_causal_lm

IDS = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))


def _collected(model_type):
    model = hf_causal_lm(model_type)
    fc = FisherCollector(model, "empirical", "causal_lm").collect(IDS)
    fc.close()
    return model, fc


def _zero_by_hand(model, model_type, structure, masks):
    """Zero the output-projection slices that read the removed heads / neurons."""
    by_hand = copy.deepcopy(model)
    config = model.config
    with torch.no_grad():
        for name, keep in masks.items():
            layer = int(name.split(".")[1])
            if model_type == "gpt2":
                block = by_hand.transformer.h[layer]
                weight = (
                    block.attn.c_proj.weight if structure == "heads" else block.mlp.c_proj.weight
                )
                width = config.n_embd // config.n_head if structure == "heads" else 1
                for k in torch.nonzero(~keep).flatten().tolist():
                    weight[k * width : (k + 1) * width, :] = 0.0  # Conv1D: [in, out]
            else:
                block = by_hand.model.layers[layer]
                weight = (
                    block.self_attn.o_proj.weight
                    if structure == "heads"
                    else block.mlp.down_proj.weight
                )
                width = config.head_dim if structure == "heads" else 1
                for k in torch.nonzero(~keep).flatten().tolist():
                    weight[:, k * width : (k + 1) * width] = 0.0  # Linear: [out, in]
    return by_hand


CASES = [(t, s) for t in ("gpt2", "llama") for s in ("heads", "neurons")]


@pytest.mark.parametrize(("model_type", "structure"), CASES)
def test_masked_groups_give_the_logits_of_zeroed_output_rows(model_type, structure):
    model, fc = _collected(model_type)
    masks = pruning_masks(fc, 0.5, structure=structure)
    assert any(bool((~m).any()) for m in masks.values())
    expected = _zero_by_hand(model, model_type, structure, masks)(IDS).logits
    with apply_masks(model, masks, fc):
        masked = model(IDS).logits
    torch.testing.assert_close(masked, expected)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_removing_the_masks_restores_the_model(model_type):
    model, fc = _collected(model_type)
    before = model(IDS).logits
    handle = apply_masks(model, pruning_masks(fc, 0.5, structure="heads"), fc)
    assert not torch.allclose(model(IDS).logits, before)
    handle.remove()
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def test_real_valued_masks_rescale_the_heads():
    model, fc = _collected("llama")
    fam = "layers.0.attn.heads"
    scale = torch.tensor([2.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        w = by_hand.model.layers[0].self_attn.o_proj.weight
        d = model.config.head_dim
        for k in range(4):
            w[:, k * d : (k + 1) * d] *= scale[k]
    with apply_masks(model, {fam: scale}, fc):
        torch.testing.assert_close(model(IDS).logits, by_hand(IDS).logits)


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


BAD_MASKS = {
    "unknown family": ({"layers.9.attn.heads": torch.ones(4)}, "no family 'layers.9.attn.heads'"),
    "wrong length": ({"layers.0.attn.heads": torch.ones(3)}, r"shape \(4,\); got \(3,\)"),
    "not a tensor": ({"layers.0.attn.heads": [1, 0, 1, 1]}, r"shape \(4,\); got list"),
}


@pytest.mark.parametrize(("masks", "match"), BAD_MASKS.values(), ids=BAD_MASKS.keys())
def test_bad_masks_raise_before_any_hook(masks, match):
    model, fc = _collected("llama")
    good = {"layers.1.attn.heads": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(ConfigurationError, match=match):
        apply_masks(model, {**good, **masks}, fc)
    assert _no_hooks(model)


def test_apply_masks_needs_a_group_map():
    model, _ = _collected("llama")
    with pytest.raises(ConfigurationTypeError, match="groups must be a FisherCollector"):
        apply_masks(model, {}, object())


def test_importance_ranking_ranks_heads_by_default():
    _, fc = _collected("gpt2")
    ranking = importance_ranking(fc, "mask")
    assert ranking
    assert all(".attn.heads." in name for name, _ in ranking)
    assert len(ranking) == 2 * 2


@pytest.mark.parametrize(
    ("structure", "part"), [("neurons", ".mlp.neurons."), ("heads", ".attn.heads.")]
)
def test_importance_ranking_by_structure(structure, part):
    _, fc = _collected("llama")
    ranking = importance_ranking(fc, "mask", structure=structure)
    assert ranking
    assert all(part in name for name, _ in ranking)


def test_importance_ranking_families_and_structure_conflict():
    _, fc = _collected("llama")
    with pytest.raises(ConfigurationError, match="not both"):
        importance_ranking(fc, families=["layers.0.attn.heads"], structure="heads")
