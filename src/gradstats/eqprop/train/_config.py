"""The trainer's configuration: one frozen dataclass, the single source of every default.

The command line (``gradstats eqprop train``) is generated from :class:`TrainConfig`'s fields
(their ``help`` metadata); checkpoints store :meth:`TrainConfig.to_dict` and rebuild the config
with :meth:`TrainConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from gradstats._validation import check_choice, check_positive_int
from gradstats.eqprop._estimators import ESTIMATORS, get_estimator
from gradstats.eqprop._penalties import JACOBIAN_NORMS, POWER_ITERATIONS
from gradstats.eqprop._registry import MODEL_KINDS, Estimator, Options
from gradstats.eqprop._settings import SolverSettings
from gradstats.eqprop.models.baseline import BackpropTransformer
from gradstats.eqprop.models.transformer import HOLOMORPHIC_MODES, MODES, EquilibriumTransformer
from gradstats.eqprop.train._config_checks import PRECISIONS
from gradstats.eqprop.train._config_checks import check_feedback as _check_feedback
from gradstats.eqprop.train._config_checks import check_float as _check_float
from gradstats.eqprop.train._config_checks import check_jacobian_options as _check_jacobian_options
from gradstats.eqprop.train._config_checks import check_types as _check_types
from gradstats.eqprop.train._controller import DEFAULT_GAIN, HELP, check_controller_options
from gradstats.errors import ConfigurationError, StateError

__all__ = [
    "EP_METHODS",
    "TRAIN_METHODS",
    "EstimatorSettings",
    "FreeSettings",
    "TrainConfig",
    "TrainModel",
]

#: The model a run trains: the equilibrium transformer, or the baseline for ``backprop``.
TrainModel = EquilibriumTransformer | BackpropTransformer


class FreeSettings(TypedDict):
    """Free-phase keyword arguments of ``relax`` shared by training and validation."""

    max_steps: int
    step_size: float | None
    tol: float | None


class EstimatorSettings(TypedDict, total=False):
    """Keyword arguments of ``estimate_gradient`` for a run's method."""

    solver: SolverSettings
    options: Options


def _offered() -> tuple[Estimator, ...]:  # the trainer's estimators, by train_rank
    ranked = [e for e in ESTIMATORS.values() if e.train_rank is not None]
    return tuple(sorted(ranked, key=lambda e: e.train_rank or 0))


EP_METHODS = tuple(e.name for e in _offered())
#: ``--method`` values: the estimators plus ``backprop`` (the feed-forward baseline).
TRAIN_METHODS = (*EP_METHODS, "backprop")
OPTIMIZERS = ("adamw", "adam", "sgd")
_DEFAULT_OUT = Path("eqprop-run")
_EP_ONLY = ("step_size", "damping", "attn_mode", "feedback", "force_noise", "penalty_probes",
            "contraction_target", "controller_gain", "jac_norm")  # fmt: skip
#: Run options that set an estimator's own settings (the fields of its options dataclass).
_OPTION_FIELDS = ("beta", "points", "anchor")


def _using(test) -> tuple[str, ...]:  # the offered estimators passing ``test``
    return tuple(e.name for e in _offered() if test(e))


