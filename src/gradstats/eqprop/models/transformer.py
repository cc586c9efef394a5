"""The equilibrium transformer: one causal transformer block run to its fixed point.

State z ∈ R^{B×T×C}; input injection x_in = tok[idx] + pos[:T]; the ``thick`` force

    F(z) = −(z − x_in) + Attn(LN_a z) + FFN(LN_f z) − c·z,

with causal softmax attention (untied per-head Q/K/V/O, optional qk-norm), a 4× tanh-GELU FFN
and damping c. The fixed point solves (1 + c) z* = x_in + Attn + FFN; relaxation
z ← z + ε F(z) with the default ε = 1/(1 + c) is the plain fixed-point map.
Loss: L(z, y) = Σ_{b,t} CE(LN_r(z_bt) W_outᵀ, y_bt) — *summed* over tokens, so the nudge
β∇L moves each token's state by O(β) whatever the batch and block size (a mean over B·T tokens
would push the EP contrast below float32 resolution); the trainer divides by B·T.

Modes (``attn_mode``):

* ``thick``: the force above; holomorphic (every op has a complex-analytic extension equal to
  the real op on the real axis), so it supports every estimator including ``holomorphic``.
* ``real``: the attention force only, F = −(z − x_in) + Attn(LN_a z) − c·z (no FFN).
* ``energy``: attention force plus a conservative Hopfield FFN, F_ffn = −∇_z E with
  E(z) = −½ Σ relu(W₁ LN_f(z) + b₁)² (tied weights; J_ffn symmetric).
* ``layered``: one sub-state per sub-layer, z = [a ‖ h] ∈ R^{B×T×2C}, coupled forward
  (a = x_in + Attn(LN_a u), h = a + FFN(LN_f a), up to the damping) with attention reading
  u = (1 − γ) x_in + γ h (``feedback`` γ): at γ = 0 the fixed point is the feed-forward
  transformer layer, reached in two map steps; the readout reads h. See ``_forces``.

``real`` and ``energy`` are real-valued only: ``method="holomorphic"`` is rejected by name.

Parameter names (stable; the probe groups and the Fisher registry use them), H heads of size
d = C/H:

* ``embed.token`` [V, C], ``embed.position`` [block_size, C];
* ``attn.norm.weight``/``.bias`` [C]; per head h: ``attn.heads.{h}.query``/``.key``/``.value``
  [d, C] (rows = the head's features), ``attn.heads.{h}.out`` [C, d] (the head's context enters
  here), with qk-norm ``attn.heads.{h}.q_norm``/``.k_norm`` [d];
* ``ffn.norm.weight``/``.bias`` [C], ``ffn.up.weight`` [4C, C], ``ffn.up.bias`` [4C],
  ``ffn.down.weight`` [C, 4C], ``ffn.down.bias`` [C] (``energy`` mode: no ``ffn.down``);
* ``readout.norm.weight``/``.bias`` [C], ``readout.proj.weight`` [V, C].
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F

from gradstats._validation import check_choice, check_positive_int
from gradstats.eqprop._autodiff import Linearization
from gradstats.eqprop._holo_ops import holo_cross_entropy
from gradstats.eqprop._module import EquilibriumModule, NoiseRealization
from gradstats.eqprop._settings import check_float
from gradstats.eqprop.models._blocks import (
    CausalAttention,
    Embedding,
    FeedForward,
    Readout,
    primitive_norms,
)
from gradstats.eqprop.models._forces import block_force, readout_state
from gradstats.errors import ConfigurationError, ConfigurationTypeError

# CausalAttention and FeedForward are re-exported (they lived here before).
__all__ = ["HOLOMORPHIC_MODES", "MODES", "CausalAttention", "EquilibriumTransformer", "FeedForward"]

MODES = ("thick", "real", "energy", "layered")
HOLOMORPHIC_MODES = ("thick", "layered")


def check_token_ids(idx: object, block_size: int) -> torch.Tensor:
    """Return ``idx`` if it is an integer tensor of token ids [B, T] with T ≤ ``block_size``."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
        what = (
            f"a {idx.dtype} tensor of shape {tuple(idx.shape)}"
            if isinstance(idx, torch.Tensor)
            else type(idx).__name__
        )
        raise ConfigurationTypeError(
            f"idx must be an integer tensor of token ids shaped [B, T]; got {what}"
        )
    if idx.shape[1] > block_size:
        raise ConfigurationError(
            f"idx has sequence length {idx.shape[1]}, which exceeds block_size={block_size}"
        )
    return idx


