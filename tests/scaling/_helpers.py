"""Drive a scaler with chosen gradients (assigned to .grad, as a backward pass would leave them)."""

import torch

from gradstats import VarianceGradientScaler


def params_like(*shapes, dtype=torch.float64):
    return [
        (f"p{i}", torch.nn.Parameter(torch.zeros(s, dtype=dtype))) for i, s in enumerate(shapes)
    ]


def feed(vgs: VarianceGradientScaler, named, steps, **step_kwargs):
    """``steps``: list of lists of gradients (None = no gradient on that step)."""
    for grads in steps:
        for (_, p), g in zip(named, grads, strict=True):
            p.grad = (
                None if g is None else torch.as_tensor(g, dtype=p.dtype).reshape(p.shape).clone()
            )
        vgs.step(**step_kwargs)
    return vgs


def make(named, **kwargs):
    kwargs.setdefault("confidence", None)
    return VarianceGradientScaler(named, **kwargs)


def assert_same(a, b, where="state"):
    """Deep equality of nested dicts/lists/tensors (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def snapshot(vgs: VarianceGradientScaler):
    """Everything a failing call must leave as it was: the full checkpoint, every per-tensor
    count, the update and skip counters and the configuration."""
    counts = {name: row.count for name, row in vgs.statistics().items()}
    return vgs.state_dict(), counts, vgs.updates, int(vgs.skipped), vgs.config
