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
