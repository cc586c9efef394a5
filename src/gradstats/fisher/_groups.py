r"""Structured groups of parameters (heads, KV heads, FFN neurons, channels, tokens), from the
model's config through an architecture registry — never guessed from shapes.

A :class:`GroupFamily` is a set of G groups; each member says which parameter, along which axis,
and which index goes to which group (``assign[j]`` in [0, G), or −1 for "in no group"). Layout
facts the registry encodes:

* ``nn.Linear`` W [out, in]: a row is an output feature, a column an input feature.
* Hugging Face GPT-2 ``Conv1D`` W [in, out] is transposed: its *columns* are output features.
* Query head h owns rows [h·d, (h+1)·d) of q_proj with d = ``config.head_dim`` when the config
  has it (Qwen3, Llama with explicit head_dim), else hidden_size / num_attention_heads.
* K/V heads g < ``num_key_value_heads`` (GQA); the output projection's head h owns **columns**
  [h·d, (h+1)·d) — the head's context vector enters o_proj there.
* Fused QKV: GPT-2 ``c_attn`` is [q | k | v] in thirds of its columns; GPT-NeoX
  ``query_key_value`` interleaves per head, rows [h·3d, h·3d + d) = q_h, then k_h, then v_h.
* Embedding rows are tokens.

Per family two exact quantities are reported by the collector: ``trace`` Σ_{j ∈ k} F_jj and
``mask`` E[(Σ_{j ∈ mask set of k} θ_j g_j)²], the Fisher of a multiplicative mask on the
group's output (members with ``in_mask=True``: a head's o_proj columns, a neuron's down_proj
column, a channel's row and bias).

Register another architecture with :func:`register_architecture` (``model_type`` or class
name → builder); the builders of the supported architectures are in ``_architectures.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gradstats.errors import ConfigurationError

__all__ = [
    "GroupFamily",
    "GroupMap",
    "Member",
    "register_architecture",
    "registered_architectures",
]


@dataclass(frozen=True)
class Member:
    """Part of a family: ``assign`` (length = size of ``axis`` of ``param``) maps to groups."""

    param: str
    axis: int
    assign: tuple[int, ...]
    in_mask: bool = True


@dataclass(frozen=True)
class GroupFamily:
    """G groups of one kind in one place (e.g. the 32 query heads of layer 3)."""

    name: str
    kind: str  # head | kv_head | heads | neurons | channel | norm | token | position | unmapped
    size: int
    members: tuple[Member, ...]
    layer: int | None = None
    per_unit: bool = True  # per-unit values (mask quantity, standard errors) are computed

    def group_names(self) -> list[str]:
        return [f"{self.name}.{k}" for k in range(self.size)]


@dataclass
class GroupMap:
    """Families plus the parameters no family covers (reported, never silently grouped)."""

    families: list[GroupFamily] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    source: str = "user"

    def family(self, name: str) -> GroupFamily:
        for fam in self.families:
            if fam.name == name:
                return fam
        raise ConfigurationError(
            f"no group family {name!r}; families: {[f.name for f in self.families]}"
        )


def blocks(n_groups: int, size: int, total: int, offset: int = 0, stride: int = 0) -> list[int]:
    """assign vector of length ``total``: group k owns [offset + k·step, offset + k·step + size)
    with step = ``stride`` or ``size``; everything else is −1."""
    step = stride or size
    assign = [-1] * total
    for k in range(n_groups):
        start = offset + k * step
        for j in range(start, start + size):
            assign[j] = k
    return assign


def whole(total: int) -> list[int]:
    return [0] * total


Builder = Callable[[nn.Module, object, dict[str, torch.Tensor]], list[GroupFamily]]
_REGISTRY: dict[str, Builder] = {}


def register_architecture(model_type: str, builder: Builder) -> None:
    """Register ``builder(model, config, params) -> list[GroupFamily]`` for ``model_type`` (a
    Hugging Face ``config.model_type``, or a model class name, which is looked up first).

    ``params`` maps parameter names (as in ``named_parameters()``) to tensors. Families must be
    built from the config's head counts and sizes; the builder should raise a ``ValueError`` when
    a parameter's shape contradicts the config.
    """
    _REGISTRY[model_type] = builder


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def _member(params, name, axis, assign, in_mask=True) -> Member | None:
    if name not in params:
        return None
    shape = tuple(params[name].shape)
    if axis >= len(shape) or shape[axis] != len(assign):
        raise ConfigurationError(
            f"parameter {name!r} has shape {shape} but the config implies {len(assign)} entries "
            f"along axis {axis}; the group map does not fit this model"
        )
    return Member(name, axis, tuple(assign), in_mask)


def _family(name, kind, size, members, layer=None, per_unit=True) -> GroupFamily | None:
    members = tuple(m for m in members if m is not None)
    if not members:
        return None
    return GroupFamily(name, kind, size, members, layer, per_unit)


def _rows_family(params, name, prefix, kind, size, group, layer=None, transposed=False, bias=True):
    """Output-feature groups of a Linear (rows) or Conv1D (columns) ``prefix`` + bias."""
    weight = params.get(f"{prefix}.weight")
    if weight is None:
        return None
    total = weight.shape[1 if transposed else 0]
    assign = blocks(size, group, total) if size * group == total else None
    if assign is None:
        raise ConfigurationError(
            f"{prefix}.weight has {total} output features but the config implies {size}×{group}"
        )
    members = [_member(params, f"{prefix}.weight", 1 if transposed else 0, assign)]
    if bias:
        members.append(_member(params, f"{prefix}.bias", 0, assign))
    return _family(name, kind, size, members, layer)


def _bias(params, name, key, layer=None):
    """A residual-stream bias (of an output projection): one group, not split by head/neuron."""
    if key not in params:
        return None
    return _family(name, "bias", 1, [Member(key, 0, tuple(whole(params[key].shape[0])))], layer)


def _norm(params, name, prefix, layer=None):
    members = []
    for suffix in ("weight", "bias"):
        key = f"{prefix}.{suffix}"
        if key in params:
            members.append(Member(key, 0, tuple(whole(params[key].shape[0]))))
    return _family(name, "norm", 1, members, layer)


def _tokens(params, name, key, kind="token"):
    if key not in params:
        return None
    rows = params[key].shape[0]
    return _family(name, kind, rows, [Member(key, 0, tuple(range(rows)))], per_unit=False)


def _attention(params, layer, heads, kv_heads, head_dim, q, k, v, o, *, transposed=False):
    """q/k/v rows and o columns per head (transposed: Conv1D layout), plus the combined family."""
    qa = blocks(heads, head_dim, heads * head_dim)
    ka = blocks(kv_heads, head_dim, kv_heads * head_dim)
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    fams = []
    for tag, prefix, n, assign in (
        ("q", q, heads, qa),
        ("k", k, kv_heads, ka),
        ("v", v, kv_heads, ka),
    ):
        members = [
            _member(params, f"{prefix}.weight", out_axis, assign),
            _member(params, f"{prefix}.bias", 0, assign),
        ]
        fams.append(
            _family(
                f"layers.{layer}.attn.{tag}", "head" if tag == "q" else "kv_head", n, members, layer
            )
        )
    o_member = _member(params, f"{o}.weight", in_axis, qa)
    fams.append(_family(f"layers.{layer}.attn.o", "head", heads, [o_member], layer))
    fams.append(_bias(params, f"layers.{layer}.attn.o_bias", f"{o}.bias", layer))
    combined = [
        _member(params, f"{q}.weight", out_axis, qa, in_mask=False),
        _member(params, f"{q}.bias", 0, qa, in_mask=False),
        o_member,
    ]
    if kv_heads == heads:  # without GQA a head also owns its own K and V rows
        for prefix in (k, v):
            combined.append(_member(params, f"{prefix}.weight", out_axis, qa, in_mask=False))
            combined.append(_member(params, f"{prefix}.bias", 0, qa, in_mask=False))
    fams.append(_family(f"layers.{layer}.attn.heads", "heads", heads, combined, layer))
    return fams


def _neurons(params, layer, size, ins: Sequence[str], out: str, *, transposed=False):
    """FFN neurons: rows of the input projections (+bias), columns of the output projection."""
    assign = list(range(size))
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    members = []
    for prefix in ins:
        members.append(_member(params, f"{prefix}.weight", out_axis, assign, in_mask=False))
        members.append(_member(params, f"{prefix}.bias", 0, assign, in_mask=False))
    members.append(_member(params, f"{out}.weight", in_axis, assign))
    neurons = _family(f"layers.{layer}.mlp.neurons", "neurons", size, members, layer)
    return [neurons, _bias(params, f"layers.{layer}.mlp.out_bias", f"{out}.bias", layer)]


def _layers(params, pattern: str) -> list[tuple[int, str]]:
    found = {}
    for name in params:
        match = re.match(pattern, name)
        if match:
            found[int(match.group(2))] = match.group(1)
    return sorted(found.items())


def _head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def _merge_thirds(thirds: list[list[int]]) -> list[int]:
    return [max(values) for values in zip(*thirds, strict=True)]


def _find(params, suffix: str, strip: str = "") -> str | None:
    """The unique parameter name ending in ``suffix`` (minus ``strip``), or None."""
    hits = [n for n in params if n == suffix or n.endswith("." + suffix)]
    if len(hits) > 1:
        raise ConfigurationError(f"several parameters end in {suffix!r}: {hits}")
    if not hits:
        return None
    return hits[0][: len(hits[0]) - len(strip)] if strip else hits[0]
