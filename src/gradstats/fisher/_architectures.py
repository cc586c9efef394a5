r"""The architecture registry: group maps of Hugging Face GPT-2, Llama, Mistral, Qwen2, Qwen3,
BERT and GPT-NeoX models (keyed by ``config.model_type``) and of gradstats' equilibrium
transformer (keyed by its class name), and :func:`build_groups`.

Every builder reads head counts and sizes from the config and checks them against the weights;
see :mod:`gradstats.fisher._groups` for the layout facts they encode. A parameter no family
covers is listed under ``unmapped`` with a warning — never grouped by rows silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gradstats._warnings import warn
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.fisher._groups import (
    _REGISTRY,
    GroupFamily,
    GroupMap,
    Member,
    _attention,
    _bias,
    _family,
    _find,
    _head_dim,
    _layers,
    _member,
    _merge_thirds,
    _neurons,
    _norm,
    _rows_family,
    _tokens,
    blocks,
    register_architecture,
    registered_architectures,
)
from gradstats.fisher._persample import is_hf_conv1d

__all__ = ["build_groups", "check_families"]


def _llama_like(model, config, params):
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = _head_dim(config)
    fams = [_tokens(params, "embed_tokens", _find(params, "embed_tokens.weight"))]
    for layer, p in _layers(params, r"(.*layers\.(\d+))\.self_attn\.q_proj\.weight$"):
        a, m = f"{p}.self_attn", f"{p}.mlp"
        fams += _attention(
            params, layer, heads, kv, d, f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj"
        )
        fams += _neurons(
            params,
            layer,
            config.intermediate_size,
            [f"{m}.gate_proj", f"{m}.up_proj"],
            f"{m}.down_proj",
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            fams.append(_norm(params, f"layers.{layer}.{norm}", f"{p}.{norm}", layer))
        for norm in ("q_norm", "k_norm"):
            fams.append(_norm(params, f"layers.{layer}.attn.{norm}", f"{a}.{norm}", layer))
    fams.append(_norm(params, "final_norm", _find(params, "norm.weight", strip=".weight")))
    fams.append(_tokens(params, "lm_head", "lm_head.weight"))
    return fams


def _gpt2(model, config, params):
    heads, hidden = config.n_head, config.n_embd
    d = hidden // heads
    fams = [
        _tokens(params, "wte", _find(params, "wte.weight")),
        _tokens(params, "wpe", _find(params, "wpe.weight"), kind="position"),
    ]
    for layer, p in _layers(params, r"(.*h\.(\d+))\.attn\.c_attn\.weight$"):
        third = [blocks(heads, d, 3 * hidden, offset=i * hidden) for i in range(3)]
        for tag, assign in zip("qkv", third, strict=True):
            members = [
                _member(params, f"{p}.attn.c_attn.weight", 1, assign),
                _member(params, f"{p}.attn.c_attn.bias", 0, assign),
            ]
            fams.append(_family(f"layers.{layer}.attn.{tag}", "head", heads, members, layer))
        qa = blocks(heads, d, hidden)
        o_member = _member(params, f"{p}.attn.c_proj.weight", 0, qa)
        fams.append(_family(f"layers.{layer}.attn.o", "head", heads, [o_member], layer))
        fams.append(_bias(params, f"layers.{layer}.attn.o_bias", f"{p}.attn.c_proj.bias", layer))
        combined = [
            _member(
                params,
                f"{p}.attn.c_attn.{s}",
                ax,
                [h if h >= 0 else -1 for h in _merge_thirds(third)],
                in_mask=False,
            )
            for s, ax in (("weight", 1), ("bias", 0))
        ]
        fams.append(
            _family(f"layers.{layer}.attn.heads", "heads", heads, [*combined, o_member], layer)
        )
        inner = getattr(config, "n_inner", None) or 4 * hidden
        fams += _neurons(
            params, layer, inner, [f"{p}.mlp.c_fc"], f"{p}.mlp.c_proj", transposed=True
        )
        for norm in ("ln_1", "ln_2"):
            fams.append(_norm(params, f"layers.{layer}.{norm}", f"{p}.{norm}", layer))
    fams.append(_norm(params, "final_norm", _find(params, "ln_f.weight", strip=".weight")))
    fams.append(_tokens(params, "lm_head", "lm_head.weight"))
    return fams


def _gpt_neox(model, config, params):
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    fams = [_tokens(params, "embed_in", _find(params, "embed_in.weight"))]
    for layer, p in _layers(params, r"(.*layers\.(\d+))\.attention\.query_key_value\.weight$"):
        qkv = f"{p}.attention.query_key_value"
        parts = [blocks(heads, d, 3 * hidden, offset=i * d, stride=3 * d) for i in range(3)]
        for tag, assign in zip("qkv", parts, strict=True):
            members = [
                _member(params, f"{qkv}.weight", 0, assign),
                _member(params, f"{qkv}.bias", 0, assign),
            ]
            fams.append(_family(f"layers.{layer}.attn.{tag}", "head", heads, members, layer))
        qa = blocks(heads, d, hidden)
        o_member = _member(params, f"{p}.attention.dense.weight", 1, qa)
        fams.append(_family(f"layers.{layer}.attn.o", "head", heads, [o_member], layer))
        o_bias = f"{p}.attention.dense.bias"
        fams.append(_bias(params, f"layers.{layer}.attn.o_bias", o_bias, layer))
        merged = _merge_thirds(parts)
        combined = [
            _member(params, f"{qkv}.weight", 0, merged, in_mask=False),
            _member(params, f"{qkv}.bias", 0, merged, in_mask=False),
        ]
        fams.append(
            _family(f"layers.{layer}.attn.heads", "heads", heads, [*combined, o_member], layer)
        )
        fams += _neurons(
            params,
            layer,
            config.intermediate_size,
            [f"{p}.mlp.dense_h_to_4h"],
            f"{p}.mlp.dense_4h_to_h",
        )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            fams.append(_norm(params, f"layers.{layer}.{norm}", f"{p}.{norm}", layer))
    fams.append(
        _norm(params, "final_norm", _find(params, "final_layer_norm.weight", strip=".weight"))
    )
    fams.append(_tokens(params, "lm_head", _find(params, "embed_out.weight") or "lm_head.weight"))
    return fams


def _bert(model, config, params):
    heads, hidden = config.num_attention_heads, config.hidden_size
    d = hidden // heads
    fams = [
        _tokens(params, "word_embeddings", _find(params, "embeddings.word_embeddings.weight")),
        _tokens(
            params,
            "position_embeddings",
            _find(params, "embeddings.position_embeddings.weight"),
            kind="position",
        ),
        _tokens(
            params,
            "token_type_embeddings",
            _find(params, "embeddings.token_type_embeddings.weight"),
            kind="position",
        ),
        _norm(
            params, "embeddings.norm", _find(params, "embeddings.LayerNorm.weight", strip=".weight")
        ),
    ]
    for layer, p in _layers(params, r"(.*layer\.(\d+))\.attention\.self\.query\.weight$"):
        s = f"{p}.attention.self"
        fams += _attention(
            params,
            layer,
            heads,
            heads,
            d,
            f"{s}.query",
            f"{s}.key",
            f"{s}.value",
            f"{p}.attention.output.dense",
        )
        fams += _neurons(
            params,
            layer,
            config.intermediate_size,
            [f"{p}.intermediate.dense"],
            f"{p}.output.dense",
        )
        fams.append(
            _norm(
                params, f"layers.{layer}.attention_norm", f"{p}.attention.output.LayerNorm", layer
            )
        )
        fams.append(_norm(params, f"layers.{layer}.output_norm", f"{p}.output.LayerNorm", layer))
    for prefix, name in (
        ("pooler.dense", "pooler"),
        ("classifier", "classifier"),
        ("cls.predictions.transform.dense", "mlm.transform"),
    ):
        key = _find(params, f"{prefix}.weight", strip=".weight")
        if key:
            rows = params[f"{key}.weight"].shape[0]
            fams.append(_rows_family(params, name, key, "channel", rows, 1))
    fams.append(
        _norm(
            params,
            "mlm.norm",
            _find(params, "cls.predictions.transform.LayerNorm.weight", strip=".weight"),
        )
    )
    fams.append(_tokens(params, "mlm.bias", _find(params, "cls.predictions.bias")))
    fams.append(_tokens(params, "mlm.decoder", _find(params, "cls.predictions.decoder.weight")))
    return fams


def _equilibrium_transformer(model, config, params):
    """gradstats.eqprop's EquilibriumTransformer: one block (layer 0), untied per-head
    parameters ``attn.heads.{h}.query/key/value`` [d, C], ``.out`` [C, d], qk-norm gains [d]."""
    heads = model.n_heads
    fams = [
        _tokens(params, "embed_tokens", "embed.token"),
        _tokens(params, "embed_positions", "embed.position", kind="position"),
        _norm(params, "layers.0.attn_norm", "attn.norm", 0),
        _norm(params, "layers.0.ffn_norm", "ffn.norm", 0),
        _norm(params, "final_norm", "readout.norm"),
        _tokens(params, "lm_head", "readout.proj"),
    ]

    def per_head(suffix, axis, in_mask=True):
        out = []
        for h in range(heads):
            key = f"attn.heads.{h}.{suffix}"
            if key in params:
                out.append(Member(key, axis, (h,) * params[key].shape[axis], in_mask))
        return out

    for tag, suffix in (("q", "query"), ("k", "key"), ("v", "value")):
        fams.append(_family(f"layers.0.attn.{tag}", "head", heads, per_head(suffix, 0), 0))
    fams.append(_family("layers.0.attn.o", "head", heads, per_head("out", 1), 0))
    combined = [*per_head("out", 1)]
    for suffix in ("query", "key", "value", "q_norm", "k_norm"):
        combined += per_head(suffix, 0, in_mask=False)
    fams.append(_family("layers.0.attn.heads", "heads", heads, combined, 0))
    if "ffn.up.weight" in params:
        size = params["ffn.up.weight"].shape[0]
        tied = "ffn.down.weight" not in params  # energy mode: no output projection
        fams += _neurons(params, 0, size, ["ffn.up"], "ffn.down")
        if tied:
            assign = tuple(range(size))
            members = [Member("ffn.up.weight", 0, assign), Member("ffn.up.bias", 0, assign)]
            fams[-2] = _family("layers.0.mlp.neurons", "neurons", size, members, 0)
    return fams


for _type in ("llama", "mistral", "qwen2", "qwen3"):
    register_architecture(_type, _llama_like)
register_architecture("gpt2", _gpt2)
register_architecture("gpt_neox", _gpt_neox)
register_architecture("bert", _bert)
register_architecture("EquilibriumTransformer", _equilibrium_transformer)


def _generic(model: nn.Module, params) -> list[GroupFamily | None]:
    """Models without a config: output channels of Linear/Conv modules, norms, embedding rows."""
    fams = []
    for name, module in model.named_modules():
        prefix = name or "root"
        key = f"{name}.weight" if name else "weight"
        if key not in params:
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(module):
            transposed = is_hf_conv1d(module)
            assign = tuple(range(params[key].shape[1 if transposed else 0]))
            members = [Member(key, 1 if transposed else 0, assign)]
            bias = f"{name}.bias" if name else "bias"
            if bias in params:
                members.append(Member(bias, 0, assign))
            fams.append(_family(prefix, "channel", len(assign), members))
        elif isinstance(module, nn.Embedding):
            fams.append(_tokens(params, prefix, key))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(
            "RMSNorm"
        ):
            fams.append(_norm(params, prefix, key[: -len(".weight")] if name else ""))
    return fams


def build_groups(
    model: nn.Module, params: dict[str, torch.Tensor], groups: object
) -> GroupMap | None:
    """The group map for ``groups`` = ``"auto"``, ``None``, a :class:`GroupMap` or families.

    ``"auto"``: the registry entry of the model's class name or ``model.config.model_type``;
    models without either get
    output-channel groups of their Linear/Conv modules. Parameters no family covers are listed
    in ``unmapped`` with a warning; an HF model of an unregistered type maps nothing (warning).
    """
    if groups is None:
        return None
    if isinstance(groups, GroupMap):
        result = GroupMap(list(groups.families), list(groups.unmapped), groups.source)
    elif isinstance(groups, Iterable) and not isinstance(groups, str):
        result = GroupMap(list(groups), [], "user")
    elif groups == "auto":
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if type(model).__name__ in _REGISTRY:  # models registered by class name
            model_type = type(model).__name__
        if model_type is None:
            generic = [f for f in _generic(model, params) if f is not None]
            result = GroupMap(generic, [], "generic")
        elif model_type in _REGISTRY:
            result = GroupMap(_REGISTRY[model_type](model, config, params), [], model_type)
        else:
            warn(
                f"no group map is registered for model_type={model_type!r} (registered: "
                f"{', '.join(registered_architectures())}); every parameter is 'unmapped'. "
                "Register one with gradstats.fisher.register_architecture.",
            )
            result = GroupMap([], [], model_type)
    else:
        raise ConfigurationError(
            f"groups must be 'auto', None, a GroupMap or a list of GroupFamily; got {groups!r}"
        )
    result.families = [f for f in result.families if f is not None]
    wrong = [f for f in result.families if not isinstance(f, GroupFamily)]
    if wrong:
        raise ConfigurationTypeError(
            f"groups must hold GroupFamily objects; got a {type(wrong[0]).__name__}"
        )
    check_families(result.families, {n: tuple(p.shape) for n, p in params.items()})
    covered = {m.param for f in result.families for m in f.members}
    missing = [n for n in params if n not in covered and n not in result.unmapped]
    registered = result.source in _REGISTRY or result.source == "generic"
    if missing and registered:  # (an unregistered type has already been warned about)
        warn(
            f"{len(missing)} parameter(s) have no group (reported under 'unmapped'): "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}",
        )
    result.unmapped = [n for n in params if n not in covered]
    return result


def check_families(families: list[GroupFamily], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Family names unique, members on known parameters, assignments fitting their axis."""
    names = set()
    for fam in families:
        if fam.name in names:
            raise ConfigurationError(f"duplicate group family name {fam.name!r}")
        names.add(fam.name)
        for m in fam.members:
            if m.param not in shapes:
                raise ConfigurationError(
                    f"group family {fam.name!r} names unknown parameter {m.param!r}"
                )
            shape = tuple(shapes[m.param])
            if not 0 <= m.axis < len(shape) or shape[m.axis] != len(m.assign):
                raise ConfigurationError(
                    f"group family {fam.name!r}: assign has {len(m.assign)} entries but "
                    f"{m.param!r} has shape {shape} (axis {m.axis})"
                )
            if any(a < -1 or a >= fam.size for a in m.assign):
                raise ConfigurationError(
                    f"group family {fam.name!r}: assign values must be in [-1, {fam.size})"
                )
