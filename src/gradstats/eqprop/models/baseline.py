"""The backprop baseline: the equilibrium transformer's block as a standard feed-forward stack.

Each of ``n_layers`` layers is a standard pre-LN transformer layer built from the same modules
as :class:`~gradstats.eqprop.models.EquilibriumTransformer`'s thick block (causal attention with
untied per-head Q/K/V/O and qk-norm, 4× tanh-GELU FFN):

    x₀ = tok[idx] + pos,  x ← x + Attn(LN_a x),  x ← x + FFN(LN_f x),  logits = LN_r(x) W_outᵀ.

With ``n_layers=1`` it has exactly the parameters of the equilibrium block. It is trained by
ordinary backpropagation and is the reference point of the trainer's comparisons.
Parameter names: ``embed.*`` and ``readout.*`` as in the equilibrium model, and
``layers.{l}.attn.*`` / ``layers.{l}.ffn.*`` per layer.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gradstats._validation import check_positive_int
from gradstats.eqprop._settings import check_float
from gradstats.eqprop.models._blocks import CausalAttention, Embedding, FeedForward, Readout
from gradstats.eqprop.models.transformer import check_token_ids
from gradstats.errors import ConfigurationError, ConfigurationTypeError

__all__ = ["BackpropTransformer"]


class _Layer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, qk_norm: bool, ffn_mult: int) -> None:
        super().__init__()
        self.attn = CausalAttention(d_model, n_heads, qk_norm)
        self.ffn = FeedForward(d_model, ffn_mult * d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(F.layer_norm(x, x.shape[-1:], self.attn.norm.weight, self.attn.norm.bias))
        h = F.layer_norm(x, x.shape[-1:], self.ffn.norm.weight, self.ffn.norm.bias)
        return x + self.ffn(h)


class BackpropTransformer(nn.Module):
    """A standard causal transformer LM (``n_layers`` pre-LN layers), trained by backprop.

    Args: as :class:`~gradstats.eqprop.models.EquilibriumTransformer`, plus ``n_layers``.
    """

    #: Architecture key for registries (e.g. the Fisher collector's group map).
    model_type: ClassVar[str] = "eqprop_backprop_transformer"

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int = 1,
        qk_norm: bool = True,
        *,
        ffn_mult: int = 4,
        init_std: float = 0.02,
        embed_std: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("ffn_mult", ffn_mult),
        ):
            check_positive_int(name, value)
        if d_model % n_heads:
            raise ConfigurationError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if not isinstance(qk_norm, bool):
            raise ConfigurationTypeError(f"qk_norm must be a bool; got {type(qk_norm).__name__}")
        self._config = {
            "vocab_size": vocab_size,
            "block_size": block_size,
            "d_model": d_model,
            "n_heads": n_heads,
            "n_layers": n_layers,
            "qk_norm": qk_norm,
            "ffn_mult": ffn_mult,
            "init_std": check_float("init_std", init_std),
            "embed_std": check_float("embed_std", embed_std),
        }
        self.block_size = block_size
        self.embed = Embedding(vocab_size, block_size, d_model)
        self.layers = nn.ModuleList(
            _Layer(d_model, n_heads, qk_norm, ffn_mult) for _ in range(n_layers)
        )
        self.readout = Readout(vocab_size, d_model)
        self._init(generator, float(init_std), float(embed_std))

    def each_layer(self) -> list[_Layer]:
        """The layers, typed."""
        return [layer for layer in self.layers if isinstance(layer, _Layer)]

    @torch.no_grad()
    def _init(self, generator: torch.Generator | None, std: float, embed_std: float) -> None:
        def normal(p: torch.Tensor, s: float) -> None:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * s)

        normal(self.embed.token, embed_std)
        normal(self.embed.position, std)
        for layer in self.each_layer():
            for head in layer.attn.each_head():
                for name in ("query", "key", "value"):
                    normal(getattr(head, name), std)
                normal(head.out, std / math.sqrt(2))
            normal(layer.ffn.up.weight, std)
            layer.ffn.up.bias.zero_()
            if layer.ffn.down is not None:
                normal(layer.ffn.down.weight, std / math.sqrt(2))
                layer.ffn.down.bias.zero_()
        normal(self.readout.proj, std)

    def config(self) -> dict[str, object]:
        """The constructor arguments."""
        return dict(self._config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` for token ids ``idx`` ``[B, T]``."""
        x = self.embed(check_token_ids(idx, self.block_size))
        for layer in self.layers:
            x = layer(x)
        return self.readout(x)

    def loss(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_{b,t} CE (summed over tokens, like the equilibrium model's loss)."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
