"""The optax-shaped internals: ScalerState with init/observe/update, the Statistic registry, the
AMP loss scale through public API only, checkpoints and reports as functions of the state."""

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.errors import ConfigurationError, ConfigurationTypeError
from gradstats.scaling import (
    STATISTICS,
    ScalerConfig,
    ScalerState,
    StatisticSpec,
    _statistic,
    get_statistic,
    init,
    observe,
    register_statistic,
    registered_statistics,
    update,
)
from gradstats.scaling._checkpoint import load, save
from gradstats.scaling._report import build_statistics, log_metrics
from gradstats.scaling._temporal import TemporalState

from ._helpers import assert_same

SCALING = Path(__file__).resolve().parents[2] / "src" / "gradstats" / "scaling"


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    ).double()


def _backward(model, k):
    g = torch.Generator().manual_seed(k)
    model.zero_grad()
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    (model(x) - 1.0).pow(2).mean().backward()


def _same_row(a, b):
    """Two TensorStatistics rows are equal field by field (NaN equals NaN)."""
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float), field.name
            assert math.isnan(y), field.name
        else:
            assert x == y, field.name


# --------------------------------------------------------------------- purity, equality
@pytest.mark.parametrize(
    "options",
    [{}, {"foreach": False}, {"statistic": "mixed"}, {"aggregate": "param_group"}],
    ids=["temporal", "temporal-reference", "mixed", "param-group"],
)
def test_update_leaves_its_input_state_unchanged(options):
    model = _model()
    config = ScalerConfig(
        beta=0.8, confidence=None, **{"statistic": "temporal", "rule": "shrink", **options}
    )
    state = init(config, model.named_parameters())
    for k in range(3):
        _backward(model, k)
        state = update(state, observe(state), config)
    before = save(state, config)
    _backward(model, 3)
    new = update(state, observe(state), config)
    assert_same(save(state, config), before)  # the input: bitwise as it was
    assert state.updates == 3
    assert new.updates == 4
    moved, kept = save(new, config)["tensors"]["0.weight"], before["tensors"]["0.weight"]
    assert int(moved["count"]) == int(kept["count"]) + 1  # while the new state moved on
    stats = [k for k, v in kept.items() if isinstance(v, torch.Tensor) and k != "count"]
    assert any(not torch.equal(moved[k], kept[k]) for k in stats)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("aggregate", ["global", "param_group", "tensor"])
def test_update_sequence_equals_the_scaler_in_float64(foreach, aggregate):
    model = _model()
    config = ScalerConfig(
        beta=0.8,
        confidence=None,
        foreach=foreach,
        aggregate=aggregate,
        statistic="temporal",
        rule="shrink",
    )
    vgs = VarianceGradientScaler(model.named_parameters(), config=config)
    state = init(config, model.named_parameters())
    for k in range(6):
        _backward(model, k)
        state = update(state, observe(state), config)
        vgs.update_statistics()
    ours, theirs = build_statistics(state, config), vgs.statistics()
    assert set(ours) == set(theirs)
    for name in ours:
        _same_row(ours[name], theirs[name])
    assert_same(save(state, config), vgs.state_dict())
    assert torch.equal(state.factor, vgs.scaling_factors())
    assert isinstance(vgs.state, ScalerState)


def test_skip_in_the_observation_counts_the_step_and_changes_no_statistic():
    model = _model()
    config = ScalerConfig(beta=0.8, confidence=None, statistic="temporal", rule="shrink")
    state = init(config, model.named_parameters())
    _backward(model, 0)
    state = update(state, observe(state), config)
    _backward(model, 1)
    skipped = update(state, observe(state, skip=torch.tensor(True)), config)
    assert int(skipped.skipped) == 1
    assert skipped.updates == 2
    assert_same(save(skipped, config)["tensors"], save(state, config)["tensors"])
    assert torch.equal(skipped.progress, state.progress)  # a skipped step adds nothing to τ


