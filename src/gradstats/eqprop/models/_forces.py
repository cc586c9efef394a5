"""The equilibrium block's force for every mode, shared by the model and by generation.

With injection x = tok[idx] + pos, damping c, LN_a / LN_f the block's LayerNorms and ``attend``
the causal attention applied to an already normalised input (the model's own heads, or
generation's KV cache):

* ``thick``:   F(z) = x − (1 + c) z + Attn(LN_a z) + FFN(LN_f z);
* ``real``:    F(z) = x − (1 + c) z + Attn(LN_a z);
* ``energy``:  F(z) = x − (1 + c) z + Attn(LN_a z) − ∇_z E(z) (the tied Hopfield FFN);
* ``layered``: the state holds one sub-state per sub-layer, z = [a ‖ h] (2C features), and

      u   = (1 − γ) x + γ h                       (what attention reads; γ = ``feedback``),
      F_a = x + Attn(LN_a u) − (1 + c) a,
      F_h = a + FFN(LN_f a) − (1 + c) h.

  The coupling runs forward (x → a → h) except through γ. At γ = 0 the Jacobian of the map
  z ← z + F(z)/(1 + c) is nilpotent: from any start the map reaches the fixed point in two
  steps. With c = 0 that fixed point is the pre-LN transformer layer a = x + Attn(LN_a x),
  h = a + FFN(LN_f a), exactly the backprop baseline's layer; with c > 0 it is
  a = (x + Attn(LN_a x))/(1 + c), h = (a + FFN(LN_f a))/(1 + c): the stream shrinks by 1/(1 + c)
  after each sub-layer, so the FFN's branch weighs (1 + c)× more against its residual than in
  the baseline (the trainer's default damping is 1: give ``--damping 0`` for the baseline's
  layer). At γ > 0 the block's output feeds back
  into its attention and the fixed point is a genuine equilibrium (a weight-tied network of
  unbounded depth at γ = 1).

Noise masks (``noise["attn"]``, ``noise["ffn"]``, [B, T, C]) multiply the two branch outputs.
Every op is the holomorphic one of ``_blocks`` (``thick`` and ``layered`` accept complex z).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from gradstats.eqprop.models._blocks import CausalAttention, FeedForward, layer_norm

if TYPE_CHECKING:
    from gradstats.eqprop._module import NoiseRealization

__all__ = ["Attend", "Block", "attention_input", "block_force", "readout_state"]

#: Causal attention of a normalised input [B, n, C] → its output [B, n, C].
Attend = Callable[[torch.Tensor], torch.Tensor]


class Block(Protocol):
    """What the force reads of an ``EquilibriumTransformer`` (no import of it: no cycle)."""

    @property
    def mode(self) -> str | None: ...
    @property
    def feedback(self) -> float: ...
    @property
    def damping(self) -> float: ...
    @property
    def d_model(self) -> int: ...
    @property
    def attn(self) -> CausalAttention: ...
    @property
    def ffn(self) -> FeedForward | None: ...


def _halves(model: Block, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = model.d_model
    return z[..., :c], z[..., c:]


def attention_input(model: Block, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What attention reads (before LN_a): z, or u = (1 − γ) x + γ h in ``layered`` mode."""
    if model.mode != "layered":
        return z
    gamma, x = model.feedback, x.to(z.dtype)
    if gamma == 0:
        return x
    return (1.0 - gamma) * x + gamma * _halves(model, z)[1]


def readout_state(model: Block, z: torch.Tensor) -> torch.Tensor:
    """The part of the state the readout reads: z, or h in ``layered`` mode."""
    return _halves(model, z)[1] if model.mode == "layered" else z


def block_force(
    model: Block,
    z: torch.Tensor,
    x: torch.Tensor,
    attend: Attend,
    noise: NoiseRealization | None = None,
) -> torch.Tensor:
    """F(z; x) of ``model``'s mode (module docstring), attention given by ``attend``."""
    x = x.to(z.dtype)
    gain = 1.0 + model.damping
    attn = attend(layer_norm(attention_input(model, z, x), model.attn.norm))
    if noise is not None:
        attn = attn * noise["attn"].to(z.dtype)
    ffn_in = _halves(model, z)[0] if model.mode == "layered" else z
    ffn = None
    if model.ffn is not None:
        ffn = (
            model.ffn.energy_force(ffn_in)
            if model.mode == "energy"
            else model.ffn(layer_norm(ffn_in, model.ffn.norm))
        )
        if noise is not None:
            ffn = ffn * noise["ffn"].to(z.dtype)
    if model.mode == "layered":
        assert ffn is not None  # the layered block always has its FFN
        a, h = _halves(model, z)
        return torch.cat([x + attn - gain * a, a + ffn - gain * h], dim=-1)
    out = x - gain * z + attn
    return out if ffn is None else out + ffn
