"""Text generation from the equilibrium transformer and its backprop baseline, with a KV cache.

Causal attention makes the fixed point of a prefix independent of what follows it: position t's
force F_t(z) = x_t − (1 + c) z_t + Attn_t(LN_a z_{≤t}) + FFN(LN_f z_t) reads only positions ≤ t
(the ``layered`` mode's force, ``_forces.block_force``, likewise: its attention reads u_{≤t}).
So once the window's states z*_{<n} are relaxed, appending a token leaves them unchanged, and
the new state solves the fixed point of ONE position,

    F_n(z_n) = 0  (iterated z_n ← z_n + ε F_n(z_n)),
    Attn_n = Σ_h softmax([q_n K_{<n}ᵀ, q_n·k_n]/√d) [V_{<n}; v_n] W_oᵀ,

with the keys K_{<n} and values V_{<n} of the converged prefix cached (computed once from
z*_{<n}) and only q_n, k_n, v_n depending on z_n. A token therefore costs one relaxation of one
position — O(n·C + C²) per solver step instead of O(n²·C + n·C²) for the whole window — and the
result equals relaxing the full window to the solver tolerance (each position is solved to the
tolerance on its own relative residual ‖F_n(z_n)‖/‖z_n‖; the full-window solve stops on the
residual of the whole window). The backprop baseline is a feed-forward stack: its per-layer KV
cache is the standard one and exact up to rounding.

**Beyond the block size** the position embeddings of every token in the window change when it
slides (positions are absolute), so no cached state survives a slide. When the window is full, the
last ``block_size − window_shift + 1`` tokens (the new one included) are re-relaxed as a fresh
window, then generation continues incrementally until the window is full again. With the default
``window_shift=1`` every token beyond the block re-relaxes the last ``block_size`` tokens: the
same as relaxing ``ids[:, -block_size:]`` for every token (exact, but no faster than the naive
loop there); a larger shift amortises the re-relaxation over ``window_shift`` tokens, and each
token then sees between ``block_size − window_shift + 1`` and ``block_size`` tokens of context
(exact for that context).

Generation uses the noise-free force (``force_noise`` is a training regulariser) and the
model's own solver settings (``solver_defaults``, then the library's), which ``tol``,
``max_steps`` and ``step_size`` override. It runs without autograd and leaves the model as it
was.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradstats._validation import check_positive_int
from gradstats._warnings import warn
from gradstats.eqprop._settings import Settings, check_float, resolve_settings
from gradstats.eqprop._solvers import fixed_point
from gradstats.eqprop._stats import ConvergenceWarning
from gradstats.eqprop.models._blocks import CausalAttention, FeedForward
from gradstats.eqprop.models._forces import attention_input, block_force
from gradstats.eqprop.models.baseline import BackpropTransformer
from gradstats.eqprop.models.transformer import EquilibriumTransformer
from gradstats.errors import ConfigurationError, ConfigurationTypeError, NonFiniteError

__all__ = ["generate"]

Model = EquilibriumTransformer | BackpropTransformer


class _Attention:
    """One attention module's weights, fetched and stacked once, and its KV cache.

    The projections are one matmul h W_qkvᵀ; with qk-norm the query gains carry the 1/√d scale.
    """

    def __init__(self, attn: CausalAttention, batch: int, block: int, like: torch.Tensor) -> None:
        heads = attn.each_head()
        self.h, self.d, self.qk_norm = attn.n_heads, attn.d_head, attn.qk_norm
        self.norm = (attn.norm.weight, attn.norm.bias)
        stacked = [torch.stack([getattr(h, n) for h in heads]) for n in ("query", "key", "value")]
        self.qkv = torch.cat(stacked).reshape(3 * self.h * self.d, -1).T.contiguous()  # [C, 3Hd]
        # W_o as [Hd, C]: row (h, j) is head h's out[:, j]
        self.out = torch.stack([h.out.T for h in heads]).reshape(self.h * self.d, -1)
        scale = 1.0 / math.sqrt(self.d)
        self.gains = (
            torch.stack([torch.stack([h.q_norm * scale, h.k_norm]) for h in heads], 1)
            if self.qk_norm
            else torch.tensor([scale, 1.0], dtype=like.dtype, device=like.device)[:, None, None]
        )  # [2, H, d] (or [2, 1, 1] without qk-norm): multiplies (q, k)
        shape = (batch, self.h, block, self.d)
        self.keys = like.new_zeros(shape)
        self.values = like.new_zeros(shape)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """LN_a(x) (the attention's input LayerNorm)."""
        return F.layer_norm(x, x.shape[-1:], self.norm[0], self.norm[1], 1e-5)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (scaled by 1/√d), k, v [B, T, H, d] of the normalised input ``h`` [B, T, C]."""
        b, t, _ = h.shape
        qkv = (h @ self.qkv).view(b, t, 3, self.h, self.d)
        qk = qkv[:, :, :2]
        if self.qk_norm:
            qk = F.layer_norm(qk, qk.shape[-1:], None, None, 1e-5)
        qk = qk * self.gains
        return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]

    def fill(self, h: torch.Tensor) -> None:
        """Cache the keys and values of the (converged) window ``h`` [B, n, C]."""
        _, k, v = self.project(h)
        n = h.shape[1]
        self.keys[:, :, :n], self.values[:, :, :n] = k.transpose(1, 2), v.transpose(1, 2)

    def store(self, h: torch.Tensor, n: int) -> None:
        """Cache position ``n``'s key and value (``h`` [B, 1, C] normalised)."""
        _, k, v = self.project(h)
        self.keys[:, :, n], self.values[:, :, n] = k[:, 0], v[:, 0]

    def attend(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """Attention output [B, 1, C] of position ``n`` (normalised input ``h`` [B, 1, C]) over
        the cached positions < n and itself (its k, v are written to slot n)."""
        q, k, v = self.project(h)
        self.keys[:, :, n], self.values[:, :, n] = k[:, 0], v[:, 0]
        scores = self.keys[:, :, : n + 1] @ q[:, 0, :, :, None]  # [B, H, n + 1, 1]
        att = torch.softmax(scores, dim=2).transpose(2, 3)
        ctx = att @ self.values[:, :, : n + 1]  # [B, H, 1, d]
        return ctx.reshape(h.shape[0], 1, -1) @ self.out


def _mlp(ffn: FeedForward) -> Callable[[torch.Tensor], torch.Tensor]:
    """FFN(LN_f x) = W₂ gelu(W₁ LN_f(x) + b₁) + b₂ with the weights fetched once."""
    if ffn.down is None:
        return ffn.energy_force  # the energy mode's −∇E (it normalises its input itself)
    norm_w, norm_b, up, down = ffn.norm.weight, ffn.norm.bias, ffn.up, ffn.down
    up_w, up_b, down_w, down_b = up.weight, up.bias, down.weight, down.bias

    def mlp(x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, 1e-5)
        return F.linear(F.gelu(F.linear(h, up_w, up_b), approximate="tanh"), down_w, down_b)

    return mlp


class _Equilibrium:
    """Windows relaxed with the model's solver; new positions relaxed alone against the cache."""

    def __init__(self, model: EquilibriumTransformer, batch: int, s: Settings) -> None:
        like = model.embed.token
        self.model, self.s = model, s
        self.attn = _Attention(model.attn, batch, model.block_size, like)
        self.converged: list[torch.Tensor] = []

    def _solve(self, fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> torch.Tensor:
        s = self.s
        z, stats = fixed_point(fn, z0, **s.free_phase_options(), warn=False)
        self.converged.append(stats.converged.all())
        return z

    def window(self, ids: torch.Tensor) -> torch.Tensor:
        """Relax the window ``ids`` [B, n] as ``relax`` would; cache it; last logits [B, V]."""
        model = self.model
        x_in = model.inject(ids)
        z = self._solve(lambda state: model.force(state, x_in), model.init_state(x_in))
        self.attn.fill(self.attn.normed(attention_input(model, z, x_in)))
        return model.logits(z[:, -1])

    def extend(self, token: torch.Tensor, n: int) -> torch.Tensor:
        """Relax position ``n`` holding ``token`` [B] against the cache; logits [B, V]."""
        model, attn = self.model, self.attn
        x = (model.embed.token[token] + model.embed.position[n])[:, None]  # [B, 1, C]

        def force(z: torch.Tensor) -> torch.Tensor:
            return block_force(model, z, x, lambda h: attn.attend(h, n))

        z = self._solve(force, model.init_state(x))
        attn.store(attn.normed(attention_input(model, z, x)), n)
        return model.logits(z[:, 0])

    def report(self) -> None:
        """One warning (one host read, at the end) if any relaxation missed the tolerance."""
        if not self.converged:
            return
        missed = int((~torch.stack(self.converged)).sum())  # sync-ok: once per generate()
        if missed:
            warn(
                f"generate: {missed} of {len(self.converged)} relaxations did not reach "
                f"tol={self.s.tol:g} within max_steps={self.s.max_steps}; the samples come from "
                "unconverged states",
                ConvergenceWarning,
            )


class _Backprop:
    """The feed-forward baseline with a per-layer KV cache."""

    def __init__(self, model: BackpropTransformer, batch: int) -> None:
        like = model.embed.token
        self.model = model
        self.layers = model.each_layer()
        self.attn = [_Attention(la.attn, batch, model.block_size, like) for la in self.layers]
        self.mlps = [_mlp(layer.ffn) for layer in self.layers]

    def window(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(ids)
        for layer, attn in zip(self.layers, self.attn, strict=True):
            attn.fill(attn.normed(x))
            x = layer(x)
        return self.model.readout(x[:, -1])

    def extend(self, token: torch.Tensor, n: int) -> torch.Tensor:
        embed = self.model.embed
        x = (embed.token[token] + embed.position[n])[:, None]
        for attn, mlp in zip(self.attn, self.mlps, strict=True):
            x = x + attn.attend(attn.normed(x), n)
            x = x + mlp(x)
        return self.model.readout(x[:, 0])

    def report(self) -> None:
        return None


def _check_prompt(prompt_ids: object, vocab: int) -> torch.Tensor:
    if (
        not isinstance(prompt_ids, torch.Tensor)
        or prompt_ids.dim() not in (1, 2)
        or prompt_ids.is_floating_point()
        or prompt_ids.is_complex()
        or prompt_ids.dtype == torch.bool
    ):
        what = (
            f"a {prompt_ids.dtype} tensor of shape {tuple(prompt_ids.shape)}"
            if isinstance(prompt_ids, torch.Tensor)
            else type(prompt_ids).__name__
        )
        raise ConfigurationTypeError(
            f"prompt_ids must be an integer tensor of token ids shaped [T] or [B, T]; got {what}"
        )
    if prompt_ids.numel() == 0:
        raise ConfigurationError(
            f"prompt_ids is empty (shape {tuple(prompt_ids.shape)}): give at least one token"
        )
    low, high = int(prompt_ids.min()), int(prompt_ids.max())  # sync-ok: validation, once
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ConfigurationError(
            f"prompt_ids holds the id {bad}, outside the vocabulary [0, {vocab - 1}]"
        )
    return prompt_ids


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> torch.Tensor:
    """Next ids [B]: argmax for temperature 0 or top_k 1; else softmax(logits/T) over the top k."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature  # no overflow at small T
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def generate(
    model: Model,
    prompt_ids: torch.Tensor,
    tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    window_shift: int = 1,
    tol: float | None = None,
    max_steps: int | None = None,
    step_size: float | None = None,
) -> torch.Tensor:
    """Append ``tokens`` sampled tokens to ``prompt_ids``, one relaxation of one position each.

    See the module docstring for the cache, its exactness and the sliding window. The next
    token is drawn from softmax(logits/``temperature``) restricted to the ``top_k`` most likely
    tokens (all if None or ≥ V); ``temperature=0`` or ``top_k=1`` is greedy (argmax,
    deterministic). Sampling draws from ``generator`` only (the global RNG if None), so a seeded
    generator reproduces the text.

    Args:
        model: an :class:`EquilibriumTransformer` or a :class:`BackpropTransformer`.
        prompt_ids: token ids ``[T]`` or ``[B, T]`` (T ≥ 1; the last ``block_size`` are used).
        tokens: how many tokens to append (≥ 0).
        temperature: ≥ 0.
        top_k: ≥ 1, or None for the whole vocabulary.
        generator: for the draws (on the model's device).
        window_shift: 1 ≤ shift ≤ block_size: beyond the block, the window re-relaxed when it
            is full keeps the last ``block_size − window_shift + 1`` tokens.
        tol, max_steps, step_size: override the model's free-phase settings (equilibrium only).

    Returns:
        The ids ``[T + tokens]`` (or ``[B, T + tokens]``), the prompt first, on the model's
        device.

    Raises:
        ConfigurationError: a bad argument (named). NonFiniteError: NaN or inf weights.
        DivergenceError: a relaxation diverged.

    Example:
        >>> model = EquilibriumTransformer(11, 8, 16, 2, generator=torch.Generator().manual_seed(0))
        >>> out = generate(model, torch.tensor([1, 2, 3]), 4, temperature=0)
        >>> out.shape, out[:3].tolist()
        (torch.Size([7]), [1, 2, 3])
        >>> seeded = torch.Generator().manual_seed(1)  # temperature 1 over the 5 likeliest
        >>> generate(model, torch.tensor([[1, 2], [3, 4]]), 3, top_k=5, generator=seeded).shape
        torch.Size([2, 5])
    """
    if not isinstance(model, (EquilibriumTransformer, BackpropTransformer)):
        raise ConfigurationTypeError(
            "model must be an EquilibriumTransformer or a BackpropTransformer; got "
            f"{type(model).__name__}"
        )
    tokens = check_positive_int("tokens", tokens, minimum=0)
    temperature = check_float("temperature", temperature, allow_zero=True)
    if top_k is not None:
        top_k = check_positive_int("top_k", top_k)
    block = model.block_size
    window_shift = check_positive_int("window_shift", window_shift)
    if window_shift > block:
        raise ConfigurationError(
            f"window_shift must be between 1 and block_size={block}; got {window_shift}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigurationTypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}"
        )
    vocab, device = model.embed.token.shape[0], model.embed.token.device
    ids = _check_prompt(prompt_ids, vocab).to(device)
    if generator is not None and generator.device.type != device.type:
        raise ConfigurationError(
            f"generator is on {generator.device} but the model is on {device}: sampling needs "
            "a generator on the model's device"
        )
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]  # sync-ok
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(
            f"generate: the model holds non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
            f"{more}"
        )
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    stepper: _Equilibrium | _Backprop
    if isinstance(model, EquilibriumTransformer):
        dtype = model.embed.token.dtype
        s = resolve_settings(
            "implicit", model.solver_defaults, dtype, tol=tol, max_steps=max_steps,
            step_size=step_size,
        )  # fmt: skip
        stepper = _Equilibrium(model, ids.shape[0], s)
    else:
        given = [n for n, v in (("tol", tol), ("max_steps", max_steps), ("step_size", step_size))
                 if v is not None]  # fmt: skip
        if given:
            raise ConfigurationError(
                f"{', '.join(given)} apply only to an EquilibriumTransformer (the backprop "
                "baseline has no relaxation)"
            )
        stepper = _Backprop(model, ids.shape[0])
    keep = block - window_shift + 1
    out = [ids]
    with torch.no_grad():
        n = min(ids.shape[1], block)
        logits = stepper.window(ids[:, -n:]) if tokens else None
        for i in range(tokens):
            assert logits is not None
            token = _sample(logits, temperature, top_k, generator)
            out.append(token[:, None])
            if i == tokens - 1:
                break
            if n < block:
                logits = stepper.extend(token, n)
                n += 1
            else:  # the window is full: slide it, re-relax the last `keep` tokens
                n = keep
                logits = stepper.window(torch.cat(out, 1)[:, -n:])
        stepper.report()
    result = torch.cat(out, 1)
    return result[0] if squeeze else result