def test_the_copying_update_refuses_hook_fed_statistics():
    model = _model()
    config = ScalerConfig(statistic="same_point", rule="shrink")
    state = init(config, model.named_parameters())
    _backward(model, 0)
    with pytest.raises(ConfigurationError, match="fed by backward hooks"):
        update(state, observe(state), config)


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "build",
    [
        lambda: ScalerConfig(statistic="variance", rule="shrink"),
        lambda: get_statistic("variance"),
        lambda: VarianceGradientScaler(
            torch.nn.Linear(2, 1).parameters(), statistic="variance", rule="shrink"
        ),
    ],
    ids=["config", "registry", "scaler"],
)
def test_an_unknown_statistic_is_a_clear_error_naming_the_valid_ones(build):
    valid = ", ".join(repr(s) for s in ("auto", *STATISTICS))  # "auto": the default choice
    with pytest.raises(ConfigurationError, match=f"statistic must be one of {valid}; got"):
        build()


def test_builtin_statistics_declare_what_the_scaler_needs():
    assert registered_statistics()[: len(STATISTICS)] == STATISTICS
    assert get_statistic("temporal").min_count == TemporalState.min_count == 2
    assert get_statistic("same_point").micro_batches
    assert get_statistic("same_point").hooks
    assert get_statistic("per_sample").needs_model
    assert get_statistic("per_sample").units == ("sample", "token")
    assert [s for s in STATISTICS if get_statistic(s).diagnostic] == [
        "tensor_mean", "mixed", "spatial",
    ]  # fmt: skip
    assert not get_statistic("mixed").per_coordinate


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(_statistic, "_STATISTICS", dict(_statistic._STATISTICS))


def _temporal_copy(tensors, config, distributed, group):
    return TemporalState(tensors, config.beta, config.foreach)


def test_a_registered_statistic_drives_the_scaler(registry):
    spec = StatisticSpec("temporal_copy", _temporal_copy, TemporalState.state_keys, 2)
    register_statistic(spec)
    assert get_statistic("temporal_copy") is spec
    runs = {}
    for name in ("temporal", "temporal_copy"):
        model = _model()
        vgs = VarianceGradientScaler(
            model.named_parameters(), statistic=name, beta=0.8, rule="shrink"
        )
        for k in range(12):
            _backward(model, k)
            vgs.step()
        runs[name] = vgs.statistics()["global"]
    _same_row(runs["temporal"], runs["temporal_copy"])


def test_registering_a_taken_name_or_an_incomplete_statistic_is_refused(registry):
    with pytest.raises(ConfigurationError, match="already registered"):
        register_statistic(StatisticSpec("temporal", _temporal_copy, TemporalState.state_keys, 2))
    incomplete = dataclasses.replace(
        StatisticSpec("broken", _temporal_copy, TemporalState.state_keys, 2), units=["sample"]
    )
    with pytest.raises(ConfigurationTypeError, match="needs units of type tuple"):
        register_statistic(incomplete)
    assert "broken" not in registered_statistics()


def test_no_statistic_name_is_tested_by_an_if_chain():
    """The scaler's modules ask the registry, never compare ``statistic`` with a name (the
    checkpoint header's comparison of two configurations is the one exception)."""
    for path in sorted(SCALING.glob("_*.py")):
        if path.name in ("_statistic.py", "_checkpoint.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
                names += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
                texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]
                assert not ("statistic" in names and set(texts) & set(STATISTICS)), (
                    f"{path.name}:{node.lineno}"
                )


# ------------------------------------------------------------------------------- AMP
def _amp_run(step):
    model = _model()
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", beta=0.8, confidence=None, rule="shrink"
    )
    for k in range(6):
        model.zero_grad()
        for part in range(2):
            g = torch.Generator().manual_seed(10 * k + part)
            x = torch.randn(6, 4, generator=g, dtype=torch.float64)
            (2.0**10 * (model(x) - 1.0).pow(2).mean()).backward()  # loss scale S = 2^10
        step(vgs)
    return vgs.statistics()["global"]


class _PublicOnlyScaler:
    """A loss scaler with only GradScaler's public methods the scaler may use."""

    def is_enabled(self):
        return True

    def scale(self, outputs):
        return outputs * 2.0**10


