"""The scaler inside PyTorch Lightning: raw statistics before Lightning clips, lr factor, logs."""

import csv

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

L = pytest.importorskip("lightning")
from gradstats.integrations.lightning import VarianceScalingCallback  # noqa: E402


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 5, generator=g)
    data = torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)


def test_lightning_callback(tmp_path):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    module = Regression()
    callback = VarianceScalingCallback(
        beta=0.8, confidence=None, log_every=2, statistic="temporal", rule="shrink"
    )
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", accumulate_grad_batches=2, gradient_clip_val=1e-3,
        callbacks=[callback],
        logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, _loader())
    vgs = callback.scaler
    assert vgs.updates == 12  # once per optimizer step, after accumulation
    raw = sum(vgs.state_dict()["tensors"][n]["sq_ema"].item() for n in vgs.layout.names)
    assert raw > (1e-3) ** 2 * 10  # read before Lightning clipped to norm 1e-3
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1  # restored after each step
    assert 0 < vgs.get_scaling_factor() < 1
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("vgs/factor") for row in rows)


def test_lightning_callback_defaults_measure_per_sample_noise_and_keep_the_step(tmp_path):
    """The defaults: ``model`` is the LightningModule, so "auto" is per_sample; adascale at
    S = 1 leaves every update the plain run's, while B_noise is measured and logged."""
    runs = {}
    for scaled in (False, True):
        torch.set_default_dtype(torch.float32)
        torch.manual_seed(0)
        module = Regression()
        callback = VarianceScalingCallback(confidence=None, log_every=2, batch_size=32)
        trainer = L.Trainer(
            max_steps=6, accelerator="cpu", accumulate_grad_batches=2,
            callbacks=[callback] if scaled else [],
            logger=L.pytorch.loggers.CSVLogger(tmp_path / str(scaled)), log_every_n_steps=1,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, _loader())
        runs[scaled] = (module, callback)
    vgs = runs[True][1].scaler
    assert (vgs.config.statistic, vgs.config.rule) == ("per_sample", "adascale")
    assert vgs.updates == 6
    row = vgs.statistics()["global"]
    assert row.factor == 1.0
    assert row.B_noise is not None
    assert row.B_noise > 0
    assert float(vgs.progress) == 6.0
    for a, b in zip(runs[True][0].parameters(), runs[False][0].parameters(), strict=True):
        assert torch.equal(a, b)  # the plain run's updates, bitwise
    with open(next((tmp_path / "True").rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("vgs/B_noise") for row in rows)


def test_lightning_callback_rejects_a_missing_optimizer():
    callback = VarianceScalingCallback(optimizer_index=3)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    torch.set_default_dtype(torch.float32)
    with pytest.raises(ConfigurationError, match="optimizer_index=3"):
        trainer.fit(Regression(), _loader())


# ------------------------------------------------------------------------- Fisher callback
def test_fisher_callback_collects_saves_and_logs_at_the_end_of_training(tmp_path):
    from gradstats.fisher import FisherCollector
    from gradstats.integrations.lightning import FisherCallback

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    module = Regression()
    batches = list(_loader())[:6]
    callback = FisherCallback(batches, model="net", likelihood="regression", max_batches=4)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", callbacks=[callback], default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, _loader())
    assert module.training  # the training flag is restored after collecting in eval mode
    assert all(not m._forward_hooks for m in module.modules())  # the collector's hooks are gone
    # the trained network's Fisher on the first 4 batches, from a collector of our own
    expected = FisherCollector(module.net, "empirical", "regression")
    expected.collect_loader(batches[:4], progress=False)
    saved = FisherCollector.load(tmp_path / "fisher.safetensors")
    assert saved.counts["samples"] == 64
    for name, value in expected.fisher().items():
        torch.testing.assert_close(saved.fisher()[name], value)
        torch.testing.assert_close(callback.collector.fisher()[name], value)
    trace = sum(float(v.double().sum()) for v in expected.fisher().values())
    assert callback.summary["fisher/trace"] == pytest.approx(trace, rel=1e-6)
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("fisher/trace")]
    assert len(logged) == 1
    assert float(logged[0]["fisher/samples"]) == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "true"}, "kind must be one of 'empirical'"),
        ({"max_batches": 0}, "max_batches must be an int >= 1 or None"),
        ({"max_batches": True}, "max_batches must be an int >= 1 or None"),
        ({"likelihood": "poisson"}, "likelihood must be one of"),
        ({"unit": "batch"}, "unit must be one of"),
    ],
    ids=["kind", "max_batches-0", "max_batches-bool", "likelihood", "unit"],
)
def test_fisher_callback_rejects_bad_options_before_training(kwargs, match):
    from gradstats.integrations.lightning import FisherCallback

    with pytest.raises(ConfigurationError, match=match):
        FisherCallback([], **kwargs)


def test_fisher_callback_rejects_a_misspelt_collector_argument():
    from gradstats.integrations.lightning import FisherCallback

    with pytest.raises(
        ConfigurationTypeError, match=r"unknown FisherCollector argument\(s\) \['mc_sample'\]"
    ):
        FisherCallback([], mc_sample=4)


def test_scaler_callback_rejects_a_misspelt_scaler_argument():
    with pytest.raises(
        ConfigurationTypeError, match=r"VarianceGradientScaler argument\(s\) \[.betta.\]"
    ):
        VarianceScalingCallback(betta=0.9)


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        ("missing", ConfigurationError, "model='missing': Regression has no such submodule"),
        (3, ConfigurationTypeError, "model must be None, an attribute name or a callable"),
    ],
    ids=["no-such-attribute", "wrong-type"],
)
def test_fisher_callback_rejects_a_bad_model_choice(model, error, match):
    from gradstats.integrations._fisher import resolve_module

    with pytest.raises(error, match=match):
        resolve_module(Regression(), model)
