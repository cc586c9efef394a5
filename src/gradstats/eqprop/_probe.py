"""The probe: every estimator against the exact implicit gradient, per parameter group.

:func:`probe` takes the model object itself (never a re-built one), computes the reference
g_implicit (tight tolerances, GMRES, optionally on a float64 copy), g_bptt(T1) and each
estimator's gradient — all with one noise realisation — and reports per parameter group:
cos(g_est, g_implicit), the relative error ‖g_est − g_implicit‖/‖g_implicit‖,
cos(g_bptt(T1), g_implicit), the free residual of the state the estimator used (``res_free_T1``),
the free residual of the reference fixed point (``res_free_final``), the estimator's own
adjoint/contrast residual (``res_adjoint``) and the steps of each phase. Sweeps vary one setting:

* ``T2``: the nudged/adjoint step count (run exactly: ``tol_adjoint=0``);
* ``beta``: β, or the radius r for ``holomorphic``;
* ``points``: N (``holomorphic``);
* ``T1``: the free-phase step count (run exactly: ``tol=0``; BPTT uses the same T1).

:func:`~gradstats.eqprop.diagnose` reads a report and names what limits each estimator.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradstats._format import format_table
from gradstats._validation import check_choice
from gradstats.eqprop._autodiff import Linearization, per_sample_norm
from gradstats.eqprop._estimators import check_method_supported, estimate_gradient
from gradstats.eqprop._module import METHODS, EquilibriumModule, model_fingerprint
from gradstats.eqprop._problem import prepare
from gradstats.eqprop._settings import _APPLIES_TO, SETTING_KEYS

__all__ = ["SWEEPS", "ProbeReport", "probe"]

#: Sweep name -> the settings each value sets.
SWEEPS = {
    "T2": lambda v: {"max_steps_adjoint": int(v), "tol_adjoint": 0.0},
    "beta": lambda v: {"beta": float(v)},
    "points": lambda v: {"points": int(v)},
    "T1": lambda v: {"max_steps": int(v), "tol": 0.0},
}
_SWEEP_METHODS = {
    "T2": ("implicit", "ep", "ep_symmetric", "aep", "holomorphic"),
    "beta": ("ep", "ep_symmetric", "aep", "holomorphic"),
    "points": ("holomorphic",),
    "T1": METHODS,
}
_REFERENCE = {
    "tol": 1e-12,
    "tol_adjoint": 1e-11,
    "max_steps": 100_000,
    "adjoint_solver": "gmres",
    "gmres_restart": 30,
}
FORMAT, VERSION = "gradstats.eqprop.probe", 1


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else math.nan


def _flat(grads: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([grads[n].detach().double().cpu().reshape(-1) for n in names])


def _groups(model: EquilibriumModule) -> dict[str, list[str]]:
    groups = dict(model.parameter_groups())
    groups["all"] = [n for n, p in model.named_parameters() if p.requires_grad]
    return groups


def _for_method(method: str, settings: Mapping[str, object]) -> dict[str, object]:
    out = {k: v for k, v in settings.items() if k not in _APPLIES_TO or method in _APPLIES_TO[k]}
    if method == "holomorphic" and out.get("correction") is False:
        out.pop("anchor", None)  # the anchor only exists with the AEP correction
    return out


def _worst(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().double().max())


@dataclass
class ProbeReport:
    """Rows of a probe run plus what produced them (JSON/CSV/PNG writers, a table)."""

    rows: list[dict[str, object]]
    model: dict[str, object]
    settings: dict[str, object]
    reference: dict[str, object]
    asymmetry: float
    sweeps: dict[str, list[object]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "settings": self.settings,
            "reference": self.reference,
            "asymmetry": self.asymmetry,
            "sweeps": self.sweeps,
            "rows": self.rows,
            "warnings": self.warnings,
        }

    def select(self, **match: object) -> list[dict[str, object]]:
        """Rows whose fields equal ``match`` (e.g. ``method="aep", sweep="beta"``)."""
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    def table(self, group: str | None = "all") -> str:
        """The rows of ``group`` (all groups with ``None``) as a text table."""
        cols = ["method", "sweep", "value", "group", "cos", "rel_err", "adj_err", "cos_bptt"]
        cols += ["res_free_T1", "res_free_final", "res_adjoint", "steps_free", "steps_adjoint"]
        rows = [r for r in self.rows if group is None or r["group"] == group]

        def cell(row, col):
            value = row.get(col)
            if col in ("cos", "cos_bptt") and isinstance(value, float):
                return f"{value:.6f}"  # 1 − cos is what matters: keep the digits
            return value

        return format_table([[cell(r, c) for c in cols] for r in rows], cols)

    def save(self, directory: str | Path, stem: str = "probe") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png``; return their paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        paths["png"] = self.plot(out / f"{stem}.png")
        return paths

    def plot(self, path: str | Path) -> Path:
        """Relative error and adjoint residual against each swept setting (group ``all``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sweeps = sorted({r["sweep"] for r in self.rows if r["sweep"] is not None})
        ncol = max(len(sweeps), 1)
        fig, axes = plt.subplots(2, ncol, figsize=(4 * ncol, 6), squeeze=False)
        for j, sweep in enumerate(sweeps):
            for method in sorted({r["method"] for r in self.select(sweep=sweep)}):
                rows = self.select(sweep=sweep, method=method, group="all")
                xs = [r["value"] for r in rows]
                axes[0][j].loglog(xs, [max(r["rel_err"], 1e-18) for r in rows], "o-", label=method)
                res = [r["res_adjoint"] for r in rows]
                if all(v is not None for v in res):
                    axes[1][j].loglog(xs, [max(v, 1e-18) for v in res], "o-", label=method)
            axes[0][j].set_title(f"sweep {sweep}")
            axes[0][j].set_ylabel("rel. error vs implicit")
            axes[1][j].set_ylabel("adjoint residual")
            axes[1][j].set_xlabel(sweep)
            axes[0][j].legend(fontsize=7)
        if not sweeps:
            rows = [r for r in self.rows if r["group"] != "all" and r["sweep"] is None]
            labels = [f"{r['method']}/{r['group']}" for r in rows]
            axes[0][0].bar(range(len(rows)), [max(r["rel_err"], 1e-18) for r in rows])
            axes[0][0].set_yscale("log")
            axes[0][0].set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
            axes[0][0].set_ylabel("rel. error vs implicit")
            axes[1][0].axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)


