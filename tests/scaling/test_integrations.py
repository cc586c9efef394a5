"""The scaler inside loops: a plain loop helper, attach() for foreign loops, SB3 PPO on CartPole."""

import pytest
import torch

from gradstats import VarianceGradientScaler
from gradstats.scaling import attach, optimizer_step


def _problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 4, generator=g)
    return model, x, torch.sin(x.sum(1, keepdim=True))


def test_attach_reads_raw_gradients_before_the_loop_clips_them():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        apply_to="lr",
        optimizer=opt,
        confidence=None,
        statistic="temporal",
        rule="shrink",
    )
    attach(vgs, opt)  # no handle kept: the attachment lives with the hooks
    reference = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        rows = torch.randint(0, 512, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        reference.step()  # raw gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # the loop clips hard
        opt.step()
    assert vgs.updates == reference.updates == 20
    assert vgs.get_normalized_variance() == pytest.approx(
        reference.get_normalized_variance(), rel=1e-12
    )


def test_attached_lr_factor_is_applied_and_restored():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        apply_to="lr",
        optimizer=opt,
        confidence=None,
        statistic="temporal",
        rule="shrink",
    )
    handle = attach(vgs, opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[:32]), y[:32]).backward()
        opt.step()
    assert seen[-1] == pytest.approx(0.05 * vgs.get_scaling_factor())
    assert opt.param_groups[0]["lr"] == 0.05
    handle.remove()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x[:32]), y[:32]).backward()
    assert vgs.updates == 5  # detached


def test_optimizer_step_helper_clips_raw_gradients_and_returns_the_norm():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        optimizer=opt,
        confidence=None,
        statistic="temporal",
        rule="shrink",
    )
    torch.nn.functional.mse_loss(model(x[:32]), y[:32]).backward()
    raw = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    norm = optimizer_step(opt, vgs, max_grad_norm=0.01)
    assert norm.item() == pytest.approx(raw.item())
    assert vgs.updates == 1


def test_stable_baselines3_ppo_on_cartpole(tmp_path):
    pytest.importorskip("gymnasium")
    sb3 = pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.logger import configure

    from gradstats.integrations.sb3 import VarianceScalingCallback

    torch.set_default_dtype(torch.float32)  # SB3 policies meet float32 observations
    model = sb3.PPO(
        "MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, n_epochs=4, max_grad_norm=0.05,
        seed=0, device="cpu", policy_kwargs={"net_arch": [32]},
    )  # fmt: skip
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = VarianceScalingCallback(beta=0.9, log_every=8, statistic="temporal", rule="shrink")
    model.learn(total_timesteps=3072, callback=callback)
    vgs = callback.scaler
    updates_per_rollout = 4 * (256 // 64)
    assert vgs.updates == updates_per_rollout * (3072 // 256)
    stats = vgs.statistics()["global"]
    assert 0.0 < stats.factor <= 1.0
    assert stats.gate_open
    assert stats.B_noise is not None
    assert stats.B_noise > 0
    # statistics came from raw gradients: their norms exceed PPO's clip threshold of 0.05
    raw_sq = sum(vgs.state_dict()["tensors"][n]["sq_ema"].item() for n in vgs.layout.names)
    assert raw_sq > 0.05**2
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(model.learning_rate)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"vgs/factor", "vgs/rho", "vgs/B_noise", "train/loss"} <= set(header)


def test_stable_baselines3_ppo_defaults_use_the_policy_and_keep_ppo_s_step(tmp_path):
    """The defaults: ``model`` is the policy, so "auto" is per_sample; adascale at S = 1 keeps
    PPO's own updates (the lr is untouched) while the noise and B_noise are logged."""
    pytest.importorskip("gymnasium")
    sb3 = pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.logger import configure

    from gradstats.integrations.sb3 import VarianceScalingCallback

    torch.set_default_dtype(torch.float32)
    model = sb3.PPO(
        "MlpPolicy", "CartPole-v1", n_steps=128, batch_size=64, n_epochs=2, seed=0,
        device="cpu", policy_kwargs={"net_arch": [16]},
    )  # fmt: skip
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = VarianceScalingCallback(log_every=2)
    model.learn(total_timesteps=256, callback=callback)
    vgs = callback.scaler
    assert (vgs.config.statistic, vgs.config.rule) == ("per_sample", "adascale")
    assert vgs.config.batch_size == 64
    updates = 2 * (128 // 64) * 2
    assert vgs.updates == updates
    stats = vgs.statistics()["global"]
    assert stats.factor == 1.0
    assert float(vgs.progress) == updates
    assert stats.B_noise is not None
    assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(model.learning_rate)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"vgs/factor", "vgs/B_noise"} <= set(header)


def test_attach_with_accumulation_reads_only_when_the_predicate_says_the_step_ends():
    model, x, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    vgs = VarianceGradientScaler(
        model.named_parameters(),
        optimizer=opt,
        confidence=None,
        statistic="temporal",
        rule="shrink",
    )
    reference = VarianceGradientScaler(
        model.named_parameters(), confidence=None, statistic="temporal", rule="shrink"
    )
    passes = {"n": 0}

    def last_of_three():
        passes["n"] += 1
        return passes["n"] % 3 == 0

    attach(vgs, opt, update_on_backward=last_of_three)
    for step in range(4):
        opt.zero_grad()
        for part in range(3):
            rows = slice(96 * step + 32 * part, 96 * step + 32 * (part + 1))
            (torch.nn.functional.mse_loss(model(x[rows]), y[rows]) / 3).backward()
        reference.step()
        opt.step()
    assert vgs.updates == reference.updates == 4
    assert vgs.get_normalized_variance() == pytest.approx(
        reference.get_normalized_variance(), rel=1e-12
    )


def test_the_old_sb3_path_still_imports_with_a_future_warning():
    pytest.importorskip("stable_baselines3")
    import importlib
    import sys

    from gradstats.integrations.sb3 import VarianceScalingCallback

    sys.modules.pop("gradstats.scaling.sb3", None)
    with pytest.warns(FutureWarning, match="moved to gradstats.integrations.sb3"):
        old = importlib.import_module("gradstats.scaling.sb3")
    assert old.VarianceScalingCallback is VarianceScalingCallback
