"""``probe.png`` and ``curves.png`` read well: labels, legends and tick texts of the figure objects.

The figures are built from made-up rows and records (nothing is computed), then drawn once so
tick labels exist; the checks read the matplotlib objects (titles, axis labels, legend texts,
tick label texts and their extents), never pixels.
"""

import dataclasses
import itertools
import json
import re

import pytest

from gradstats.eqprop import ProbeReport, ProbeRow
from gradstats.eqprop._plotting import pyplot
from gradstats.eqprop.train import TrainConfig
from gradstats.eqprop.train import _loop as loop
from gradstats.eqprop.train._metrics import curves_figure

SWEEPS = {
    "T1": [2, 4, 8],
    "T2": [2, 8, 32, 128],
    "beta": [0.0125, 0.025, 0.05, 0.1],
    "points": [2, 3, 4, 6],
}
METHODS = {  # method: the sweeps the probe runs for it (as the registry declares them)
    "aep": ("T2", "beta", "T1"),
    "ep_symmetric": ("T2", "beta", "T1"),
    "holomorphic": ("T2", "beta", "points", "T1"),
    "bptt": ("T1",),
}


def _row(method, sweep=None, value=None, group="all", rel_err=1e-3, res_adjoint=1e-6):
    return ProbeRow(method=method, sweep=sweep, value=value, group=group, cos=0.99,
                    rel_err=rel_err, adj_err=None, cos_bptt=None, res_free_T1=1e-7,
                    res_free_final=1e-9, res_adjoint=None if method == "bptt" else res_adjoint,
                    steps_free=10, steps_adjoint=5, converged_adjoint=True, skipped=False, T1=10,
                    anchor=None)  # fmt: skip


def _report(rows):
    return ProbeReport(rows=rows, model={}, settings={}, reference={}, asymmetry=0.0)


def _sweep_rows():
    rows = []
    for k, (method, sweeps) in enumerate(METHODS.items()):
        rows.append(_row(method))
        for sweep in sweeps:
            for i, value in enumerate(SWEEPS[sweep]):
                rows.append(_row(method, sweep, float(value), rel_err=10.0 ** (-2 - i - k),
                                 res_adjoint=3e-6 / (i + 1)))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def probe_axes():
    """``{column title: (top axes, bottom axes)}`` of a drawn probe figure with every sweep."""
    fig = _report(_sweep_rows()).figure()
    fig.canvas.draw()
    top, bottom = fig.axes[: len(fig.axes) // 2], fig.axes[len(fig.axes) // 2 :]
    yield fig, {a.get_title(): (a, b) for a, b in zip(top, bottom, strict=True)}
    pyplot().close(fig)


def _drawn(axis, minor=False):
    """The tick labels of ``axis`` that are drawn: visible, non-empty, inside the view."""
    low, high = sorted(axis.get_view_interval())
    locs = axis.get_minorticklocs() if minor else axis.get_majorticklocs()
    labels = axis.get_minorticklabels() if minor else axis.get_majorticklabels()
    pairs = zip(locs, labels, strict=False)
    return [t for v, t in pairs if low <= v <= high and t.get_visible() and t.get_text()]


def _texts(axis, minor=False):
    return [t.get_text() for t in _drawn(axis, minor)]


def _legend(ax):
    legend = ax.get_legend()
    return None if legend is None else [t.get_text() for t in legend.get_texts()]


def _overlaps(fig):
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for a, b in itertools.combinations(_drawn(axis), 2):
                if a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)):
                    found.append((ax.get_title(), a.get_text(), b.get_text()))
    return found


COLUMNS = {  # title: (x-label pattern, the methods in its legend)
    "sweep T1": (r"^T1 \(free-phase steps\)$", ["aep", "bptt", "ep_symmetric", "holomorphic"]),
    "sweep T2": (r"^T2 \(nudged/adjoint steps\)$", ["aep", "ep_symmetric", "holomorphic"]),
    "sweep β (EP / AEP)": (r"^nudge β$", ["aep", "ep_symmetric"]),
    "sweep r (holomorphic)": (r"^radius r ", ["holomorphic"]),
    "sweep N (holomorphic)": (r"^N \(nudges on the circle\)$", ["holomorphic"]),
}