@pytest.mark.parametrize(
    "step",
    [
        lambda vgs: vgs.step(grad_scaler=_PublicOnlyScaler(), scaled=True),
        lambda vgs: vgs.step(loss_scale=torch.tensor(2.0**10, dtype=torch.float64), scaled=True),
        lambda vgs: vgs.step(loss_scale=2.0**10, scaled=True),
    ],
    ids=["public-api-scaler", "tensor", "float"],
)
def test_the_loss_scale_comes_from_public_api_or_loss_scale(step):
    reference = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = _amp_run(lambda vgs: vgs.step(grad_scaler=reference, scaled=True))
    _same_row(_amp_run(step), expected)
    assert expected.count == 6
    assert math.isfinite(expected.normalized_variance)


def test_grad_scaler_and_loss_scale_together_or_a_bad_loss_scale_are_refused():
    model = _model()
    vgs = VarianceGradientScaler(model.named_parameters(), statistic="temporal", rule="shrink")
    _backward(model, 0)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ConfigurationError, match="not both"):
        vgs.step(grad_scaler=scaler, loss_scale=2.0)
    with pytest.raises(ConfigurationError, match="loss_scale must be finite and > 0"):
        vgs.step(loss_scale=0.0)
    assert vgs.updates == 0


def test_no_private_grad_scaler_attribute_is_read():
    for path in sorted(SCALING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("_scale", "_get_scale_async"), f"{path.name}:{node.lineno}"


# ------------------------------------------------------- checkpoint and report: the state
def test_checkpoint_and_report_are_functions_of_the_public_state():
    model = _model()
    config = ScalerConfig(
        beta=0.8, confidence=None, batch_size=6, log_every=5, statistic="temporal", rule="shrink"
    )
    logged = []
    vgs = VarianceGradientScaler(
        model.named_parameters(), config=config, logger=lambda m, step: logged.append(m)
    )
    for k in range(5):
        _backward(model, k)
        vgs.step()
    assert_same(save(vgs.state, config), vgs.state_dict())
    assert dict(log_metrics(vgs.state, config)) == dict(logged[-1])
    fresh, plan = load(
        init(config, model.named_parameters()), config, vgs.state_dict(), True, False, True
    )
    assert plan.report.loaded == vgs.layout.names
    assert_same(save(fresh, config), vgs.state_dict())
    _backward(model, 5)
    continued = update(fresh, observe(fresh), config)
    vgs.step()
    for name, row in build_statistics(continued, config).items():
        _same_row(row, vgs.statistics()[name])


@pytest.mark.parametrize("module", ["_checkpoint.py", "_report.py"])
def test_checkpoint_and_report_import_no_scaler_and_read_no_private_field(module):
    tree = ast.parse((SCALING / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"gradstats.scaling._scaler", "gradstats.scaling._readout"}
    private = [
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
    ]
    assert private == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scaled", [False, True])
def test_the_amp_path_never_syncs(scaled):
    """Reading S through grad_scaler.scale(1) keeps step() free of host syncs on CUDA."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    vgs = VarianceGradientScaler(
        model.named_parameters(), statistic="same_point", log_every=10**6,
        max_nonfinite_steps=None, rule="shrink",
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 16, device="cuda")

    def one_step(check):
        opt.zero_grad()
        for _ in range(2):
            scaler.scale(model(x).square().mean()).backward()
        if not scaled:
            scaler.unscale_(opt)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            vgs.step(grad_scaler=scaler, scaled=scaled)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        scaler.step(opt)
        scaler.update()

    one_step(check=False)  # first step builds cached index masks
    for _ in range(3):
        one_step(check=True)
    assert vgs.updates == 4


def test_evolve_is_dataclasses_replace():
    """The per-step ``evolve`` gives the state ``dataclasses.replace`` gives, field by field."""
    from gradstats.scaling._scaler_state import evolve

    model = _model()
    config = ScalerConfig(statistic="temporal")
    state = init(config, model.named_parameters())
    changes = {"updates": 7, "applied": torch.tensor(False), "progress": torch.tensor(2.5)}
    fast, slow = evolve(state, **changes), dataclasses.replace(state, **changes)
    for field in dataclasses.fields(ScalerState):
        assert getattr(fast, field.name) is getattr(slow, field.name), field.name
    assert state.updates != 7  # the old state is unchanged
    with pytest.raises(TypeError, match="no field"):
        evolve(state, updatez=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.updates = 1  # type: ignore[misc]
