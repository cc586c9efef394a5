"""Variance gradient scaler: cost of one statistics update plus factor, side by side.

* ``scaling/step-cost`` — a ~5M-parameter, 100-tensor model with gradients in place. Baseline:
  one ``AdamW(fused=True)`` step (the bandwidth floor of an optimizer step: it reads p, g, m, v
  and writes p, m, v, 28 B/element in float32), beside ``AdamW(foreach=True)``. Candidates: the
  scaler's update + factor (``temporal``, ``same_point`` with two recorded micro-batches), and a
  per-tensor implementation of the same temporal statistic that reads each tensor's sums with
  ``.item()`` (the original's style). Goals: ``temporal`` <= 1.0x the fused AdamW step, >= 10x
  faster than the ``.item()`` implementation (mostly a GPU effect: every ``.item()`` syncs).
  Traffic of the ``temporal`` update, float32, per element: ‖g‖² summed in float64 4 B (on CPU
  torch materialises a float64 copy for it); c·(g − m) into a scratch buffer (copy 8 B,
  subtract 12 B, scale 8 B); ‖c·δ‖² 4 B; NaN clean 8 B; m += (a/c)·(c·δ) 12 B — 56 B, seven
  foreach ops per dtype whatever the number of tensors (no pass over m to read the signal:
  ‖m‖² is carried). The earlier update moved 28 B but formed the variance as q − ‖m‖² (wrong
  in float32 at large offsets) and cleaned NaN tensor by tensor (~630 ops at 100 tensors).
* ``scaling/same-numbers`` — ours and the ``.item()`` implementation on the same gradient
  sequence give the same ρ.
* ``scaling/per-sample-mlp`` and ``scaling/per-sample-gpt2`` — ``statistic="per_sample"``
  (forward + backward with the module hooks + ``step()``) ÷ a plain forward + backward, on the
  MLP 784-512-512-10 at batch 256 and a GPT-2 config (4 layers, width 128, vocab 2048) at
  8×128 tokens. Goal: <= 1.1x.

Persistent extra memory (state) is recorded in the comparison's params: the temporal statistic
keeps one buffer per parameter (AdamW keeps two), the others only per-tensor scalars.

Run: ``gradstats bench scaling`` (``--smoke`` for a seconds-long check).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gradstats import VarianceGradientScaler
from gradstats.bench._harness import Candidate, Comparison
from gradstats.bench._optional import Skipped, missing

__all__ = ["comparisons"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(smoke: bool, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    blocks, rows, cols = (4, 16, 24) if smoke else (50, 256, 384)
    g = torch.Generator().manual_seed(seed)
    named = []
    for b in range(blocks):
        for name, shape in ((f"{b}.weight", (rows, cols)), (f"{b}.bias", (cols,))):
            p = torch.nn.Parameter(torch.zeros(shape, device=DEVICE))
            p.grad = (torch.randn(shape, generator=g) + 0.1).to(DEVICE)
            named.append((name, p))
    return named


class ItemwiseTemporal:
    """The temporal statistic computed tensor by tensor, with one ``.item()`` per reduction."""

    def __init__(self, params: Sequence[torch.Tensor], beta: float) -> None:
        self.params, self.beta, self.t = params, beta, 0
        self.mean = [torch.zeros_like(p) for p in params]
        self.var = [torch.zeros_like(p) for p in params]

    def step(self) -> float:
        self.t += 1
        step = (1 - self.beta) / (1 - self.beta**self.t)
        rho_w = (
            (1 - self.beta) * (1 + self.beta**self.t) / ((1 + self.beta) * (1 - self.beta**self.t))
        )
        noise = signal = 0.0
        for p, m, v in zip(self.params, self.mean, self.var, strict=True):
            grad = p.grad
            if grad is None or not torch.isfinite(grad).all().item():
                continue
            delta = grad - m
            m.add_(delta, alpha=step)
            v.add_(delta.square(), alpha=step).mul_(1 - step)
            if self.t > 1:
                unbiased = v.sum().item() / (1 - rho_w)
                noise += unbiased
                signal += m.square().sum().item() - rho_w * unbiased
        return noise / signal if self.t > 1 and signal > 0 else float("nan")


def _step_cost(smoke: bool) -> Comparison:
    named = _params(smoke)
    params = [p for _, p in named]
    adamw = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    temporal = VarianceGradientScaler(named, beta=0.99)
    same_point = VarianceGradientScaler(named, statistic="same_point", beta=0.99)
    itemwise = ItemwiseTemporal(params, beta=0.99)
    grads = [p.grad for p in params]
    for _ in range(2):  # an estimate exists from the start
        temporal.update_statistics()
        itemwise.step()

    def ours_same_point():
        same_point.observe(grads)  # what the backward hooks record for two micro-batches
        same_point.observe(grads)
        same_point.update_statistics()

    numel = sum(p.numel() for p in params)
    return Comparison(
        name="scaling/step-cost",
        candidates=[
            Candidate("AdamW(fused) step", fused.step, "baseline: bandwidth floor"),
            Candidate("AdamW(foreach) step", adamw.step, "28 B/element, foreach"),
            Candidate("gradstats temporal", temporal.update_statistics, "update + factor"),
            Candidate("gradstats same_point", ours_same_point, "2 micro-batches + update"),
            Candidate("per-tensor .item()", itemwise.step, "same statistic, host reads"),
        ],
        baseline="AdamW(fused) step",
        check=False,
        memory=True,
        device=DEVICE,
        params={
            "parameters": numel,
            "tensors": len(params),
            "state_bytes_adamw": 2 * 4 * numel,
            "state_bytes_temporal": 4 * numel + 16 * len(params),
            "scratch_bytes_temporal": 4 * numel,
            "traffic_bytes_per_element_temporal": 56,
            "traffic_bytes_per_element_adamw": 28,
            "state_bytes_same_point": 32 * len(params),
        },
    )


def _same_numbers(smoke: bool) -> Comparison:
    steps = 3 if smoke else 8

    def run(kind: str) -> torch.Tensor:
        named = _params(True, seed=1)
        params = [p for _, p in named]
        ours = VarianceGradientScaler(named, beta=0.9)
        reference = ItemwiseTemporal(params, beta=0.9)
        g = torch.Generator().manual_seed(2)
        rho = float("nan")
        for _ in range(steps):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) + 0.5).to(DEVICE)
            if kind == "ours":
                ours.update_statistics()
                rho = ours.get_normalized_variance()
            else:
                rho = reference.step()
        return torch.tensor(rho)

    return Comparison(
        name="scaling/same-numbers",
        candidates=[
            Candidate("gradstats temporal", lambda: run("ours")),
            Candidate("per-tensor .item()", lambda: run("itemwise")),
        ],
        baseline="per-tensor .item()",
        rtol=1e-4,  # float32 state on both sides, different summation order
        device=DEVICE,
    )


def _per_sample_cost(
    name: str, model: torch.nn.Module, loss: Callable[[torch.nn.Module], torch.Tensor], **params
) -> Comparison:
    """Forward + backward (+ the scaler's step) with and without the per-sample hooks."""
    plain, hooked = model, copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vgs = VarianceGradientScaler(
            hooked.named_parameters(), statistic="per_sample", model=hooked, beta=0.99
        )

    def backward() -> None:
        plain.zero_grad(set_to_none=False)
        loss(plain).backward()

    def per_sample() -> None:
        hooked.zero_grad(set_to_none=False)
        loss(hooked).backward()
        vgs.step()

    return Comparison(
        name=name,
        candidates=[
            Candidate("plain backward", backward, "baseline: forward + backward"),
            Candidate("gradstats per_sample", per_sample, "forward + backward + step"),
        ],
        baseline="plain backward",
        check=False,
        device=DEVICE,
        params=params,
    )


def _per_sample_mlp(smoke: bool) -> Comparison:
    sizes, batch = ((32, 16, 16, 10), 8) if smoke else ((784, 512, 512, 10), 256)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=g).to(DEVICE)
    y = torch.randint(0, sizes[-1], (batch,), generator=g).to(DEVICE)
    return _per_sample_cost(
        "scaling/per-sample-mlp",
        model,
        lambda m: F.cross_entropy(m(x), y),
        sizes=list(sizes),
        batch=batch,
    )


def _per_sample_gpt2(smoke: bool) -> Comparison | Skipped:
    note = missing("transformers")
    if note is not None:
        return Skipped("scaling/per-sample-gpt2", note)
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    layers, width, heads, vocab, batch, length = (
        (1, 16, 2, 64, 2, 16) if smoke else (4, 128, 4, 2048, 8, 128)
    )
    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=length,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model: torch.nn.Module = GPT2LMHeadModel(config)
    model = model.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(DEVICE)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        logits = m(ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return _per_sample_cost(
        "scaling/per-sample-gpt2", model, loss, n_layer=layers, n_embd=width,
        vocab_size=vocab, batch=batch, length=length, tied_embeddings=True,
    )  # fmt: skip


def comparisons(smoke: bool) -> list[Comparison | Skipped]:
    """The suite's comparisons (``smoke``: tiny sizes)."""
    return [
        _step_cost(smoke),
        _same_numbers(smoke),
        _per_sample_mlp(smoke),
        _per_sample_gpt2(smoke),
    ]
