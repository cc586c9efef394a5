"""Least-squares mask rescaling (Kwon et al. 2022) against a dense float64 least-squares solve."""

from __future__ import annotations

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher import FisherCollector, apply_masks, rescale_masks
from tests.fisher.models import hf_causal_lm

GEN = torch.Generator().manual_seed(0)
BATCHES = [torch.randint(0, 11, (3, 7), generator=GEN) for _ in range(2)]
SIZES = {
    "gpt2": dict(n_layer=2, n_embd=16, n_head=4, n_inner=24),
    "llama": dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=12),
}


def _model(model_type):
    model = hf_causal_lm(model_type, **SIZES[model_type])
    return model, FisherCollector(model, "empirical", "causal_lm").group_map


def _projection(model, model_type, name):
    layer = int(name.split(".")[1])
    if model_type == "gpt2":
        block = model.transformer.h[layer]
        return block.attn.c_proj if ".attn." in name else block.mlp.c_proj
    block = model.model.layers[layer]
    return block.self_attn.o_proj if ".attn." in name else block.mlp.down_proj


def _output_rows(model, module, masks, group_map):
    """The module's output rows [N, out] over BATCHES with ``masks`` applied."""
    rows = []
    hook = module.register_forward_hook(
        lambda m, a, out: rows.append(out.reshape(-1, out.shape[-1]))
    )
    try:
        with apply_masks(model, masks, group_map), torch.no_grad():
            for batch in BATCHES:
                model(batch)
    finally:
        hook.remove()
    return torch.cat(rows)


def _dense_reference(model, model_type, masks, group_map):
    """Family by family: contributions c_k = y(e_k) − y(0) by running the model with one-hot
    masks (the projection is linear in its masked input), stacked as columns, and
    ``torch.linalg.lstsq`` against the unmasked model's output."""
    current = {name: m.to(torch.float64) for name, m in masks.items()}
    for name in masks:  # insertion order = layer order here
        module = _projection(model, model_type, name)
        target = _output_rows(model, module, {}, group_map).reshape(-1)
        size = len(current[name])
        zero = _output_rows(model, module, {**current, name: torch.zeros(size)}, group_map)
        kept = torch.nonzero(current[name] != 0).flatten().tolist()
        columns = []
        for k in kept:
            one_hot = torch.zeros(size, dtype=torch.float64)
            one_hot[k] = 1.0
            rows = _output_rows(model, module, {**current, name: one_hot}, group_map)
            columns.append((rows - zero).reshape(-1))
        design = torch.stack(columns, dim=1)
        solution = torch.linalg.lstsq(design, (target - zero.reshape(-1))[:, None]).solution
        fitted = torch.zeros(size, dtype=torch.float64)
        fitted[kept] = solution[:, 0]
        current[name] = fitted
    return current


