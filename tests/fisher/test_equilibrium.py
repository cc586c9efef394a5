"""gradstats.eqprop's equilibrium transformer: registry entry and per-sample Fisher at the fixed
point (its forward is differentiated by the implicit function theorem, one sample at a time)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gradstats.eqprop import models
from gradstats.fisher import FisherCollector, build_groups
from gradstats.testing import labelled_gradients, reference_fisher, reference_group_values


def _model(attn_mode="thick"):
    return models.EquilibriumTransformer(
        vocab_size=7,
        block_size=6,
        d_model=8,
        n_heads=2,
        attn_mode=attn_mode,
        generator=torch.Generator().manual_seed(0),
    ).double()


IDS = torch.tensor([[0, 3, 1, 6, 2], [5, 5, 2, 0, 4], [1, 2, 3, 4, 6]])


@pytest.mark.parametrize("attn_mode", ["thick", "energy", "layered"])
def test_registry_covers_every_parameter_by_head(attn_mode):
    model = _model(attn_mode)
    params = {n: p.detach() for n, p in model.named_parameters()}
    groups = build_groups(model, params, "auto")
    assert groups.source == "EquilibriumTransformer"
    assert groups.unmapped == []
    for tag in ("q", "k", "v", "o", "heads"):
        assert groups.family(f"layers.0.attn.{tag}").size == 2
    assert groups.family("layers.0.mlp.neurons").size == 32


def test_per_sample_fisher_and_groups_at_the_fixed_point():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notices: the forward is one unit, run per sample
        fc = FisherCollector(model, "empirical", "causal_lm").collect(IDS)
    assert fc.handlers == {"EquilibriumTransformer": "loop"}
    expected = reference_fisher(model, IDS, likelihood="causal_lm")
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    pairs = labelled_gradients(model, IDS, likelihood="causal_lm")
    params = {n: p.detach() for n, p in model.named_parameters()}
    heads = fc.group_map.family("layers.0.attn.heads")
    reference = reference_group_values(pairs, params, heads)
    torch.testing.assert_close(fc.group_fisher("mask")[heads.name], reference["mask"])
    torch.testing.assert_close(fc.group_fisher("trace")[heads.name], reference["trace"])
