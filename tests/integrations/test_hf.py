"""The scaler inside the Hugging Face Trainer (gradient accumulation, clipping, logs)."""

import pytest
import torch

from gradstats.errors import ConfigurationError, ConfigurationTypeError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradstats.integrations.hf import VarianceScalingTrainerCallback, add_callback_first  # noqa: E402


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, vocab=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_callback(tmp_path):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=2, max_grad_norm=1e-3, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    callback = add_callback_first(
        trainer,
        VarianceScalingTrainerCallback(beta=0.8, log_every=2, statistic="temporal", rule="shrink"),
    )
    trainer.train()
    vgs = callback.scaler
    assert vgs.updates == 8  # the last backward of each optimizer step
    raw = sum(vgs.state_dict()["tensors"][n]["sq_ema"].item() for n in vgs.layout.names)
    assert raw > (1e-3) ** 2 * 10  # read before the Trainer clipped to norm 1e-3
    assert vgs.statistics()["global"].count == 8
    logged = [entry for entry in trainer.state.log_history if "vgs/factor" in entry]
    assert logged


def test_trainer_callback_defaults_use_the_model_and_keep_the_step(tmp_path):
    """The defaults: ``model`` is the Trainer's, so "auto" is per_sample; adascale at S = 1
    leaves the learning rate the Trainer's, while B_noise is measured and logged."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
    callback = add_callback_first(
        trainer, VarianceScalingTrainerCallback(log_every=2, confidence=None)
    )
    trainer.train()
    vgs = callback.scaler
    assert (vgs.config.statistic, vgs.config.rule) == ("per_sample", "adascale")
    assert vgs.config.batch_size == 8
    assert vgs.updates == 4
    row = vgs.statistics()["global"]
    assert row.factor == 1.0
    assert float(vgs.progress) == 4.0
    assert row.B_noise is not None
    logged = [entry for entry in trainer.state.log_history if "vgs/B_noise" in entry]
    assert logged


# ------------------------------------------------------------------------- Fisher callback
def _trainer(tmp_path, callback, max_steps=2):
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]
    )
    return trainer, model


def test_fisher_trainer_callback_on_a_given_loader(tmp_path):
    from gradstats.fisher import FisherCollector
    from gradstats.integrations.hf import FisherTrainerCallback

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    data = _Tokens(n=12)
    batches = [{k: torch.stack([data[i][k] for i in range(j, j + 4)]) for k in data[0]}
               for j in range(0, 12, 4)]  # fmt: skip
    callback = FisherTrainerCallback(batches, max_batches=2)
    trainer, model = _trainer(tmp_path, callback)
    trainer.train()
    assert model.training  # restored after collecting in eval mode (no dropout)
    expected = FisherCollector(model.eval(), "empirical", "causal_lm").collect_loader(
        batches[:2], progress=False
    )
    saved = FisherCollector.load(tmp_path / "fisher.safetensors")
    assert saved.counts == expected.counts
    assert saved.counts["tokens"] == 8 * 11
    for name, value in expected.fisher().items():
        torch.testing.assert_close(saved.fisher()[name], value)
    logged = [entry for entry in trainer.state.log_history if "fisher/trace" in entry]
    assert len(logged) == 1
    assert logged[0]["fisher/samples"] == 8
    assert logged[0]["step"] == 2


def test_fisher_trainer_callback_on_the_trainers_train_loader(tmp_path):
    from gradstats.integrations.hf import FisherTrainerCallback

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    callback = FisherTrainerCallback("train", max_batches=3, kind="mc", mc_samples=2)
    trainer, _ = _trainer(tmp_path, callback)
    trainer.train()
    assert callback.collector.counts["samples"] == 12  # 3 batches of 4
    assert callback.collector.kind == "mc"
    assert (tmp_path / "fisher.safetensors").is_file()
    assert callback.summary["fisher/trace"] > 0


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("validation",), {}, "dataloader must be an iterable of batches, 'train'"),
        ((), {"unit": "sequence"}, "unit must be one of 'sample', 'token'"),
        ((), {"max_batches": 0}, "max_batches must be an int >= 1 or None"),
    ],
    ids=["dataloader", "unit", "max_batches"],
)
def test_fisher_trainer_callback_rejects_bad_options(args, kwargs, match):
    from gradstats.integrations.hf import FisherTrainerCallback

    with pytest.raises(ConfigurationError, match=match):
        FisherTrainerCallback(*args, **kwargs)


def test_scaler_trainer_callback_rejects_a_misspelt_scaler_argument():
    from gradstats.integrations.hf import VarianceScalingTrainerCallback

    with pytest.raises(ConfigurationTypeError, match=r"argument\(s\) \['statistics'\]"):
        VarianceScalingTrainerCallback(statistics="temporal")
