"""The probe: per-group comparison with the exact gradient, sweeps, diagnose(), JSON/CSV/PNG."""

import json

import pytest
import torch

import gradstats.eqprop._probe as probe_module
from gradstats.eqprop import (
    FINDINGS,
    ProbeReport,
    ProbeRow,
    diagnose,
    estimate_gradient,
    model_fingerprint,
    probe,
)
from gradstats.errors import ConfigurationError, ConfigurationTypeError
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
    assert row.rel_err == pytest.approx(rel(flat(est.grads), flat(ref["grads"])), rel=1e-6)
    assert report.model["fingerprint"] == model_fingerprint(model)
    assert report.reference["converged"] is True


def test_fingerprint_changes_with_the_weights():
    model, _, _ = tanh_case()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.W[0, 0] += 1e-12
    assert model_fingerprint(model) != before


@pytest.mark.parametrize("method", ["ep_symmetric", "aep"])
@pytest.mark.parametrize(("sweep", "values"), [("T2", [2, 8, 32]), ("beta", [0.08, 0.04, 0.02])])
def test_rows_cover_every_group_and_sweep(sweep_report, method, sweep, values):
    model, _, _, report = sweep_report
    rows = report.select(method=method, sweep=sweep)
    assert {r.group for r in rows} == {*model.parameter_groups(), "all"}
    assert sorted({r.value for r in rows}) == sorted(values)


def test_t2_sweep_runs_exactly_t2_steps_and_echoes_the_overrides(sweep_report):
    report = sweep_report[3]
    t2_rows = report.select(method="aep", sweep="T2", group="all")
    assert [r.steps_adjoint for r in t2_rows] == [2, 8, 32]
    assert report.settings == {"tol_adjoint": 1e-10}  # the overrides, echoed


def test_rows_are_typed_records_that_still_read_like_dicts(sweep_report):
    row = sweep_report[3].select(method="aep", sweep=None, group="all")[0]
    assert isinstance(row, ProbeRow)
    assert row["cos"] == row.cos
    assert row.get("anchor") == row.anchor == "tracking"
    assert row.get("no_such_field", "default") == "default"
    assert dict(row) == row.as_dict()
    assert list(row)[:4] == ["method", "sweep", "value", "group"]
    with pytest.raises(KeyError):
        row["no_such_field"]
    with pytest.raises(AttributeError):
        row.cos = 0.0  # frozen


def test_select_rejects_an_unknown_field(sweep_report):
    with pytest.raises(ConfigurationError, match=r"unknown field\(s\) \['methd'\]"):
        sweep_report[3].select(methd="aep")


def test_readout_group_is_exact_for_every_estimator(sweep_report):
    """C only enters the loss: its gradient is the direct ∂L/∂C whatever the adjoint."""
    _, _, _, report = sweep_report
    assert all(row.rel_err < 1e-8 for row in report.select(group="C"))


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
    adj = [r.adj_err for r in report.select(sweep="T1", group="all")]
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
        model, x, y, methods=("holomorphic",), sweeps={"points": [2, 3, 4, 6]}, beta=0.1,
        bptt=False,
    )  # fmt: skip
    assert "finite-nudge bias" in _names(diagnose(report), "holomorphic")


def _scaled(report, method, factor):
    """``report`` with every error of ``method`` multiplied by ``factor`` (same sweeps)."""
    import dataclasses

    rows = [
        dataclasses.replace(r, rel_err=r.rel_err * factor) if r.method == method else r
        for r in report.rows
    ]
    return dataclasses.replace(report, rows=rows)


@pytest.fixture(scope="module")
def points_report():
    with float64():
        model, x, y = tanh_case()
        return probe(model, x, y, methods=("holomorphic",), sweeps={"points": [2, 3, 4, 6]},
                     beta=0.1, bptt=False)  # fmt: skip


@pytest.mark.parametrize(
    ("factor", "expected"),
    [
        (1e-5, {"ok"}),  # errors 3e-7..1e-6 that still shrink with N: ok, not a bias
        (1.0, {"finite-nudge bias"}),  # the same shape above OK_ERROR: the bias is named
    ],
)
def test_diagnose_names_a_cause_only_above_the_threshold(points_report, factor, expected):
    assert (
        _names(diagnose(_scaled(points_report, "holomorphic", factor)), "holomorphic") == expected
    )


