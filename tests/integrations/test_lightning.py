"""The scaler inside PyTorch Lightning: raw statistics before Lightning clips, lr factor, logs."""

import csv

import pytest
import torch

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
    callback = VarianceScalingCallback(beta=0.8, confidence=None, log_every=2)
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


def test_lightning_callback_rejects_a_missing_optimizer():
    callback = VarianceScalingCallback(optimizer_index=3)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    torch.set_default_dtype(torch.float32)
    with pytest.raises(ValueError, match="optimizer_index=3"):
        trainer.fit(Regression(), _loader())
