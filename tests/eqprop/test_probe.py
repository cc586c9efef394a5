"""The probe: per-group comparison with the exact gradient, sweeps, diagnose(), JSON/CSV/PNG."""

import json

import pytest
import torch

from gradstats.eqprop import (
    FINDINGS,
    diagnose,
    estimate_gradient,
    model_fingerprint,
    probe,
)
from gradstats.testing import reference_implicit_gradient

from ._cases import NoisyTanh, flat, float64, gen, rel, tanh_case


def _names(findings, method):
    return {f.name for f in findings if f.method == method}


@pytest.fixture(scope="module")
def sweep_report():
    with float64():
        model, x, y = tanh_case()
        report = probe(
            model,
            x,
            y,
            methods=("ep_symmetric", "aep"),
            sweeps={"T2": [2, 8, 32], "beta": [0.08, 0.04, 0.02]},
            tol_adjoint=1e-10,
        )
        return model, x, y, report


def test_reference_is_the_exact_gradient_of_this_model(sweep_report):
    model, x, y, report = sweep_report
    ref = reference_implicit_gradient(model, x, y)
    est = estimate_gradient(model, x, y, "aep", tol_adjoint=1e-10)
    row = report.select(method="aep", sweep=None, group="all")[0]
    assert row["rel_err"] == pytest.approx(rel(flat(est.grads), flat(ref["grads"])), rel=1e-6)
    assert report.model["fingerprint"] == model_fingerprint(model)
    assert report.reference["converged"] is True


def test_fingerprint_changes_with_the_weights():
    model, _, _ = tanh_case()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.W[0, 0] += 1e-12
    assert model_fingerprint(model) != before


def test_rows_cover_every_group_and_sweep(sweep_report):
    model, _, _, report = sweep_report
    groups = {*model.parameter_groups(), "all"}
    for method in ("ep_symmetric", "aep"):
        for sweep, values in (("T2", [2, 8, 32]), ("beta", [0.08, 0.04, 0.02])):
            rows = report.select(method=method, sweep=sweep)
            assert {r["group"] for r in rows} == groups
            assert sorted({r["value"] for r in rows}) == sorted(values)
    t2_rows = report.select(method="aep", sweep="T2", group="all")
    assert [r["steps_adjoint"] for r in t2_rows] == [2, 8, 32]
    assert report.settings == {"tol_adjoint": 1e-10}  # the overrides, echoed


def test_readout_group_is_exact_for_every_estimator(sweep_report):
    """C only enters the loss: its gradient is the direct ∂L/∂C whatever the adjoint."""
    _, _, _, report = sweep_report
    for row in report.select(group="C"):
        assert row["rel_err"] < 1e-8


def test_diagnose_plain_ep_on_an_asymmetric_model(sweep_report):
    names = _names(diagnose(sweep_report[3]), "ep_symmetric")
    assert "residual asymmetry" in names
    assert "finite-nudge bias" not in names


def test_diagnose_aep_truncation_and_nudge_bias(sweep_report):
    names = _names(diagnose(sweep_report[3]), "aep")
    assert names == {"truncation", "finite-nudge bias"}


@pytest.mark.parametrize(("anchor", "mismatch"), [("fixed", True), ("tracking", False)])
def test_diagnose_anchor_mismatch(anchor, mismatch):
    model, x, y = tanh_case()
    report = probe(
        model,
        x,
        y,
        methods=("aep",),
        sweeps={"T1": [2, 4, 8]},
        anchor=anchor,
        beta=0.01,
        tol_adjoint=1e-10,
        bptt=False,
    )
    names = _names(diagnose(report), "aep")
    assert ("anchor mismatch" in names) is mismatch
    assert "truncation" in names  # the gradient is evaluated at the unconverged T1 state
    adj = [r["adj_err"] for r in report.select(sweep="T1", group="all")]
    if not mismatch:
        assert max(adj) / min(adj) < 1.05


def test_diagnose_ok_at_default_settings():
    model, x, y = tanh_case()
    report = probe(model, x, y, methods=("aep", "holomorphic", "implicit"), bptt=False)
    findings = diagnose(report)
    assert {f.name for f in findings} == {"ok"}
    assert all(f.name in FINDINGS for f in findings)


def test_holomorphic_points_sweep_is_geometric():
    model, x, y = tanh_case()
    report = probe(
        model, x, y, methods=("holomorphic",), sweeps={"points": [3, 4, 6]}, beta=0.1, bptt=False
    )
    assert "finite-nudge bias" in _names(diagnose(report), "holomorphic")


def test_save_writes_json_csv_png(sweep_report, tmp_path):
    report = sweep_report[3]
    paths = report.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "gradstats.eqprop.probe"
    assert data["version"] == 1
    assert len(data["rows"]) == len(report.rows)
    assert paths["csv"].read_text().splitlines()[0].startswith("method,sweep,value,group")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cos" in report.table()


def test_float32_model_is_compared_with_a_float64_reference():
    model, x, y = tanh_case()
    model, x, y = model.float(), x.float(), y.float()
    report = probe(model, x, y, methods=("aep",), bptt=False)
    row = report.select(method="aep", sweep=None, group="all")[0]
    assert report.model["dtype"] == "torch.float32"
    assert row["cos"] > 0.9999
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_one_noise_realisation_for_every_estimate():
    base, x, y = tanh_case()
    model = NoisyTanh(base, sigma=0.5)
    report = probe(model, x, y, methods=("aep",), generator=gen(3), bptt=False, beta=0.01)
    row = report.select(method="aep", sweep=None, group="all")[0]
    assert row["rel_err"] < 1e-3  # with mismatched noise it would be O(σ)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": ("eqprop",)}, "methods must be one of"),
        ({"sweeps": {"T3": [1]}}, "sweeps must be one of"),
        ({"sweeps": {"beta": []}}, "is empty"),
        ({"stepsize": 0.1}, "unknown setting"),
    ],
)
def test_bad_probe_arguments(kwargs, match):
    model, x, y = tanh_case()
    with pytest.raises(ValueError, match=match):
        probe(model, x, y, **kwargs)
