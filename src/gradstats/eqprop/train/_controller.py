"""Adaptive stabilisation: the contraction controller that sets the penalty weights each step.

Signal. The free phase's *observed contraction rate*: for sample b with initial relative
residual r_0,b = ‖F(z_0)‖/‖z_0‖ (the first entry of the phase's residual trace), final r_T,b
and T_b updates (``SolveStats.steps``; frozen samples stop counting),

    q_b = (r_T,b / r_0,b)^(1/T_b),    q_t = exp(mean_b log q_b)

A phase that does not stop at its tolerance — BPTT unrolls exactly T1 steps — would read the
stagnation at the precision floor as a slow rate (q ≈ 0.8 for a map that reached 10⁻⁶ in ten
steps); for it r_T,b and T_b are those of the first residual check t_k < T_b with r ≤ tol
(tolerance-stopped phases never have one, so for them nothing changes).

(the geometric mean over the batch's samples with T_b ≥ 1 and finite, positive residuals; under
a process group the mean runs over the global batch). q < 1 is the per-step residual reduction
of the map z ← z + εF(z) — about its spectral radius ρ(I + εJ) at the fixed point — so q near 0
is a strongly contracting, nearly shallow map and q near 1 an almost marginal one. It costs
nothing: the residuals are those the solver already computed. (A power iteration on I + εJ was
the alternative; the observed rate is what the run actually experiences, Anderson included.)

Law. With q̄_t the smoothed rate (q̄_1 = q_1, then q̄_t = s·q̄_{t−1} + (1 − s)·q_t with
s = :data:`SMOOTHING`), the Jacobian-penalty weight λ is updated after every step that was not
skipped:

    e_t = max(q_t, q̄_t) − q*,    Δ_t = clip(k·e_t, −δ↓, δ↑),
    log λ_{t+1} = clip(log λ_t + Δ_t, log λ_min, log λ_max)

with q* = ``contraction_target`` ∈ (0, 1), k = ``controller_gain``, [λ_min, λ_max] =
[:data:`LAMBDA_MIN`, :data:`LAMBDA_MAX`] and an *asymmetric* rate limit (like the backoff and
growth of a loss scaler): tighten fast, loosen slowly — δ↑ = :data:`MAX_STEP_UP` (λ grows by at
most a factor e^0.25 per update) and δ↓ = :data:`MAX_STEP_DOWN` (it shrinks by at most e^−0.01).
The error takes the larger of the raw and the smoothed rate: a raw q_t above the target raises λ
at once (no smoothing lag on the way up), and λ is lowered only while both are below the target.
So q > q* (too slow a contraction) raises λ, q < q* lowers it; the map's contraction lags λ by
tens of steps, and the asymmetry undoes a loosening that went too far within a few steps while a
tightening is given back 25× more slowly. (Measured in the README: no divergence in 300-step
pilots at q* = 0.2, k = 0.3, but over 2,000 steps λ reached its bound and the runs broke down:
the contraction swings by itself, and a fast rise of λ lets the penalty dominate. That was with
the former residual penalty, whose weight follows λ; without it λ stayed in 0.05–3.6 over
2,000 steps at q* = 0.2.) λ_0 is
``jac_penalty`` (which must be > 0). The residual penalty follows in proportion,
``res_penalty · λ_t/λ_0`` (both terms make the map contract; controlling only one would let a
fixed other one pin q below the target); the homeostasis weight stays fixed (it targets the
asymmetry, not the contraction). A skipped step leaves λ and q̄ unchanged. Without a
``contraction_target`` the weights are the fixed ``--jac-penalty``/``--res-penalty``. (An earlier
law was symmetric, Δ_t = clip(k·(q̄_t − q*), ±0.05), and oscillated or reacted too slowly; its
checkpoints hold the same state and resume under this law.)

State (checkpoint key ``controller``): ``{"jac_penalty": λ, "contraction": q̄ or None,
"updates": n}`` — plain floats, so a resume continues bitwise. Metrics: each step logs
``jac_penalty`` and ``res_penalty`` (the weights the step used) and ``contraction`` (q_t of the
step's free phase) and ``contraction_smoothed`` (q̄_t).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError

__all__ = [
    "DEFAULT_GAIN",
    "HELP",
    "LAMBDA_MAX",
    "LAMBDA_MIN",
    "MAX_STEP_DOWN",
    "MAX_STEP_UP",
    "SMOOTHING",
    "ContractionController",
    "check_controller_options",
    "observed_rate",
]

#: Smoothing s of the contraction signal q̄_t = s·q̄_{t−1} + (1 − s)·q_t.
SMOOTHING = 0.9
#: Bound δ↑ on an increase of log λ per update (tighten fast).
MAX_STEP_UP = 0.25
#: Bound δ↓ on a decrease of log λ per update (loosen slowly).
MAX_STEP_DOWN = 0.01
#: Bounds of the controlled Jacobian-penalty weight λ (absolute).
LAMBDA_MIN, LAMBDA_MAX = 1e-4, 10.0
#: Default gain k (``controller_gain``).
DEFAULT_GAIN = 1.0
#: ``--help`` texts of the options (``TrainConfig`` fields).
HELP = {
    "contraction_target": (
        "adaptive stabilisation: target q* in (0, 1) of the free phase's observed contraction "
        "rate q = (r_T/r_0)^(1/T); after each step log(jac weight) += clip(k*(max(q, "
        f"q_smoothed) - q*), -{MAX_STEP_DOWN}, +{MAX_STEP_UP}) (tighten fast, loosen slowly), "
        f"kept in [{LAMBDA_MIN:g}, {LAMBDA_MAX:g}]; the residual weight follows in proportion; "
        "--jac-penalty is the initial weight (default: fixed weights)"
    ),
    "controller_gain": "adaptive stabilisation: gain k of the update (with --contraction-target)",
    "ema_decay": (
        "parameter EMA decay d in [0, 1) (zero-initialised, debiased), used for validation, "
        "probe, sample and fisher (default: off)"
    ),
}


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationTypeError(f"{name} must be a number; got {type(value).__name__}")
    return float(value)


def check_controller_options(
    contraction_target: object, controller_gain: object, jac_penalty: float, ema_decay: object
) -> None:
    """Validate the adaptive-stabilisation options (``TrainConfig`` calls it).

    Raises:
        ConfigurationError: ``contraction_target`` not in (0, 1), ``controller_gain`` not a
            finite number > 0, a target with an initial ``jac_penalty`` outside [λ_min, λ_max], or
            ``ema_decay`` not in [0, 1).
    """
    gain = _number("controller_gain", controller_gain)
    if not (math.isfinite(gain) and gain > 0):
        raise ConfigurationError(f"controller_gain must be a finite number > 0; got {gain}")
    if contraction_target is None and gain != DEFAULT_GAIN:
        raise ConfigurationError(
            "controller_gain is used only with contraction_target (--contraction-target)"
        )
    if contraction_target is not None:
        target = _number("contraction_target", contraction_target)
        if not 0 < target < 1:  # (NaN fails too)
            raise ConfigurationError(
                f"contraction_target must be a rate q* with 0 < q* < 1; got {target}"
            )
        if not LAMBDA_MIN <= jac_penalty <= LAMBDA_MAX:
            raise ConfigurationError(
                "contraction_target controls the Jacobian penalty: its initial weight "
                f"jac_penalty (--jac-penalty) must lie in [{LAMBDA_MIN:g}, {LAMBDA_MAX:g}], the "
                f"controller's range; got {jac_penalty}"
            )
    if ema_decay is not None:
        decay = _number("ema_decay", ema_decay)
        if not 0 <= decay < 1:
            raise ConfigurationError(f"ema_decay must be in [0, 1); got {decay}")


def observed_rate(stats: Any) -> tuple[float, int]:
    """``(Σ_b log q_b, count)`` over the usable samples of a free phase's ``SolveStats``.

    q_b = (r_T,b / r_0,b)^(1/T_b) (see the module docstring), where a phase that ran past its
    tolerance (BPTT's fixed unroll) ends at its first check t_k < T_b with r ≤ tol; samples with
    T_b = 0 or non-finite / non-positive residuals are left out. One host read.
    """
    trace = stats.trace.detach().double()
    r0 = trace[0]
    rt = stats.final_residual.detach().double()
    steps = stats.steps.detach().double()
    if stats.tol > 0 and trace.shape[0] > 1:  # the first check at or below tol before T_b
        at = torch.tensor(stats.trace_steps, dtype=trace.dtype, device=trace.device)[:, None]
        hit = (trace <= stats.tol) & (at > 0) & (at < steps)
        first = torch.where(hit.any(0), hit.double().argmax(0), -1)  # argmax: first True
        early = first >= 0
        row = first.clamp_min(0)[None]
        rt = torch.where(early, trace.gather(0, row)[0], rt)
        steps = torch.where(early, at.expand_as(trace).gather(0, row)[0], steps)
    ok = (steps > 0) & (r0 > 0) & (rt > 0) & torch.isfinite(r0) & torch.isfinite(rt)
    logs = torch.where(ok, (rt.clamp_min(1e-300).log() - r0.clamp_min(1e-300).log()), 0.0)
    logs = logs / steps.clamp_min(1.0)
    total, count = torch.stack([logs.sum(), ok.double().sum()]).tolist()  # sync-ok: once/step
    return float(total), int(count)


class ContractionController:
    """The controller of the module docstring: :meth:`weights` for a step, :meth:`update`
    after it.

    Args:
        target: q* ∈ (0, 1).
        jac_penalty: the initial Jacobian weight λ_0 (> 0).
        res_penalty: the residual weight at λ_0 (follows λ in proportion).
        gain: k.
        max_step_up, max_step_down, lambda_min, lambda_max, smoothing: δ↑, δ↓, λ_min, λ_max, s.
    """

    def __init__(
        self,
        target: float,
        jac_penalty: float,
        res_penalty: float = 0.0,
        gain: float = DEFAULT_GAIN,
        *,
        max_step_up: float = MAX_STEP_UP,
        max_step_down: float = MAX_STEP_DOWN,
        lambda_min: float = LAMBDA_MIN,
        lambda_max: float = LAMBDA_MAX,
        smoothing: float = SMOOTHING,
    ) -> None:
        check_controller_options(target, gain, jac_penalty, None)
        steps_ok = max_step_up > 0 and max_step_down > 0
        if not 0 < lambda_min <= lambda_max or not steps_ok or not 0 <= smoothing < 1:
            raise ConfigurationError(
                "need 0 < lambda_min <= lambda_max, max_step_up > 0, max_step_down > 0 and "
                "0 <= smoothing < 1"
            )
        self.target, self.gain, self.smoothing = target, gain, smoothing
        self.max_step_up, self.max_step_down = max_step_up, max_step_down
        self.initial, self.res_initial = float(jac_penalty), float(res_penalty)
        self.log_min, self.log_max = math.log(lambda_min), math.log(lambda_max)
        self.log_lambda = min(max(math.log(jac_penalty), self.log_min), self.log_max)
        self.smoothed: float | None = None
        self.updates = 0

    @property
    def jac_penalty(self) -> float:
        """λ_t: the Jacobian-penalty weight of the next step."""
        return math.exp(self.log_lambda)

    def weights(self, fixed: Mapping[str, float]) -> dict[str, float]:
        """The step's ``{penalty: weight}``: ``fixed`` with ``jacobian`` set to λ_t and
        ``residual`` to ``res_penalty · λ_t/λ_0`` (zero weights dropped)."""
        out = dict(fixed)
        out["jacobian"] = self.jac_penalty
        if self.res_initial > 0:
            out["residual"] = self.res_initial * self.jac_penalty / self.initial
        return {k: v for k, v in out.items() if v > 0}

    def update(self, rate: float | None) -> float:
        """Feed this step's q_t (``None``/non-finite: hold); returns the applied Δ log λ."""
        if rate is None or not math.isfinite(rate):
            return 0.0
        if self.smoothed is None:
            self.smoothed = rate
        else:
            self.smoothed = self.smoothing * self.smoothed + (1 - self.smoothing) * rate
        error = max(rate, self.smoothed) - self.target
        delta = min(max(self.gain * error, -self.max_step_down), self.max_step_up)
        new = min(max(self.log_lambda + delta, self.log_min), self.log_max)
        applied, self.log_lambda = new - self.log_lambda, new
        self.updates += 1
        return applied

    def state_dict(self) -> dict[str, Any]:
        return {"jac_penalty": self.jac_penalty, "log_jac_penalty": self.log_lambda,
                "contraction": self.smoothed, "updates": self.updates}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_controller_state(state)
        self.log_lambda = float(state["log_jac_penalty"])
        self.smoothed = None if state["contraction"] is None else float(state["contraction"])
        self.updates = int(state["updates"])


def check_controller_state(state: object) -> None:
    """Raise a :class:`~gradstats.errors.StateError` unless ``state`` is a controller state."""
    if not isinstance(state, Mapping) or not {"log_jac_penalty", "contraction",
                                              "updates"} <= set(state):  # fmt: skip
        raise StateError("the checkpoint's controller state is not a controller state_dict")
    log, q, n = state["log_jac_penalty"], state["contraction"], state["updates"]
    good = isinstance(log, float) and math.isfinite(log)
    good = good and (q is None or (isinstance(q, float) and math.isfinite(q)))
    if not (good and isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise StateError(
            "the checkpoint's controller state holds invalid values (log_jac_penalty: a finite "
            "float, contraction: a finite float or None, updates: an int >= 0)"
        )
