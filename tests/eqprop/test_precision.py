"""``--precision``: TF32 matmuls on CUDA for a run (issue 11 item 3), refused elsewhere."""

from __future__ import annotations

import pytest
import torch

from gradstats.eqprop.train import TrainConfig
from gradstats.eqprop.train._resume import RESUMABLE
from gradstats.eqprop.train._runtime import matmul_precision, run_environment
from gradstats.errors import ConfigurationError


def test_tf32_needs_a_cuda_device_and_float32():
    with pytest.raises(ConfigurationError, match=r"precision='tf32' needs --device cuda"):
        TrainConfig(precision="tf32")
    with pytest.raises(ConfigurationError, match=r"dtype='float64'"):
        TrainConfig(precision="tf32", device="cuda", dtype="float64")
    with pytest.raises(ConfigurationError, match=r"precision must be one of 'float32', 'tf32'"):
        TrainConfig(precision="bf16")
    assert TrainConfig(precision="tf32", device="cuda").precision == "tf32"  # no CUDA needed


@pytest.mark.parametrize("before", [False, True])
def test_the_tf32_switch_is_set_for_the_run_and_restored(before):
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = before
        with matmul_precision("tf32"):
            assert all(f.allow_tf32 for f in flags)
        assert [f.allow_tf32 for f in flags] == [before, before]
        with run_environment(1, single_process=True, precision="float32"):
            assert [f.allow_tf32 for f in flags] == [before, before]
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def test_precision_is_a_hardware_setting_a_resume_may_change():
    assert "precision" in RESUMABLE
    assert TrainConfig.from_dict(TrainConfig().to_dict()).precision == "float32"
    old = TrainConfig().to_dict()
    del old["precision"]  # checkpoints written before the option existed
    assert TrainConfig.from_dict(old).precision == "float32"
