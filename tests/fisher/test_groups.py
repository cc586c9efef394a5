"""Group maps from configs (heads, KV heads, fused QKV, Conv1D, neurons) and the two group
quantities, against brute-force per-sample loops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.fisher import (
    FisherCollector,
    GroupFamily,
    Member,
    build_groups,
    register_architecture,
    registered_architectures,
)
from gradstats.testing import labelled_gradients, reference_group_values
from tests.fisher.models import hf_causal_lm

# tiny models with the head / kv-head / head_dim structure of the named checkpoints
STRUCTURES = {
    "llama-3-8b": (
        "llama",
        dict(num_attention_heads=32, num_key_value_heads=8, head_dim=2, hidden_size=64),
    ),
    "qwen2.5-1.5b": (
        "qwen2",
        dict(num_attention_heads=12, num_key_value_heads=2, hidden_size=24, head_dim=None),
    ),
    "gpt2": ("gpt2", dict(n_head=12, n_embd=24)),
    "mistral": (
        "mistral",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=2, hidden_size=8),
    ),
    "qwen3": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4, hidden_size=8),
    ),
    "gpt_neox": ("gpt_neox", dict(num_attention_heads=4, hidden_size=8)),
}

EXPECTED_HEADS = {
    "llama-3-8b": {"q": 32, "k": 8, "v": 8, "o": 32},
    "qwen2.5-1.5b": {"q": 12, "k": 2, "v": 2, "o": 12},
    "gpt2": {"q": 12, "k": 12, "v": 12, "o": 12},
    "mistral": {"q": 4, "k": 2, "v": 2, "o": 4},
    "qwen3": {"q": 4, "k": 2, "v": 2, "o": 4},
    "gpt_neox": {"q": 4, "k": 4, "v": 4, "o": 4},
}


def _model(structure):
    model_type, overrides = STRUCTURES[structure]
    return hf_causal_lm(model_type, **overrides)


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_head_counts_from_the_config(structure):
    groups = build_groups(_model(structure), _params(_model(structure)), "auto")
    for layer in (0, 1):
        for tag, count in EXPECTED_HEADS[structure].items():
            assert groups.family(f"layers.{layer}.attn.{tag}").size == count
        assert groups.family(f"layers.{layer}.attn.heads").size == EXPECTED_HEADS[structure]["q"]
    assert groups.unmapped == []


def test_gpt2_c_attn_is_three_times_12_column_groups_and_c_proj_12_row_groups():
    model = _model("gpt2")
    groups = build_groups(model, _params(model), "auto")
    for third, tag in enumerate("qkv"):
        (weight, bias) = groups.family(f"layers.0.attn.{tag}").members
        assert weight.param == "transformer.h.0.attn.c_attn.weight"
        assert weight.axis == 1
        assert len(weight.assign) == 72
        owned = [j for j, k in enumerate(weight.assign) if k == 5]
        assert owned == [third * 24 + 10, third * 24 + 11]  # head 5 of the third, 2 columns
        assert bias.axis == 0
        assert bias.assign == weight.assign
    (o,) = groups.family("layers.0.attn.o").members
    assert o.param == "transformer.h.0.attn.c_proj.weight"
    assert o.axis == 0


def test_qwen3_head_dim_is_not_hidden_over_heads():
    model = _model("qwen3")
    groups = build_groups(model, _params(model), "auto")
    (q,) = groups.family("layers.0.attn.q").members
    assert len(q.assign) == 16
    assert q.assign[4:8] == (1, 1, 1, 1)
    (o,) = groups.family("layers.0.attn.o").members
    assert o.axis == 1
    assert len(o.assign) == 16


def test_gpt_neox_fused_qkv_is_interleaved_per_head():
    model = _model("gpt_neox")
    groups = build_groups(model, _params(model), "auto")
    q, k = groups.family("layers.0.attn.q").members[0], groups.family("layers.0.attn.k").members[0]
    # rows [h·3d, h·3d + d) are q_h, the next d rows k_h (d = 2)
    assert q.assign[:6] == (0, 0, -1, -1, -1, -1)
    assert q.assign[6:8] == (1, 1)
    assert k.assign[:6] == (-1, -1, 0, 0, -1, -1)


def test_bert_query_key_value_have_12_heads():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=1,
        hidden_size=24,
        num_attention_heads=12,
        intermediate_size=8,
        vocab_size=11,
        max_position_embeddings=8,
    )
    model = BertModel(config)
    groups = build_groups(model, _params(model), "auto")
    for tag in "qkvo":
        assert groups.family(f"layers.0.attn.{tag}").size == 12
    (query, bias) = groups.family("layers.0.attn.q").members
    assert query.param == "encoder.layer.0.attention.self.query.weight"
    assert bias.param.endswith("query.bias")
    assert groups.family("layers.0.mlp.neurons").size == 8
    assert groups.unmapped == []


def test_config_contradicting_the_weights_is_an_error():
    model = _model("mistral")
    model.config.num_attention_heads = 3  # 3 heads of head_dim 2 do not make q_proj's 8 rows
    with pytest.raises(
        ConfigurationError, match=r"q_proj.weight' has shape \(8, 8\) but the config implies 6"
    ):
        build_groups(model, _params(model), "auto")


def test_unregistered_architecture_maps_nothing_with_a_warning():
    model = _model("mistral")
    model.config.model_type = "some_new_arch"
    with pytest.warns(
        UserWarning, match="no group map is registered for model_type='some_new_arch'"
    ):
        groups = build_groups(model, _params(model), "auto")
    assert groups.families == []
    assert len(groups.unmapped) == len(_params(model))


def test_parameters_outside_every_family_are_reported_as_unmapped():
    class WithExtra(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 3)
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.lin(x) * self.temperature

    model = WithExtra().double()
    with (
        pytest.warns(UserWarning, match="1 parameter.* no group .*'unmapped'.*temperature"),
        pytest.warns(UserWarning, match="no dedicated per-sample handler for WithExtra"),
    ):
        fc = FisherCollector(model, groups="auto")
    fc.collect(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    trace = fc.group_fisher("trace")
    torch.testing.assert_close(trace["unmapped"], fc.fisher()["temperature"].reshape(1))
    assert fc.group_names()["unmapped"] == ["temperature"]


def test_registering_an_architecture():
    def builder(model, config, params):
        return [GroupFamily("everything", "channel", 1, (Member("lin.weight", 0, (0, 0, 0)),))]

    register_architecture("test_tiny_arch", builder)
    assert "test_tiny_arch" in registered_architectures()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "test_tiny_arch"})()
            self.lin = nn.Linear(2, 3, bias=False)

        def forward(self, x):
            return self.lin(x)

    model = Tiny()
    groups = build_groups(model, _params(model), "auto")
    assert [f.name for f in groups.families] == ["everything"]
    assert groups.source == "test_tiny_arch"


@pytest.mark.parametrize(
    ("family", "message"),
    [
        (
            GroupFamily("f", "channel", 2, (Member("lin.weight", 0, (0, 1)),)),
            r"assign has 2 entries",
        ),
        (
            GroupFamily("f", "channel", 2, (Member("nope", 0, (0, 1, 1)),)),
            r"unknown parameter 'nope'",
        ),
        (
            GroupFamily("f", "channel", 2, (Member("lin.weight", 0, (0, 1, 2)),)),
            r"assign values must be in",
        ),
    ],
)
def test_bad_user_families(family, message):
    model = nn.Sequential()
    model.lin = nn.Linear(2, 3)
    with pytest.raises(ConfigurationError, match=message):
        build_groups(model, _params(model), [family])


# --------------------------------------------------------------- group quantities, exactly
@pytest.mark.parametrize("structure", ["gpt2", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_group_trace_and_mask_match_brute_force(structure, kind):
    model_type, overrides = STRUCTURES[structure]
    model = hf_causal_lm(model_type, vocab=3, **overrides)
    ids = torch.tensor([[0, 2, 1, 1], [2, 1, 0, 2], [1, 1, 2, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FisherCollector(model, kind, "causal_lm").collect(ids, ids)
    pairs = labelled_gradients(model, ids, ids, kind=kind, likelihood="causal_lm")
    params = _params(model)
    trace, mask = fc.group_fisher("trace"), fc.group_fisher("mask")
    for fam in fc.families:
        expected = reference_group_values(pairs, params, fam)
        torch.testing.assert_close(trace[fam.name], expected["trace"], msg=fam.name)
        if fam.per_unit:
            torch.testing.assert_close(mask[fam.name], expected["mask"], msg=fam.name)
            # the per-unit trace moments have the same mean as the elementwise trace
            saved_mean = fc.state_dict()["tensors"][f"trace/{fam.name}/mean"]
            torch.testing.assert_close(saved_mean, expected["trace"])


def test_trace_and_mask_rank_groups_in_opposite_orders():
    # f = θᵀx with θ = [1, -1, 1, 1], residual 1: g_i = x_i. Groups {0, 1} and {2, 3}.
    model = nn.Linear(4, 1, bias=False).double()
    model.weight.data = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    x = torch.tensor([[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, -0.5, -0.5]])
    y = (x @ model.weight.data.T) - 1.0
    family = GroupFamily("halves", "channel", 2, (Member("weight", 1, (0, 0, 1, 1)),))
    fc = FisherCollector(model, "empirical", "regression", groups=[family]).collect(x, y)
    torch.testing.assert_close(fc.group_fisher("trace")["halves"], torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(fc.group_fisher("mask")["halves"], torch.tensor([0.0, 1.0]))


def test_group_standard_errors_use_units_as_observations():
    model = _model("mistral")
    ids = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    fc = FisherCollector(model, "empirical", "causal_lm").collect(ids, ids)
    pairs = labelled_gradients(model, ids, ids, likelihood="causal_lm")
    fam = next(f for f in fc.families if f.name == "layers.1.attn.heads")
    rows = reference_group_values(pairs, _params(model), fam)["mask_rows"]
    expected = rows.std(0) / rows.shape[0] ** 0.5
    torch.testing.assert_close(fc.group_standard_error("mask")[fam.name], expected)


def test_token_families_have_trace_but_no_per_unit_values():
    model = _model("gpt2")
    fc = FisherCollector(model, "empirical", "causal_lm").collect(torch.randint(0, 11, (2, 4)))
    assert "wte" in fc.group_fisher("trace")
    assert "wte" not in fc.group_fisher("mask")


def test_channel_mask_is_exact_when_outputs_are_modified_in_place():
    # the output copy kept for the mask quantity must be taken before ReLU(inplace=True)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    fc = FisherCollector(model).collect(x, y)
    pairs = labelled_gradients(model, x, y)
    for fam in fc.families:
        expected = reference_group_values(pairs, _params(model), fam)
        torch.testing.assert_close(fc.group_fisher("mask")[fam.name], expected["mask"])
        torch.testing.assert_close(fc.group_fisher("trace")[fam.name], expected["trace"])