def _reference_model(model, x, y, noise, float64: bool):
    if not float64:
        return model, x, y, noise
    ref = copy.deepcopy(model).to(torch.float64)

    def cast(t):
        return t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return ref, cast(x), cast(y), None if noise is None else noise.to(torch.float64)


def probe(
    model: EquilibriumModule,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    methods: Sequence[str] = ("aep",),
    sweeps: Mapping[str, Sequence[float]] | None = None,
    reference: Mapping[str, object] | None = None,
    float64: bool = True,
    bptt: bool = True,
    noise=None,
    generator: torch.Generator | None = None,
    **settings: object,
) -> ProbeReport:
    """Compare estimators with the exact implicit gradient on ``model`` (see module docstring).

    Args:
        model: the model to analyse — the object itself, so its exact dynamics are probed.
        x, y: one batch.
        methods: estimators to compare (any of ``METHODS``).
        sweeps: ``{"T2"|"beta"|"points"|"T1": [values]}``.
        reference: overrides of the reference settings (default: tol 1e-12, tol_adjoint 1e-11,
            GMRES, up to 100 000 steps).
        float64: compute the reference on a float64 copy of the model.
        bptt: also report cos(g_bptt(T1), g_implicit).
        noise, generator: one noise realisation for every estimate (drawn from ``generator``
            if not given).
        **settings: estimator settings applied to every method where they apply (echoed in the
            report as ``settings``).
    """
    for method in methods:
        check_choice("methods", method, METHODS)
        check_method_supported(model, method)
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {', '.join(SETTING_KEYS)}")
    sweeps = dict(sweeps or {})
    for name, values in sweeps.items():
        check_choice("sweeps", name, tuple(SWEEPS))
        if not values:
            raise ValueError(f"sweeps[{name!r}] is empty")
    ref_settings = {**_REFERENCE, **(reference or {})}
    if noise is None:
        with torch.no_grad():
            noise = model.sample_noise(model.inject(x), generator)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        ref_model, rx, ry, rnoise = _reference_model(model, x, y, noise, float64)
        ref = estimate_gradient(ref_model, rx, ry, "implicit", noise=rnoise, **ref_settings)
        problem = prepare(ref_model, rx, ry, noise=rnoise)
        lin = Linearization(problem.force, ref.state, ref_model.jvp_mode)
        gen = torch.Generator(device=ref.state.device).manual_seed(0)
        v = torch.randn(
            ref.state.shape, generator=gen, dtype=ref.state.dtype, device=ref.state.device
        )
        jv = lin.jvp(v)
        asymmetry = float(per_sample_norm(jv - lin.vjp(v)).norm() / per_sample_norm(jv).norm())
        groups = _groups(model)
        bptt_cache: dict[int, dict[str, torch.Tensor]] = {}

        def bptt_grads(t1: int):
            if t1 not in bptt_cache:
                kw = {k: v for k, v in settings.items() if k in ("step_size", "check_every")}
                est = estimate_gradient(model, x, y, "bptt", noise=noise, steps=t1, **kw)
                bptt_cache[t1] = est.grads
            return bptt_cache[t1]

        rows: list[dict[str, object]] = []
        for method in methods:
            runs: list[tuple[str | None, object, dict]] = [(None, None, {})]
            for name, values in sweeps.items():
                if method in _SWEEP_METHODS[name]:
                    runs += [(name, value, SWEEPS[name](value)) for value in values]
            for sweep, value, override in runs:
                kw = {**_for_method(method, settings), **_for_method(method, override)}
                if method == "bptt" and "max_steps" in override:
                    kw["steps"] = override["max_steps"]
                est = estimate_gradient(model, x, y, method, noise=noise, on_failure="skip", **kw)
                t1 = int(est.settings["steps"] or est.settings["max_steps"])
                g_bptt = bptt_grads(t1) if bptt else None
                adj_err = None
                if est.adjoint is not None:
                    lam = ref.adjoint.double().cpu()
                    adj_err = _rel(est.adjoint.double().cpu().reshape(-1), lam.reshape(-1))
                free = est.stats.get("free", est.stats.get("bptt"))
                adj = est.stats.get("nudged", est.stats.get("adjoint"))
                for group, names in groups.items():
                    g_ref = _flat(ref.grads, names)
                    row = {
                        "method": method,
                        "sweep": sweep,
                        "value": value,
                        "group": group,
                        "cos": math.nan,
                        "rel_err": math.nan,
                        "adj_err": adj_err,
                        "cos_bptt": None if g_bptt is None else _cos(_flat(g_bptt, names), g_ref),
                        "res_free_T1": None if free is None else _worst(free.final_residual),
                        "res_free_final": _worst(ref.stats["free"].final_residual),
                        "res_adjoint": None if adj is None else _worst(adj.final_residual),
                        "steps_free": None if free is None else int(free.steps.max()),
                        "steps_adjoint": None if adj is None else int(adj.steps.max()),
                        "converged_adjoint": None if adj is None else adj.all_converged(),
                        "skipped": est.skipped,
                        "T1": t1,
                        "anchor": est.settings["anchor"],
                    }
                    if not est.skipped:
                        g = _flat(est.grads, names)
                        row["cos"], row["rel_err"] = _cos(g, g_ref), _rel(g, g_ref)
                    rows.append(row)
        caught = [f"{w.category.__name__}: {w.message}" for w in log]
    return ProbeReport(
        rows=rows,
        model={
            "class": type(model).__name__,
            "describe": model.describe(),
            "config": model.config(),
            "fingerprint": model_fingerprint(model),
            "dtype": str(next(model.parameters()).dtype),
        },
        settings=dict(settings),
        reference={
            **ref_settings,
            "float64": float64,
            "converged": ref.converged(),
            "res_free": _worst(ref.stats["free"].final_residual),
            "res_adjoint": _worst(ref.stats["adjoint"].final_residual),
        },
        asymmetry=asymmetry,
        sweeps={k: list(v) for k, v in sweeps.items()},
        warnings=caught,
    )
