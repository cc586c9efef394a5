"""The per_sample cost floor computes what the statistic needs (else it is no floor): the
per-example Σ_i ‖c_i‖² of every weight and bias and ‖ĝ‖² of every gradient, against a float64
per-example autograd loop."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats.bench.suites._scaling_floors import per_sample_floor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_floor_gives_the_per_example_sums_and_gradient_norms(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))
    tol = {"rtol": 1e-12 if dtype == torch.float64 else 1e-5, "atol": 0.0}

    def loss(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    sums, sq = per_sample_floor(copy.deepcopy(model), loss, 7)()
    params = list(model.parameters())  # weight 0, bias 0, weight 1, bias 1
    per_example = torch.zeros(len(params), dtype=dtype)
    for i in range(7):  # c_i = ∇(loss_i / B): the share of example i in .grad
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / 7, params)
        per_example += torch.stack([g.square().sum() for g in grads])
    full = torch.autograd.grad(loss(model), params)
    per_example = per_example.to(torch.float64)
    torch.testing.assert_close(sums[0], per_example[0::2], **tol)  # weights
    torch.testing.assert_close(sums[1], per_example[1::2], **tol)  # biases
    norms = torch.stack([g.double().square().sum() for g in full])
    torch.testing.assert_close(sq, norms, **tol)


def _tiny_gpt2(id_range: int):
    """A float64 GPT-2 config (vocabulary 40, tied embeddings), 3 sequences of 12 ids below
    ``id_range``, its mean next-token loss (on some ``rows``, or summed) and the mean's scale."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, id_range, (3, 12))
    scale = ids.shape[0] * (ids.shape[1] - 1)

    def loss(m: nn.Module, rows=slice(None), reduction="mean") -> torch.Tensor:
        logits = m(ids[rows]).logits[:, :-1]
        targets = ids[rows, 1:].reshape(-1)
        return F.cross_entropy(logits.reshape(-1, 40), targets, reduction=reduction)

    return model, ids, loss, scale


def test_sequence_floor_gives_the_gradient_and_the_per_sequence_norms():
    """GPT-2 config with tied embeddings (float64): ĝ of every parameter equals a plain
    backward's, and ‖c‖ of every Conv1D weight equals a per-sequence autograd loop."""
    from gradstats.bench.suites._scaling_floors import sequence_floor

    model, ids, loss, scale = _tiny_gpt2(40)

    norms, sq, grads = sequence_floor(copy.deepcopy(model), loss)()
    params = list(model.parameters())
    full = torch.autograd.grad(loss(model), params)
    for ours, g in zip(grads, full, strict=True):
        torch.testing.assert_close(ours, g, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        sq, torch.stack([g.square().sum() for g in full]), rtol=1e-10, atol=0
    )
    conv = [m.weight for m in model.modules() if type(m).__name__ == "Conv1D"]
    per_sequence = torch.zeros(len(conv), dtype=torch.float64)
    for i in range(ids.shape[0]):
        share = loss(model, slice(i, i + 1), "sum") / scale
        per_sequence += torch.stack([g.square().sum() for g in torch.autograd.grad(share, conv)])
    torch.testing.assert_close(norms[:-1].square(), per_sequence, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_complete_sequence_floor_gives_every_per_sequence_norm(dtype):
    """GPT-2 config, tied embeddings, broadcast position embeddings: Σ_i ‖c_i‖² of every
    parameter (LayerNorms, biases, both embeddings, the tied weight's cross term) equals a
    per-sequence autograd loop (float64), and ĝ (returned and in ``.grad``) equals a plain
    backward's; in float32 (the benchmark's dtype, x̂ recovered from the LayerNorm's output) the
    same to float32 rounding. Other layers are refused."""
    from gradstats.bench.suites._scaling_floors import complete_sequence_floor

    model, ids, loss, scale = _tiny_gpt2(8)  # ids < 8: repeated ids within a sequence
    with torch.no_grad():  # LayerNorms away from their initial γ = 1, β = 0
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    f64 = dtype == torch.float64
    tol = {"rtol": 1e-10, "atol": 1e-14} if f64 else {"rtol": 2e-4, "atol": 1e-6}

    hooked = copy.deepcopy(model).to(dtype)
    floor = complete_sequence_floor(hooked, loss)
    floor()
    norms, sq, grads = floor()  # a second call: .grad is zeroed, not accumulated across calls
    params = list(model.parameters())
    full = torch.autograd.grad(loss(model), params)
    for ours, written, g in zip(grads, hooked.parameters(), full, strict=True):
        torch.testing.assert_close(ours.double(), g, **tol)
        torch.testing.assert_close(written.grad.double(), g, **tol)
    norm_tol = {"rtol": 1e-10 if f64 else 2e-4, "atol": 0.0}
    torch.testing.assert_close(sq, torch.stack([g.square().sum() for g in full]), **norm_tol)
    per_sequence = torch.zeros(len(params), dtype=torch.float64)
    for i in range(ids.shape[0]):
        share = loss(model, slice(i, i + 1), "sum") / scale
        per_sequence += torch.stack([g.square().sum() for g in torch.autograd.grad(share, params)])
    torch.testing.assert_close(norms, per_sequence, **norm_tol)
    with pytest.raises(ValueError, match="owned by"):
        complete_sequence_floor(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)), loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_backpack_peer_gives_the_same_sums(dtype):
    """BackPACK's BatchL2Grad peer forms the statistic's inputs: Σ_i ‖c_i‖² and ‖ĝ‖² per tensor."""
    pytest.importorskip("backpack")
    from gradstats.bench.suites._scaling_peers import backpack_batch_l2

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))
    tol = {"rtol": 1e-12 if dtype == torch.float64 else 1e-5, "atol": 0.0}
    small, sq = backpack_batch_l2(copy.deepcopy(model), x, y)()
    params = list(model.parameters())
    per_example = torch.zeros(len(params), dtype=torch.float64)
    for i in range(7):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]) / 7, params)
        per_example += torch.stack([g.double().square().sum() for g in grads])
    full = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    torch.testing.assert_close(small, per_example, **tol)
    torch.testing.assert_close(sq, torch.stack([g.double().square().sum() for g in full]), **tol)
