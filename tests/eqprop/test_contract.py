"""The library-wide contract in the eqprop pillar: one error family, the ``nonfinite`` policy
(with ``on_failure=`` as its deprecated alias), warnings attributed to the caller's line, and the
pillar's module-size and import-cycle limits."""

import ast
import warnings
from pathlib import Path

import pytest
import torch

import gradstats.eqprop
from gradstats import errors
from gradstats.eqprop import (
    AnalyticityWarning,
    ConvergenceWarning,
    estimate_gradient,
    relax,
    solve_adjoint,
)
from gradstats.eqprop.models import LinearModel, TanhModel
from gradstats.eqprop.train import TrainingDiverged, TrainResult

from ._cases import TIGHT, float64, tanh_case

PILLAR = Path(gradstats.eqprop.__file__).parent


def _diverging():
    """F = 0.5 z + Bx: the relaxation grows like 1.25^t from z = 0."""
    base, x, y = tanh_case()
    return LinearModel(0.5 * torch.eye(8), base.U.data, base.C.data), x, y


# ----------------------------------------------------------------------------- error family
def test_divergence_error_is_the_library_class():
    assert gradstats.eqprop.DivergenceError is errors.DivergenceError
    assert issubclass(TrainingDiverged, errors.DivergenceError)
    assert issubclass(errors.DivergenceError, RuntimeError)


def test_divergence_names_phase_step_and_samples():
    model, x, _ = _diverging()
    with pytest.raises(errors.DivergenceError, match="free phase diverged") as info:
        relax(model, x, tol=0.0, max_steps=2000)
    assert info.value.phase == "free"
    assert isinstance(info.value.step, int)
    assert info.value.samples
    assert all(isinstance(i, int) for i in info.value.samples)


def test_bptt_divergence_names_its_phase():
    model, x, y = _diverging()
    with pytest.raises(errors.DivergenceError) as info:
        estimate_gradient(model, x, y, "bptt", steps=2000)
    assert info.value.phase == "bptt"


# ----------------------------------------------------------------------------- nonfinite policy
def test_nonfinite_skip_drops_the_whole_estimate():
    model, x, y = _diverging()
    est = estimate_gradient(model, x, y, "aep", max_steps=2000, tol=0.0, nonfinite="skip")
    assert est.skipped
    assert "diverged" in est.reason
    assert all(bool((g == 0).all()) for g in est.grads.values())
    assert (est.state, est.loss, est.stats) == (None, None, {})


def test_nonfinite_raise_is_the_default():
    model, x, y = _diverging()
    with pytest.raises(errors.DivergenceError, match="diverged"):
        estimate_gradient(model, x, y, "aep", max_steps=2000, tol=0.0)


def test_non_finite_target_is_never_a_gradient():
    model, x, y = tanh_case()
    y = y.clone()
    y[0, 0] = float("inf")
    with pytest.raises(errors.DivergenceError):
        estimate_gradient(model, x, y, "implicit")
    est = estimate_gradient(model, x, y, "implicit", nonfinite="skip")
    assert est.skipped
    assert all(bool(torch.isfinite(g).all()) for g in est.grads.values())


def test_on_failure_is_a_deprecated_alias_of_nonfinite():
    model, x, y = _diverging()
    with pytest.warns(FutureWarning, match="on_failure= is deprecated; use nonfinite="):
        est = estimate_gradient(model, x, y, "aep", max_steps=2000, tol=0.0, on_failure="skip")
    assert est.skipped


def test_on_failure_raise_still_raises():
    model, x, y = _diverging()
    with (
        pytest.warns(FutureWarning, match="on_failure= is deprecated"),
        pytest.raises(errors.DivergenceError),
    ):
        estimate_gradient(model, x, y, "aep", max_steps=2000, tol=0.0, on_failure="raise")


@pytest.mark.parametrize("nonfinite", ["skip", "raise"], ids=["other", "the-default"])
def test_on_failure_and_nonfinite_together_is_an_error(nonfinite):
    """Both names given is an error even when nonfinite= is given its default value."""
    model, x, y = tanh_case()
    with pytest.raises(errors.ConfigurationError, match="pass nonfinite= only"):
        estimate_gradient(model, x, y, "aep", nonfinite=nonfinite, on_failure="skip")


def test_train_result_counter_is_named_skipped():
    result = TrainResult(
        step=3,
        val_ce=None,
        skipped_steps=2,
        unconverged_fraction=0.0,
        checkpoint=Path("c"),
        metrics=Path("m"),
        curves=Path("p"),
    )
    assert result.skipped == result.skipped_steps == 2


# ----------------------------------------------------------------------------- warnings
def _only(record, category):
    caught = [w for w in record if issubclass(w.category, category)]
    assert caught, f"no {category.__name__}"
    return caught


def test_convergence_warning_points_at_the_callers_line():
    model, x, y = tanh_case()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        estimate_gradient(model, x, y, "aep", max_steps_adjoint=3, tol_adjoint=1e-10)
    assert {w.filename for w in _only(record, ConvergenceWarning)} == {__file__}


def test_relax_warning_points_at_the_callers_line():
    model, x, _ = tanh_case()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        relax(model, x, max_steps=2, tol=1e-12)
    assert {w.filename for w in _only(record, ConvergenceWarning)} == {__file__}


def test_gmres_warning_points_at_the_callers_line():
    ell = torch.ones(2, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        solve_adjoint(lambda u: -0.01 * u, ell, method="gmres", tol=1e-12, max_steps=1)
    assert {w.filename for w in _only(record, ConvergenceWarning)} == {__file__}


def test_analyticity_warning_points_at_the_callers_line():
    with float64():
        model, x, y = tanh_case()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        estimate_gradient(model, x, y, "holomorphic", beta=0.3, points=4, **TIGHT)
    assert {w.filename for w in _only(record, AnalyticityWarning)} == {__file__}


# ----------------------------------------------------------------------------- module limits
MODULES = sorted(PILLAR.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PILLAR)))
def test_module_has_at_most_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PILLAR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """gradstats.eqprop modules imported at module level (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("gradstats.eqprop")}


def test_no_import_cycles_inside_the_pillar():
    graph = {_module_name(p): _imports(p) for p in MODULES}
    # a package's own __init__ importing its submodules is not a cycle through the submodule
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*trail, dep])}"
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


class _RealOnlyTanh(TanhModel):
    """A user model that forgets to cast its real weights to the (complex) state's dtype."""

    def force(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -z + torch.tanh(z) @ self.W.T + x @ self.U.T + self.b


def test_a_model_that_is_not_complex_ready_gets_a_clear_holomorphic_error():
    model, x, y = tanh_case()
    user = _RealOnlyTanh(model.W, model.U, model.b, model.C)
    estimate_gradient(user, x, y, "aep")  # real arithmetic: fine
    with pytest.raises(
        errors.ConfigurationError,
        match=r"method='holomorphic' relaxes the nudged phases in complex arithmetic.*"
        r"W\.to\(z\.dtype\)",
    ):
        estimate_gradient(user, x, y, "holomorphic")