class EquilibriumTransformer(EquilibriumModule):
    """A causal transformer block at its fixed point, trainable without backprop.

    See the module docstring for the force, the modes and the parameter names.

    Args:
        vocab_size: number of tokens V.
        block_size: maximum sequence length (rows of ``embed.position``).
        d_model: state width C (divisible by ``n_heads``).
        n_heads: attention heads H.
        damping: c ≥ 0 in −c·z (c ≥ 1 keeps the fixed point stable at any attention strength).
        attn_mode: ``"thick"``, ``"real"``, ``"energy"`` or ``"layered"``.
        qk_norm: LayerNorm on queries and keys (per head, with gains).
        ffn_mult: FFN hidden width as a multiple of C.
        feedback: γ ∈ [0, 1] of the ``layered`` mode (0 elsewhere): the weight of the block's
            output in what its attention reads.
        force_noise: σ of a multiplicative noise (1 + σ·N(0, 1)) on the attention and FFN
            outputs, drawn once per estimate by :meth:`sample_noise` (0: no noise).
        init_std: standard deviation of the block's weight matrices (output projections are
            scaled by 1/√2).
        embed_std: standard deviation of the token embeddings (positions: ``init_std``).
        generator: for the initialisation.
    """

    #: Architecture key for registries (e.g. the Fisher collector's group map).
    model_type: ClassVar[str] = "eqprop_transformer"

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        d_model: int,
        n_heads: int,
        damping: float = 1.0,
        attn_mode: str = "thick",
        qk_norm: bool = True,
        *,
        ffn_mult: int = 4,
        feedback: float = 0.0,
        force_noise: float = 0.0,
        init_std: float = 0.02,
        embed_std: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("block_size", block_size)
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        check_positive_int("ffn_mult", ffn_mult)
        check_choice("attn_mode", attn_mode, MODES)
        if d_model % n_heads:
            raise ConfigurationError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        for name, value in (("damping", damping), ("force_noise", force_noise)):
            check_float(name, value, allow_zero=True)
        check_float("init_std", init_std)
        feedback = check_float("feedback", feedback, allow_zero=True)
        if feedback > 1 or (feedback and attn_mode != "layered"):
            raise ConfigurationError(
                f"feedback must be in [0, 1] and is a parameter of attn_mode='layered' only; got "
                f"feedback={feedback:g} with attn_mode={attn_mode!r}"
            )
        check_float("embed_std", embed_std)
        if not isinstance(qk_norm, bool):
            raise ConfigurationTypeError(f"qk_norm must be a bool; got {type(qk_norm).__name__}")
        self.vocab_size, self.block_size, self.d_model = vocab_size, block_size, d_model
        self.n_heads, self.damping, self.qk_norm = n_heads, float(damping), qk_norm
        self.ffn_mult, self.force_noise = ffn_mult, float(force_noise)
        self.feedback = float(feedback)
        self.init_std, self.embed_std = float(init_std), float(embed_std)
        self.mode = attn_mode
        self.holomorphic = attn_mode in HOLOMORPHIC_MODES
        self._map_step: float | None = None
        # ε = 1/(1 + c): z ← z + εF(z) is then the plain map z ← (x_in + Attn + FFN)/(1 + c).
        # Nudges act per token (the loss is token-summed). Holomorphic r = 0.1: on a trained
        # small-config model r ≥ 0.25 leaves the nudged phases unconverged (rel. error 3–11%),
        # r = 0.0625–0.125 converges in 10 steps (rel. error 1e-4–2e-3).
        self.solver_defaults = {
            "step_size": 1.0 / (1.0 + self.damping),
            "max_steps": 200,
            "max_steps_adjoint": 400,
            "beta": {"ep": 0.01, "ep_symmetric": 0.05, "aep": 0.05, "holomorphic": 0.1},
            "points": 4,
        }
        self.embed = Embedding(vocab_size, block_size, d_model)
        self.attn = CausalAttention(d_model, n_heads, qk_norm)
        self.ffn = (
            None
            if attn_mode == "real"
            else FeedForward(d_model, ffn_mult * d_model, tied=attn_mode == "energy")
        )
        self.readout = Readout(vocab_size, d_model)
        self.reset_parameters(generator)

    # ----------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gaussian weights (``init_std``; output projections /√2), zero biases, unit gains.

        Every parameter is (re)set: token embeddings ~ N(0, ``embed_std``²), positions and the
        block's matrices ~ N(0, ``init_std``²), the FFN biases and all LayerNorm biases zero, all
        LayerNorm weights and the qk-norm gains one.
        """

        def normal(p: torch.Tensor, std: float) -> None:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)

        normal(self.embed.token, self.embed_std)
        normal(self.embed.position, self.init_std)
        for head in self.attn.each_head():
            for name in ("query", "key", "value"):
                normal(getattr(head, name), self.init_std)
            normal(head.out, self.init_std / math.sqrt(2))
        if self.ffn is not None:
            normal(self.ffn.up.weight, self.init_std)
            self.ffn.up.bias.zero_()
            if self.ffn.down is not None:
                normal(self.ffn.down.weight, self.init_std / math.sqrt(2))
                self.ffn.down.bias.zero_()
        normal(self.readout.proj, self.init_std)
        norms = [self.attn.norm, self.readout.norm] + ([self.ffn.norm] if self.ffn else [])
        for norm in norms:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        if self.qk_norm:
            for head in self.attn.each_head():
                head.q_norm.fill_(1.0)
                head.k_norm.fill_(1.0)

    def config(self) -> dict[str, object]:
        """The constructor arguments (enough to rebuild the model; echoed by the probe).
        ``feedback`` only in ``layered`` mode (other modes' configs and fingerprints unchanged)."""
        extra: dict[str, object] = {"feedback": self.feedback} if self.mode == "layered" else {}
        config: dict[str, object] = {
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "damping": self.damping,
            "attn_mode": self.mode,
            "qk_norm": self.qk_norm,
            "ffn_mult": self.ffn_mult,
            "force_noise": self.force_noise,
            "init_std": self.init_std,
            "embed_std": self.embed_std,
        }
        return config | extra

    def parameter_groups(self) -> dict[str, list[str]]:
        """Groups by block part — ``embed``, ``attn``, ``ffn``, ``ln``, ``readout`` — and per
        attention head (``attn.head{h}``: its Q/K/V/O and qk-norm gains). ``ln`` holds the two
        block LayerNorms (``attn.norm``, ``ffn.norm``); ``readout`` its own norm and projection.
        """
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        groups: dict[str, list[str]] = {
            "embed": [n for n in names if n.startswith("embed.")],
            "attn": [n for n in names if n.startswith("attn.heads.")],
        }
        for h in range(self.n_heads):
            groups[f"attn.head{h}"] = [n for n in names if n.startswith(f"attn.heads.{h}.")]
        groups["ffn"] = [n for n in names if n.startswith(("ffn.up.", "ffn.down."))]
        groups["ln"] = [n for n in names if n.startswith(("attn.norm.", "ffn.norm."))]
        groups["readout"] = [n for n in names if n.startswith("readout.")]
        return {k: v for k, v in groups.items() if v}

    # ----------------------------------------------------------------------------- dynamics
    def inject(self, idx: torch.Tensor) -> torch.Tensor:
        """x_in = tok[idx] + pos[:T] for token ids ``idx`` [B, T] (T ≤ block_size)."""
        check_token_ids(idx, self.block_size)
        return self.embed(idx)

    @property
    def state_features(self) -> int:
        """Features per token of the state z (2C in ``layered`` mode: [a ‖ h])."""
        return 2 * self.d_model if self.mode == "layered" else self.d_model

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        """z₀ = x_in/(1 + c) (both halves in ``layered`` mode): the fixed point when attention
        and FFN output nothing."""
        z0 = x / (1.0 + self.damping)
        return torch.cat([z0, z0], dim=-1) if self.mode == "layered" else z0

    def sample_noise(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> NoiseRealization | None:
        """Masks 1 + σ·N(0, 1) for the attention and FFN outputs ([B, T, C]); None if σ = 0."""
        if self.force_noise == 0:
            return None
        tensors = {}
        for name in ("attn", "ffn"):
            draw = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            tensors[name] = 1 + self.force_noise * draw
        return NoiseRealization(tensors)

    def force(
        self, z: torch.Tensor, x: torch.Tensor, noise: NoiseRealization | None = None
    ) -> torch.Tensor:
        """F(z; x_in) of the current mode (``_forces.block_force``; complex ``z`` only in the
        holomorphic modes ``thick`` and ``layered``).

        Inside :meth:`relaxation_map` it returns Φ(z) = z + εF(z) instead.
        """
        if self._map_step is not None:
            step, self._map_step = self._map_step, None
            try:
                return z + step * self.force(z, x, noise)
            finally:
                self._map_step = step
        if z.is_complex() and not self.holomorphic:
            raise ConfigurationError(
                f"{self.describe()} has no complex extension (use attn_mode='thick' or 'layered')"
            )
        return block_force(self, z, x, self.attn, noise)

    def higher_order(self) -> contextlib.AbstractContextManager[None]:
        """LayerNorms from primitive ops within the block (see ``_blocks.primitive_norms``):
        the penalties' parameter gradients are third derivatives, which torch's fused
        ``layer_norm`` gets wrong."""
        return primitive_norms()

    @contextlib.contextmanager
    def relaxation_map(self, step_size: float | None = None) -> Iterator[None]:
        """Within the block, ``force`` is the relaxation map Φ(z) = z + εF(z).

        For the Jacobian-norm stabiliser: ``add_penalties(..., {"jacobian": w})`` inside it
        penalises ½‖I + εJ‖²_F (Hutchinson), the Jacobian of the map the solvers iterate — the
        DEQ Jacobian regulariser, which pushes the map towards a contraction. (½‖J‖²_F of the
        force itself is minimised by J = 0, a singular, marginally stable fixed point.)
        """
        given = self.solver_defaults["step_size"] if step_size is None else step_size
        step = check_float("step_size", given)
        self._map_step = step
        try:
            yield
        finally:
            self._map_step = None

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Readout LN_r(z) W_outᵀ ([B, T, V]; of h in ``layered`` mode)."""
        return self.readout(readout_state(self, z))

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ_{b,t} CE(logits(z)_{bt}, y_{bt}) over the targets ≠ −100 (summed over tokens; see
        the module docstring); targets −100 are ignored, as in ``F.cross_entropy``."""
        logits = self.logits(z)
        if z.is_complex():  # the mean over non-ignored targets, times their count: the sum
            return holo_cross_entropy(logits, y) * (y != -100).sum().clamp_min(1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    # ----------------------------------------------------------------------------- evaluation
    def forward(
        self,
        idx: torch.Tensor,
        *,
        tol: float | None = None,
        max_steps: int | None = None,
        noise: NoiseRealization | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits at the fixed point, differentiable by the implicit function theorem.

        The free phase runs without a graph (``relax`` with the model's defaults, or ``tol`` /
        ``max_steps``). When gradients are needed, the state is re-attached as
        z = z* + εF(z*) − sg(εF(z*)) (the value stays z*) and a hook replaces the incoming
        gradient u by λ/ε with Jᵀλ = −u solved at z*, so backpropagation gives
        λᵀ ∂F/∂θ — the exact implicit gradient of any loss of the logits — for the block and
        the embeddings (clamp path), and the ordinary gradient for the readout.

        With ``force_noise > 0`` one :class:`NoiseRealization` (``noise``, else drawn by
        :meth:`sample_noise` from ``generator`` — the global RNG if None) is used by the free
        phase, the re-attached force and the adjoint linearisation alike, so the gradient is
        the implicit gradient at the noisy fixed point; pass the same ``generator`` seed (or
        ``noise``) for a reproducible call.
        """
        from gradstats.eqprop._problem import relax
        from gradstats.eqprop._settings import resolve_settings
        from gradstats.eqprop._solvers import solve_adjoint

        x_in = self.inject(idx)
        if noise is None:
            noise = self.sample_noise(x_in.detach(), generator)
        z_star, _ = relax(self, idx, noise=noise, tol=tol, max_steps=max_steps)
        if not torch.is_grad_enabled():
            return self.logits(z_star)
        s = resolve_settings("implicit", self.solver_defaults, z_star.dtype)
        eps = s.step_size
        f = self.force(z_star, x_in, noise)
        z = z_star + eps * f - (eps * f).detach()
        lin = Linearization(
            lambda state: self.force(state, x_in.detach(), noise), z_star, self.jvp_mode
        )

        def implicit(u: torch.Tensor) -> torch.Tensor:
            lam, _ = solve_adjoint(
                lin.vjp,
                u,
                step_size=eps,
                tol=s.tol_adjoint,
                max_steps=s.max_steps_adjoint,
                check_every=s.check_every,
            )
            return lam / eps

        if z.requires_grad:
            z.register_hook(implicit)
        return self.logits(z)