def _masks(model_type, structure, group_map):
    fams = [
        f for f in group_map.families if f.kind == ("heads" if structure == "heads" else "neurons")
    ]
    out = {}
    for i, fam in enumerate(fams):
        keep = torch.ones(fam.size, dtype=torch.bool)
        keep[
            torch.randperm(fam.size, generator=torch.Generator().manual_seed(i))[: fam.size // 2]
        ] = False
        out[fam.name] = keep
    return out


CASES = [(t, s) for t in ("gpt2", "llama") for s in ("heads", "neurons")]


@pytest.mark.parametrize(("model_type", "structure"), CASES)
def test_matches_a_dense_least_squares_solve(model_type, structure):
    model, group_map = _model(model_type)
    masks = _masks(model_type, structure, group_map)
    assert len(masks) == 2
    fitted = rescale_masks(model, masks, group_map, BATCHES)
    expected = _dense_reference(model, model_type, masks, group_map)
    assert list(fitted) == list(masks)
    for name, value in fitted.items():
        assert value.dtype == torch.float64
        assert torch.equal(value == 0, ~masks[name])  # removed groups stay removed
        torch.testing.assert_close(value, expected[name], rtol=1e-8, atol=1e-10)


def test_first_layer_fit_beats_the_binary_mask_on_its_output():
    model, group_map = _model("gpt2")
    masks = _masks("gpt2", "heads", group_map)
    first = next(iter(masks))
    fitted = rescale_masks(model, {first: masks[first]}, group_map, BATCHES)
    module = _projection(model, "gpt2", first)
    target = _output_rows(model, module, {}, group_map)
    binary = _output_rows(model, module, {first: masks[first]}, group_map)
    tuned = _output_rows(model, module, fitted, group_map)
    assert (tuned - target).norm() < (binary - target).norm()


def test_nothing_removed_gives_ones_and_the_model_is_left_unhooked():
    model, group_map = _model("gpt2")
    before = model(BATCHES[0]).logits
    masks = {f.name: torch.ones(f.size, dtype=torch.bool) for f in group_map.families}
    masks = {n: m for n, m in masks.items() if n.endswith((".attn.heads", ".mlp.neurons"))}
    fitted = rescale_masks(model, masks, group_map, BATCHES)
    for value in fitted.values():
        torch.testing.assert_close(value, torch.ones_like(value), rtol=0, atol=1e-9)
    torch.testing.assert_close(model(BATCHES[0]).logits, before, rtol=0, atol=0)


def test_accepts_the_collector_and_mapping_batches():
    model = hf_causal_lm("gpt2", **SIZES["gpt2"])
    fc = FisherCollector(model, "empirical", "causal_lm")
    masks = {"layers.0.attn.heads": torch.tensor([True, False, True, True])}
    by_collector = rescale_masks(model, masks, fc, [{"input_ids": b} for b in BATCHES])
    by_map = rescale_masks(model, masks, fc.group_map, BATCHES)
    torch.testing.assert_close(by_collector, by_map, rtol=0, atol=0)


# ------------------------------------------------------------------ bad input
HEADS = "layers.0.attn.heads"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(model="model"), ConfigurationTypeError, "model must be a torch.nn.Module"),
        (dict(groups="auto"), ConfigurationTypeError, "groups must be a FisherCollector"),
        (dict(masks={}), ConfigurationError, "masks must be a non-empty mapping"),
        (dict(masks=[1, 0]), ConfigurationError, "masks must be a non-empty mapping"),
        (dict(masks={"nope": torch.ones(4)}), ConfigurationError, "no family 'nope'"),
        (dict(masks={HEADS: torch.ones(3)}), ConfigurationError, r"shape \(4,\)"),
        (dict(masks={HEADS: [1, 1, 1, 1]}), ConfigurationError, r"shape \(4,\)"),
        (
            dict(masks={HEADS: torch.tensor([1.0, float("nan"), 1.0, 1.0])}),
            ConfigurationError,
            "NaN or inf",
        ),
        (dict(batches=[]), ConfigurationError, "at least one batch"),
        (dict(batches=BATCHES[0]), ConfigurationTypeError, "batches must be a list"),
        (dict(batches=3), ConfigurationTypeError, "batches must be a list"),
        (
            dict(masks={"layers.0.attn.q": torch.ones(4)}),
            ConfigurationError,
            r"masks\['layers.0.attn.q'\]: rescaling needs",
        ),
        (
            dict(masks={"layers.0.attn.o": torch.ones(4), HEADS: torch.ones(4)}),
            ConfigurationError,
            "mask the same module",
        ),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    model, group_map = _model("gpt2")
    args = dict(model=model, masks={HEADS: torch.ones(4)}, groups=group_map, batches=BATCHES)
    with pytest.raises(error, match=match):
        rescale_masks(**(args | kwargs))
    assert not model.transformer.h[0].attn.c_proj._forward_pre_hooks  # nothing left behind


def test_non_finite_layer_outputs_raise():
    model, group_map = _model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[0, 0] = float("nan")
    with pytest.raises(ConfigurationError, match="not finite"):
        rescale_masks(model, {HEADS: torch.ones(4)}, group_map, BATCHES)