@pytest.mark.parametrize(("error", "expected"), [(2.5e-2, "undetermined"), (5e-3, "ok")])
def test_diagnose_ok_is_the_base_error_at_most_ok_error(error, expected):
    """An AEP error of 2.5e-2 is never "ok" (its cosine is 0.9997); 5e-3 is."""
    import dataclasses

    from gradstats.eqprop._diagnose import OK_ERROR

    with float64():
        model, x, y = tanh_case()
        report = probe(model, x, y, methods=("aep",), bptt=False)
    rows = [dataclasses.replace(r, rel_err=error) for r in report.rows]
    (finding,) = diagnose(dataclasses.replace(report, rows=rows))
    assert finding.name == expected
    assert f"{OK_ERROR:g}" in finding.evidence


def test_save_writes_json_csv_png(sweep_report, tmp_path):
    report = sweep_report[3]
    paths = report.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["format"] == "gradstats.eqprop.probe"
    assert data["version"] == 1
    assert len(data["rows"]) == len(report.rows)
    assert data["rows"][0] == report.rows[0].as_dict()  # one plain object per row, as before
    assert list(data["rows"][0]) == list(ProbeRow.__dataclass_fields__)
    assert set(data) == {"format", "version", "model", "settings", "reference", "asymmetry"} | {
        "sweeps",
        "rows",
        "warnings",
    }
    assert paths["csv"].read_text().splitlines()[0] == ",".join(ProbeRow.__dataclass_fields__)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cos" in report.table()


def test_float32_model_is_compared_with_a_float64_reference():
    model, x, y = tanh_case()
    model, x, y = model.float(), x.float(), y.float()
    report = probe(model, x, y, methods=("aep",), bptt=False)
    row = report.select(method="aep", sweep=None, group="all")[0]
    assert report.model["dtype"] == "torch.float32"
    assert row.cos > 0.9999
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_one_noise_realisation_for_every_estimate():
    base, x, y = tanh_case()
    model = NoisyTanh(base, sigma=0.5)
    report = probe(model, x, y, methods=("aep",), generator=gen(3), bptt=False, beta=0.01)
    row = report.select(method="aep", sweep=None, group="all")[0]
    assert row.rel_err < 1e-3  # with mismatched noise it would be O(σ)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ("eqprop",)}, ConfigurationError, "methods must be one of"),
        ({"methods": "aep"}, ConfigurationTypeError, "methods must be a non-empty list"),
        ({"methods": ()}, ConfigurationTypeError, "methods must be a non-empty list"),
        ({"sweeps": {"T3": [1]}}, ConfigurationError, "sweeps must be one of"),
        ({"sweeps": {"beta": []}}, ConfigurationError, "is empty"),
        ({"sweeps": {"beta": 0.1}}, ConfigurationTypeError, "must be a list of numbers"),
        ({"sweeps": [("beta", [0.1])]}, ConfigurationTypeError, "sweeps must be a mapping"),
        ({"sweeps": {"beta": [-0.1]}}, ConfigurationError, "value must be a finite float > 0"),
        ({"sweeps": {"T2": [2.5]}}, ConfigurationError, "values must be whole numbers"),
        ({"sweeps": {"T2": [0]}}, ConfigurationError, "value must be a finite float > 0"),
        (
            {"methods": ("holomorphic",), "sweeps": {"points": [1]}},
            ConfigurationError,
            "points must be an int >= 2",
        ),
        ({"stepsize": 0.1}, ConfigurationError, "unknown setting"),
        ({"step_size": -1.0}, ConfigurationError, "step_size must be a finite float > 0"),
        ({"reference": {"tolerance": 1.0}}, ConfigurationError, "reference has unknown"),
        ({"reference": 1e-12}, ConfigurationTypeError, "reference must be a mapping"),
        ({"float64": "yes"}, ConfigurationTypeError, "float64 must be a bool"),
        ({"bptt": 1}, ConfigurationTypeError, "bptt must be a bool"),
    ],
)
def test_bad_probe_arguments_fail_before_any_compute(monkeypatch, kwargs, error, match):
    def no_compute(*args, **kwargs):
        raise AssertionError("an estimate ran before the arguments were checked")

    monkeypatch.setattr(probe_module, "estimate_gradient", no_compute)
    model, x, y = tanh_case()
    with pytest.raises(error, match=match):
        probe(model, x, y, **kwargs)


def test_probe_rejects_a_non_model():
    with pytest.raises(ConfigurationTypeError, match="model must be an EquilibriumModule"):
        probe(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_diagnose_rejects_a_non_report():
    with pytest.raises(ConfigurationTypeError, match="report must be a ProbeReport"):
        diagnose({"rows": []})
    assert diagnose(ProbeReport(rows=[], model={}, settings={}, reference={}, asymmetry=0.0)) == []