def test_probe_has_one_column_per_sweep_in_a_fixed_order(probe_axes):
    assert list(probe_axes[1]) == list(COLUMNS)


@pytest.mark.parametrize("title", list(COLUMNS))
@pytest.mark.parametrize("row", [0, 1], ids=["error", "residual"])
def test_probe_panel_has_its_x_label_and_y_label(probe_axes, title, row):
    ax = probe_axes[1][title][row]
    assert re.search(COLUMNS[title][0], ax.get_xlabel())
    assert ax.get_ylabel() == ("rel. error vs implicit", "adjoint residual")[row]


def test_holomorphic_r_is_not_on_the_beta_axis(probe_axes):
    beta_top, _ = probe_axes[1]["sweep β (EP / AEP)"]
    r_top, _ = probe_axes[1]["sweep r (holomorphic)"]
    assert "holomorphic" not in _legend(beta_top)
    assert r_top.get_xlabel().startswith("radius r")


@pytest.mark.parametrize("title", list(COLUMNS))
def test_every_error_panel_has_a_legend_of_its_methods(probe_axes, title):
    assert _legend(probe_axes[1][title][0]) == COLUMNS[title][1]


@pytest.mark.parametrize("title", list(COLUMNS))
def test_every_residual_panel_has_a_legend_of_the_methods_with_an_adjoint(probe_axes, title):
    expected = [m for m in COLUMNS[title][1] if m != "bptt"]  # bptt has no adjoint residual
    assert _legend(probe_axes[1][title][1]) == expected


@pytest.mark.parametrize(
    ("title", "ticks", "scale"),
    [
        ("sweep T1", ["2", "4", "8"], "linear"),  # spans < 8x: linear
        ("sweep T2", ["2", "8", "32", "128"], "log"),
        ("sweep N (holomorphic)", ["2", "3", "4", "6"], "linear"),
    ],
)
def test_integer_sweeps_have_integer_ticks(probe_axes, title, ticks, scale):
    for ax in probe_axes[1][title]:
        assert _texts(ax.xaxis) == ticks
        assert ax.get_xscale() == scale
        assert _texts(ax.xaxis, minor=True) == []


@pytest.mark.parametrize(
    ("title", "ticks"),
    [("sweep β (EP / AEP)", ["0.0125", "0.025", "0.05", "0.1"]),
     ("sweep r (holomorphic)", ["0.0125", "0.025", "0.05", "0.1"])],
)  # fmt: skip
def test_real_sweeps_are_labelled_at_their_values(probe_axes, title, ticks):
    for ax in probe_axes[1][title]:
        assert _texts(ax.xaxis) == ticks
        assert _texts(ax.xaxis, minor=True) == []


def test_log_y_axes_are_labelled_at_decades_only(probe_axes):
    for top, bottom in probe_axes[1].values():
        for ax in (top, bottom):
            assert ax.get_yscale() == "log"
            assert _texts(ax.yaxis, minor=True) == []
            assert len(_texts(ax.yaxis)) >= 2  # at least one whole decade shown


def test_probe_tick_labels_do_not_overlap(probe_axes):
    assert _overlaps(probe_axes[0]) == []


def test_crowded_sweeps_are_thinned_until_nothing_overlaps():
    values = [0.05 + 0.002 * i for i in range(30)]
    rows = [_row("aep", "beta", v, rel_err=1e-3 * (1 + i)) for i, v in enumerate(values)]
    rows += [_row("aep", "T2", float(t), rel_err=10.0**-t) for t in range(1, 41)]
    fig = _report(rows).figure()
    fig.canvas.draw()
    try:
        assert _overlaps(fig) == []
        t2 = next(ax for ax in fig.axes if ax.get_title() == "sweep T2")
        assert all(re.fullmatch(r"\d+", t) for t in _texts(t2.xaxis))
    finally:
        pyplot().close(fig)


def test_probe_without_sweeps_labels_both_rows():
    rows = [_row(m) for m in ("aep", "holomorphic")]
    rows += [_row(m, group=g) for m in ("aep", "holomorphic") for g in ("embed", "ffn", "readout")]
    fig = _report(rows).figure()
    fig.canvas.draw()
    try:
        top, bottom = fig.axes
        assert top.get_xlabel() == "method / parameter group"
        assert _texts(top.xaxis)[0] == "aep/embed"
        assert bottom.get_xlabel() == "method"
        assert _texts(bottom.xaxis) == ["aep", "holomorphic"]
        assert _overlaps(fig) == []
    finally:
        pyplot().close(fig)