#: Options only some methods use: option -> the methods it applies to (read from the
#: registry). Setting one to a non-default value with another method is an error (it would be
#: silently ignored). ``t1`` is accepted by every method (``backprop`` ignores it), so one
#: command line serves a comparison.
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "tol": _using(lambda e: "free" in e.phases),
    "t2": _using(lambda e: bool(e.t2_keys)),
    "tol_adjoint": _using(lambda e: e.second_phase is not None),
    **{name: _using(lambda e, n=name: n in e.option_names) for name in _OPTION_FIELDS},
    **dict.fromkeys(_EP_ONLY, EP_METHODS),
    "layers": ("backprop",),
}


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (see ``gradstats eqprop train --help``)."""

    method: str = _opt("aep", "estimator: " + "|".join(TRAIN_METHODS))
    steps: int = _opt(2000, "optimizer steps (a resumed run continues up to this total)")
    out: Path = _opt(_DEFAULT_OUT, "run folder (checkpoint.pt, metrics.jsonl, curves.png)")  # noqa: RUF009 (a Path is immutable)
    data: str | None = _opt(None, "UTF-8 text file to train on (default: embedded Shakespeare)")
    # model
    d_model: int = _opt(64, "state width C")
    n_heads: int = _opt(4, "attention heads")
    block_size: int = _opt(64, "sequence length T (characters per window)")
    batch_size: int = _opt(32, "windows per step (under torchrun: per process; global N x this)")
    damping: float = _opt(1.0, "stabiliser: damping c of the -c*z term (equilibrium model)")
    attn_mode: str = _opt("thick", "equilibrium block: " + "|".join(MODES))
    feedback: float = _opt(0.0, "layered block: weight of its output in its attention's input")
    qk_norm: bool = _opt(True, "LayerNorm on queries and keys")
    ffn_mult: int = _opt(4, "FFN width as a multiple of d_model")
    layers: int = _opt(1, "--method backprop: layers of the feed-forward stack")
    init_std: float = _opt(0.02, "std of the block's weight matrices at initialisation")
    force_noise: float = _opt(0.0, "multiplicative force noise sigma (one draw per estimate)")
    # optimiser
    optimizer: str = _opt("adamw", "optimizer: " + "|".join(OPTIMIZERS))
    lr: float = _opt(3e-3, "peak learning rate")
    weight_decay: float = _opt(0.0, "decoupled weight decay (adamw) / L2 (adam, sgd)")
    warmup: int = _opt(100, "linear warm-up steps, then cosine decay to lr/10")
    grad_clip: float = _opt(1.0, "clip the global gradient norm (0: off)")
    # relaxation and estimator
    t1: int = _opt(30, "free phase: step cap (bptt: exactly this many unrolled steps)")
    tol: float | None = _opt(None, "free-phase tolerance ||F||/||z|| (default: the model's)")
    t2: int = _opt(100, "nudged/adjoint phases: step cap")
    tol_adjoint: float | None = _opt(None, "nudged/adjoint tolerance ||r_a||/||l|| (default)")
    step_size: float | None = _opt(None, "relaxation step epsilon (default 1/(1+damping))")
    beta: float | None = _opt(None, "nudge beta (holomorphic: radius r; default per method)")
    points: int | None = _opt(None, "holomorphic: nudges N on the circle")
    anchor: str | None = _opt(None, "aep/holomorphic anchor: fixed|tracking (default)")
    # stabilisers (relative weights: scaled to weight * ||g_task|| / ||g_penalty||)
    jac_penalty: float = _opt(
        0.0, "stabiliser: Jacobian-norm penalty of the relaxation map I+eps*J (norm: --jac-norm)"
    )
    homeostasis: float = _opt(0.0, "stabiliser: Jacobian homeostasis 1/2||J-J^T||_F^2 weight")
    res_penalty: float = _opt(
        0.0,
        "stabiliser: free-residual penalty weight, 1/2 max(0, ||F(z)||^2 - tol^2 ||z||^2) per "
        "sample (zero once the free phase reached its tolerance)",
    )
    jac_norm: str = _opt(
        "frobenius",
        "Jacobian penalty's norm: frobenius (1/2||I+eps*J||_F^2, Hutchinson) | spectral (1/2 "
        "sigma_max(I+eps*J)^2, power iteration) | loop (1/2||(I+eps*J)^2||_F^2: layered loop gain)",
    )
    power_iterations: int = _opt(
        POWER_ITERATIONS, "--jac-norm spectral: power-iteration steps (one Jv and one J^T u each)"
    )
    jac_bound: float = _opt(
        0.0, "--jac-norm spectral: penalise only 1/2 max(0, sigma_max^2 - bound^2) per sample "
        "(a Lipschitz bound of the relaxation map; 0: all of 1/2 sigma_max^2)",
    )  # fmt: skip
    penalty_probes: int = _opt(
        1, "random vectors per penalty evaluation (Hutchinson; spectral: power-iteration starts)"
    )
    # adaptive stabilisation and parameter EMA (laws: train/_controller.py, train/_ema.py)
    contraction_target: float | None = _opt(None, HELP["contraction_target"])
    controller_gain: float = _opt(DEFAULT_GAIN, HELP["controller_gain"])
    ema_decay: float | None = _opt(None, HELP["ema_decay"])
    # bookkeeping
    seed: int = _opt(0, "seed of initialisation, batches and noise")
    device: str = _opt("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    dtype: str = _opt("float32", "parameter and state dtype: float32|float64")
    precision: str = _opt(
        "float32", "matmul precision: float32|tf32 (CUDA: TF32 tensor-core matmuls; the state, "
        "residuals and contrasts stay float32 tensors)",
    )  # fmt: skip
    threads: int | None = _opt(
        None,
        "torch CPU threads (default: 1 per 2^19 state elements batch*block*d_model, at most "
        "torch's default: 1 for the small models; torch's one-per-core default slows small "
        "models down by 10-50x on a busy machine)",
    )
    timeout: float | None = _opt(
        None,
        "under torchrun: seconds a process waits for the others in a collective before it "
        "fails (default: torch's, 30 minutes)",
    )
    eval_every: int = _opt(100, "steps between validation evaluations")
    eval_batches: int = _opt(4, "validation batches per evaluation (fixed windows)")
    spot_check_every: int = _opt(
        250, "steps between cosine checks vs the implicit gradient (0: off)"
    )
    checkpoint_every: int = _opt(100, "steps between checkpoints")
    max_skips: int = _opt(5, "stop after this many consecutive failed (diverged) steps")
    resume: bool = _opt(False, "continue the run in --out from its checkpoint")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        _check_types(self)
        check_choice("method", self.method, TRAIN_METHODS)
        check_choice("attn_mode", self.attn_mode, MODES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("dtype", self.dtype, ("float32", "float64"))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("jac_norm", self.jac_norm, JACOBIAN_NORMS)
        if self.anchor is not None:
            check_choice("anchor", self.anchor, ("fixed", "tracking"))
        kinds = MODEL_KINDS if self.attn_mode in HOLOMORPHIC_MODES else MODEL_KINDS[:1]
        if self.is_equilibrium and not set(get_estimator(self.method).model_kinds) & set(kinds):
            raise ConfigurationError(
                f"method={self.method!r} is not supported by "
                f"EquilibriumTransformer(mode={self.attn_mode!r}); use --attn-mode thick or layered"
            )
        for name in ("steps", "d_model", "n_heads", "block_size", "batch_size", "ffn_mult"):
            check_positive_int(name, getattr(self, name))
        for name in ("layers", "t1", "t2", "eval_batches", "checkpoint_every", "max_skips"):
            check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "penalty_probes"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("warmup", self.warmup, minimum=0)
        check_positive_int("spot_check_every", self.spot_check_every, minimum=0)
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.timeout is not None:
            _check_float("timeout", self.timeout, positive=True)
        if self.points is not None:
            check_positive_int("points", self.points, minimum=2)
        if self.d_model % self.n_heads:
            raise ConfigurationError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        for name in ("lr", "init_std"):
            _check_float(name, getattr(self, name), positive=True)
        for name in ("damping", "weight_decay", "grad_clip", "force_noise"):
            _check_float(name, getattr(self, name))
        for name in ("jac_penalty", "homeostasis", "res_penalty"):
            _check_float(name, getattr(self, name))
        for name in ("tol", "tol_adjoint", "step_size", "beta"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, positive=name in ("step_size", "beta"))
        if self.method == "backprop" and self.penalties():
            raise ConfigurationError(
                "the stabiliser penalties act on the equilibrium force: not with backprop"
            )
        unused = self.unused_options()
        if unused:
            detail = ", ".join(
                f"{n}={getattr(self, n)!r} (only {'|'.join(APPLIES_TO[n])})" for n in unused
            )
            raise ConfigurationError(
                f"method={self.method!r} does not use {detail}: leave "
                f"{'it' if len(unused) == 1 else 'them'} unset or choose a method that uses it"
            )
        check_controller_options(
            self.contraction_target, self.controller_gain, self.jac_penalty, self.ema_decay
        )
        _check_jacobian_options(self, _defaults())
        _check_feedback(self)
        try:
            kind = torch.device(self.device).type
        except (RuntimeError, ValueError, TypeError):
            raise ConfigurationError(
                f"device must be a torch device (cpu, cuda, cuda:1, mps, ...); got {self.device!r}"
            ) from None
        if self.precision == "tf32" and (kind != "cuda" or self.dtype != "float32"):
            raise ConfigurationError(
                "precision='tf32' needs --device cuda and --dtype float32 (TF32 is a CUDA "
                f"tensor-core format); got device={self.device!r}, dtype={self.dtype!r}"
            )

    def unused_options(self) -> list[str]:
        """Options set to a non-default value that ``method`` does not use (see
        :data:`APPLIES_TO`)."""
        defaults = _defaults()
        return [
            name
            for name, methods in APPLIES_TO.items()
            if self.method not in methods and getattr(self, name) != defaults[name]
        ]

    # ----------------------------------------------------------------------------- derived
    @property
    def is_equilibrium(self) -> bool:
        return self.method != "backprop"

    def penalties(self) -> dict[str, float]:
        """``{penalty: weight}`` of the active stabiliser penalties (``gradstats.eqprop``)."""
        weights = {
            "jacobian": self.jac_penalty,
            "asymmetry": self.homeostasis,
            "residual": self.res_penalty,
        }
        return {k: v for k, v in weights.items() if v > 0}

    def build_model(self, vocab_size: int) -> TrainModel:
        """The model this run trains (initialised from ``seed``, in ``dtype``)."""
        generator = torch.Generator().manual_seed(self.seed)
        dtype = getattr(torch, self.dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters are created (and drawn) in the run's dtype
        try:
            return self._build(vocab_size, generator)
        finally:
            torch.set_default_dtype(previous)

    def _build(self, vocab_size: int, generator: torch.Generator) -> TrainModel:
        if self.method == "backprop":
            return BackpropTransformer(
                vocab_size,
                self.block_size,
                self.d_model,
                self.n_heads,
                self.layers,
                self.qk_norm,
                ffn_mult=self.ffn_mult,
                init_std=self.init_std,
                generator=generator,
            )
        return EquilibriumTransformer(
            vocab_size,
            self.block_size,
            self.d_model,
            self.n_heads,
            self.damping,
            self.attn_mode,
            self.qk_norm,
            ffn_mult=self.ffn_mult,
            feedback=self.feedback,
            force_noise=self.force_noise,
            init_std=self.init_std,
            generator=generator,
        )

    def free_settings(self) -> FreeSettings:
        """The free-phase settings shared by training and validation (one objective).

        ``bptt`` evaluates exactly ``t1`` steps (``tol=0``); the fixed-point methods relax to
        ``tol`` with ``t1`` as the cap.
        """
        tol = self.tol if "free" in get_estimator(self.method).phases else 0.0
        return {"max_steps": self.t1, "step_size": self.step_size, "tol": tol}

    def solver_settings(self) -> SolverSettings:
        """The run's shared solver settings for its method (T1/T2 as the registry maps them)."""
        estimator = get_estimator(self.method)
        values: dict[str, object] = {"step_size": self.step_size}
        if "free" in estimator.phases:
            values.update(max_steps=self.t1, tol=self.tol)
        if estimator.second_phase is not None:
            values.update(max_steps_adjoint=self.t2, tol_adjoint=self.tol_adjoint)
        return SolverSettings(**values)  # type: ignore[arg-type]

    def method_options(self) -> Options:
        """The run's settings of its method's own options dataclass (``bptt``: ``steps=t1``)."""
        estimator = get_estimator(self.method)
        values = {k: getattr(self, k) for k in _OPTION_FIELDS if k in estimator.option_names}
        values.update({k: self.t1 for k in estimator.t1_keys if k in estimator.option_names})
        return estimator.options(**values)

    def estimator_settings(self) -> EstimatorSettings:
        """Keyword arguments of ``estimate_gradient`` for this run's method: its
        :meth:`solver_settings` and :meth:`method_options` records."""
        return {"solver": self.solver_settings(), "options": self.method_options()}

    # ----------------------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, object]:
        """Plain types only (``torch.load(weights_only=True)`` reads it back)."""
        out = dataclasses.asdict(self)
        out["out"] = str(self.out)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` (unknown keys are an error).

        Options the run's method never used (older versions accepted and ignored them; see
        :data:`APPLIES_TO`) are read as their defaults, so such checkpoints still load and
        resume unchanged.

        Raises:
            StateError: ``values`` is not a mapping or has unknown keys.
            ConfigurationError: a value is invalid (as for the constructor).
        """
        if not isinstance(values, Mapping):
            raise StateError(
                f"a training config must be a mapping of options; got {type(values).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise StateError(f"unknown training option(s) {unknown} in the checkpoint config")
        values = dict(values)
        if isinstance(values.get("out"), str):
            values["out"] = Path(values["out"])
        method = values.get("method", _defaults()["method"])
        for name, methods in APPLIES_TO.items():
            if method not in methods:
                values.pop(name, None)
        return cls(**values)


def _defaults() -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}
