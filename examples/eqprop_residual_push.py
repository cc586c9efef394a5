"""What the former residual penalty did at a converged state: a push that is not rounding.

For a trained ``gradstats eqprop train`` run (its raw weights), on one batch of its corpus, it
relaxes the free phase to a float32 tolerance of 1e-6 and 1e-5 and, with the weights cast to
float64, to 1e-13; at each fixed point it takes the gradient of the plain residual penalty
½ mean_b ‖F(z_b)‖² (``penalty_value(..., tol=0)``) and prints its value, its norm and the
cosines between the three directions. If the gradient were rounding, the float32 and float64
directions would be unrelated (cosine ≈ 0); a stable direction whose norm falls with the
tolerance is a systematic push towards a faster-contracting map, which relative scaling
(``add_penalties``) used to multiply up to the task gradient's norm on every step.

Run: ``python examples/eqprop_residual_push.py runs/noplateau/bptt`` (a few seconds). The
README quotes it for the 2,000-step BPTT run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from gradstats.data import load_corpus
from gradstats.eqprop import EquilibriumModule, penalty_value, relax
from gradstats.eqprop.train._checkpoint import build_from_checkpoint, load_checkpoint

TOLERANCES = (("float32", 1e-6), ("float32", 1e-5), ("float64", 1e-13))


def residual_push(
    model: EquilibriumModule, x: torch.Tensor, tol: float, max_steps: int = 400
) -> tuple[float, torch.Tensor, float]:
    """(½ mean_b ‖F(z*)‖², its gradient over the parameters as one float64 vector, the largest
    relative residual) at the fixed point relaxed to ``tol``."""
    z, stats = relax(model, x, tol=tol, max_steps=max_steps)
    value = penalty_value(model, x, z, "residual")
    params = list(model.parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    flat = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1).double()
            for p, g in zip(params, grads, strict=True)
        ]
    )
    return float(value.detach()), flat, float(stats.final_residual.max())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a gradstats eqprop train run folder")
    parser.add_argument("--batch", type=int, default=16, help="windows of the batch")
    parser.add_argument("--seed", type=int, default=5, help="seed of the batch")
    args = parser.parse_args(argv)
    state = load_checkpoint(args.run / "checkpoint.pt")
    model = build_from_checkpoint(state, weights="raw")
    if not isinstance(model, EquilibriumModule):
        raise SystemExit(f"{args.run} is a {type(model).__name__} run: pick an equilibrium run")
    config = state["config"]
    corpus = load_corpus(config.get("data"))
    block = int(config["block_size"])
    x, _ = corpus.batch(
        "train", args.batch, block, generator=torch.Generator().manual_seed(args.seed)
    )
    found = {}
    for dtype, tol in TOLERANCES:
        net = model if dtype == "float32" else copy.deepcopy(model).double()
        value, grad, worst = residual_push(net, x, tol)
        found[(dtype, tol)] = grad
        print(f"{dtype} tol {tol:g}: penalty {value:.2e}, |gradient| {float(grad.norm()):.2e}, "
              f"largest residual {worst:.1e}")  # fmt: skip
    (a, ga), (b, gb), (c, gc) = (
        (f"{dtype} at tol {tol:g}", grad) for (dtype, tol), grad in found.items()
    )

    def cos(u: torch.Tensor, v: torch.Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    out = {"f32_f64": cos(ga, gc), "f32_f32": cos(ga, gb)}
    print(f"cos({a}, {c}) = {out['f32_f64']:.3f}; cos({a}, {b}) = {out['f32_f32']:.3f}")
    return out


if __name__ == "__main__":
    main()