def test_a_residual_panel_without_adjoint_says_so():
    rows = [_row("bptt", "T1", float(t)) for t in (2, 4, 8)]
    fig = _report(rows).figure()
    try:
        _, bottom = fig.axes
        assert "no adjoint residual" in " ".join(t.get_text() for t in bottom.texts)
        assert bottom.get_xlabel() == "T1 (free-phase steps)"
    finally:
        pyplot().close(fig)


# ---------------------------------------------------------------- curves.png
def _records(steps, cos_every=None):
    out = []
    for s in range(1, steps + 1):
        record = {"step": s, "train_ce": 3.0 - 0.01 * s, "skipped": False, "lr": 1e-3,
                  "res_free": 1e-6 / s, "res_adjoint": 1e-5 / s}  # fmt: skip
        if s % 5 == 0:
            record["val_ce"] = 3.1 - 0.01 * s
        if cos_every and s % cos_every == 0:
            record["cos_implicit_min"] = 1 - 1e-4 / s
        out.append(record)
    return out


def _curves(runs, **kw):
    fig = curves_figure(runs, "aep", **kw)
    fig.canvas.draw()
    return fig


@pytest.mark.parametrize(
    ("every", "note"),
    [(7, "no probe yet: the cosine vs the implicit\ngradient is measured every 7 steps"),
     (None, "measured every spot_check_every steps"),
     (0, "spot checks are off")],
)  # fmt: skip
def test_cosine_panel_without_points_carries_a_note(every, note):
    fig = _curves({"aep": _records(6)}, spot_check_every=every)
    try:
        cosine = fig.axes[2]
        assert note in " ".join(t.get_text() for t in cosine.texts)
        assert cosine.get_lines() == []
        assert cosine.get_xlabel() == "step"
    finally:
        pyplot().close(fig)


def test_curves_with_points_have_legends_labels_and_integer_step_ticks():
    fig = _curves({"aep": _records(40, cos_every=10), "bptt": _records(40, cos_every=10)})
    try:
        loss, residual, cosine = fig.axes
        assert _legend(loss) == ["aep train", "aep val", "bptt train", "bptt val"]
        assert _legend(residual) == ["aep res_free", "aep res_adjoint", "bptt res_free",
                                     "bptt res_adjoint"]  # fmt: skip
        assert _legend(cosine) == ["aep", "bptt"]
        assert len(cosine.texts) == 0
        for ax in fig.axes:
            assert ax.get_xlabel() == "step"
            assert all(re.fullmatch(r"\d+", t) for t in _texts(ax.xaxis))
        assert residual.get_yscale() == cosine.get_yscale() == "log"
        assert _texts(residual.yaxis, minor=True) == []
        assert _overlaps(fig) == []
    finally:
        pyplot().close(fig)


def test_a_two_step_run_has_ticks_1_and_2_only():
    fig = _curves({"aep": _records(2)})
    try:
        assert _texts(fig.axes[0].xaxis) == ["1", "2"]
    finally:
        pyplot().close(fig)


@pytest.mark.parametrize(("method", "every"), [("aep", 3), ("backprop", 0)])
def test_the_trainer_tells_the_plot_its_spot_check_interval(tmp_path, monkeypatch, method, every):
    seen = {}
    monkeypatch.setattr(loop, "plot_curves", lambda runs, path, **kw: seen.update(kw))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    loop._plot(tmp_path, TrainConfig(method=method, spot_check_every=3))
    assert seen["spot_check_every"] == every


def test_the_table_calls_an_undefined_cosine_so():
    """A group whose estimate is exactly zero (plain EP's attention on a layered block) has no
    direction: the table says "undefined" instead of printing nan."""
    zero = dataclasses.replace(_row("ep", group="attn"), cos=float("nan"), rel_err=1.0)
    table = _report([_row("aep"), zero]).table(group=None)
    assert "undefined" in table
    assert "nan" not in table
    assert "0.990000" in table
