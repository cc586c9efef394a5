"""Every layer handler against per-sample loops (float64): set up, call both, compare."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradstats.errors import ConfigurationError
from gradstats.fisher import FisherCollector
from gradstats.testing import per_sample_gradients, reference_fisher
from tests.fisher.models import TokenModel, hf_causal_lm, mlp


def _conv(dims, channels_in=4, **kwargs):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](channels_in, 6, **kwargs)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, channels_in, *([6] * dims))
    model(x)  # materialise the lazy layer
    return model, x


class Sequence(nn.Module):
    """A Linear applied to [B, T, d] (sequence path) and a HF GPT-2 Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.lin = nn.Linear(4, 6)
        self.conv1d = Conv1D(5, 6)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv1d(torch.tanh(self.lin(x)))).sum(1))


class HFNorm(nn.Module):
    """A Llama RMSNorm (float32 internally, weight × x̂) and a Gemma-style (1 + w) variant."""

    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        class GemmaStyleRMSNorm(nn.Module):
            def __init__(self, d):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(d) * 0.1)

            def forward(self, x):
                return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

        self.inp = nn.Linear(3, 4)
        self.norm = LlamaRMSNorm(4)
        self.norm.weight.data.normal_()
        self.gemma = GemmaStyleRMSNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gemma(self.norm(self.inp(x))).mean(1))


class Scale(nn.Module):
    """A module without a dedicated handler: per-feature scale with a data-independent path."""

    def __init__(self, d):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(d) * 0.1)
        self.shift = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return x * self.log_scale.exp() + self.shift


class ItemScale(Scale):
    """Reads a value to the host in forward: vmap cannot trace it, the loop fallback must."""

    def forward(self, x):
        factor = float(x.abs().max().item() > -1.0)
        return factor * super().forward(x)


class Tied(nn.Module):
    """Input embedding and output layer share one weight; the middle layer is called twice."""

    def __init__(self, vocab=6, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = self.mid(torch.tanh(self.mid(self.emb(x))))
        return self.out(h.mean(1))


def _case(name):
    g = torch.Generator().manual_seed(1)
    if name == "linear":
        model, x = mlp((5, 7, 4, 3)), torch.randn(9, 5, generator=g)
    elif name == "sequence_linear_and_conv1d_hf":
        model, x = Sequence(), torch.randn(4, 3, 4, generator=g)
    elif name.startswith("conv"):
        dims = int(name[4])
        kwargs = {
            "plain": dict(kernel_size=3),
            "strided": dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
            "same_reflect": dict(kernel_size=2, padding="same", padding_mode="replicate"),
            "same_dilated": dict(kernel_size=3, padding="same", dilation=2, bias=False),
        }[name.split("-")[1]]
        model, x = _conv(dims, **kwargs)
    elif name == "embedding_layernorm_rmsnorm":
        model, x = TokenModel(), torch.randint(0, 7, (6, 5), generator=g)
    elif name == "hf_rmsnorm":
        model, x = HFNorm(), torch.randn(5, 2, 3, generator=g)
    elif name == "fallback_vmap":
        model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(6, 3, generator=g)
    elif name == "fallback_loop":
        model = nn.Sequential(nn.Linear(3, 4), ItemScale(4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(6, 3, generator=g)
    elif name == "multihead_attention":

        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
                self.head = nn.Linear(4, 3)

            def forward(self, x):
                return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

        model, x = Attn(), torch.randn(5, 3, 4, generator=g)
    elif name == "tied_and_called_twice":
        model, x = Tied(), torch.randint(0, 6, (5, 4), generator=g)
    else:
        raise KeyError(name)
    targets = torch.randint(
        0, 3 if name != "tied_and_called_twice" else 6, (x.shape[0],), generator=g
    )
    return model.double(), x.double() if x.is_floating_point() else x, targets


CASES = {
    "linear": {"0": "linear", "2": "linear", "4": "linear"},
    "sequence_linear_and_conv1d_hf": {"lin": "linear", "conv1d": "conv1d_hf"},
    "conv1-plain": {"0": "conv1d"},
    "conv1-strided": {"0": "conv1d"},
    "conv1-same_reflect": {"0": "conv1d"},
    "conv2-plain": {"0": "conv2d"},
    "conv2-strided": {"0": "conv2d"},
    "conv2-same_dilated": {"0": "conv2d"},
    "conv3-plain": {"0": "conv3d"},
    "conv3-strided": {"0": "conv3d"},
    "conv3-same_reflect": {"0": "conv3d"},
    "embedding_layernorm_rmsnorm": {"emb": "embedding", "ln": "layernorm", "rms": "rmsnorm"},
    "hf_rmsnorm": {"norm": "rmsnorm_hf", "gemma": "rmsnorm_hf"},
    "fallback_vmap": {"1": "vmap"},
    "fallback_loop": {"1": "loop"},
    "multihead_attention": {"attn": "vmap"},
    "tied_and_called_twice": {"emb": "embedding", "mid": "linear", "out": "linear"},
}


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_per_sample_loop(case, kind):
    model, x, y = _case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notices
        fc = FisherCollector(model, kind, "classification", groups=None)
        fc.collect(x, y if kind == "empirical" else None)
    expected = reference_fisher(model, x, y, kind=kind)
    got = fc.fisher()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    handlers = fc.handlers
    for module, handler in CASES[case].items():
        assert handlers[module] == handler


def test_fallback_is_announced_at_the_callers_line():
    model, _, _ = _case("fallback_vmap")
    with pytest.warns(
        UserWarning, match=r"no dedicated per-sample handler for 1; using the torch"
    ) as got:
        FisherCollector(model, groups=None)
    assert got[0].filename == __file__


def test_vmap_failure_warning_points_at_the_callers_line():
    model, x, y = _case("fallback_loop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FisherCollector(model, groups=None)
    with pytest.warns(UserWarning, match="using a per-sample loop") as got:
        fc.collect(x, y)
    assert got[0].filename == __file__


def test_vmap_failure_switches_to_the_loop_with_a_warning():
    model, x, y = _case("fallback_loop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FisherCollector(model, groups=None)
    with pytest.warns(UserWarning, match="using a per-sample loop"):
        fc.collect(x, y)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FisherCollector(model, groups=None)
    with pytest.raises(
        ConfigurationError, match=r"'1' is a BatchNorm in training mode.*model.eval\(\)"
    ):
        fc.collect(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    model.eval()
    fc.collect(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    assert fc.counts["samples"] == 4


def test_parameter_used_outside_its_module_is_an_error():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):  # the weight is also read directly, bypassing lin's forward
            return self.lin(x) + x @ self.lin.weight

    model = Sneaky().double()
    fc = FisherCollector(model, groups=None)
    with pytest.raises(
        ConfigurationError,
        match=r"lin.weight \(module 'lin'\): either the parameter is used outside",
    ):
        fc.collect(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert fc.counts["batches"] == 0


def test_module_mixing_the_samples_is_an_error_naming_it():
    class BatchSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):  # every output row depends on every sample
            return x + x.sum(0) * self.scale

    model = nn.Sequential(nn.Linear(3, 4), BatchSum(), nn.Linear(4, 2)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notice
        fc = FisherCollector(model, groups=None)
    with pytest.raises(ConfigurationError, match=r"1.scale \(module '1'\).*mixes the samples"):
        fc.collect(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    assert fc.counts["batches"] == 0


def test_module_called_without_a_batch_dimension_is_an_error_naming_it():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(7, 4), nn.Embedding(5, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # pos sees [T] indices: no batch dimension to split by sample
            return self.head((self.tok(x) + self.pos(torch.arange(x.shape[1]))).mean(1))

    fc = FisherCollector(Positions().double(), groups=None)
    with pytest.raises(
        ConfigurationError, match=r"module 'pos': the index input has shape \(5,\) but"
    ):
        fc.collect(torch.randint(0, 7, (3, 5)), torch.tensor([0, 1, 2]))


def test_scale_grad_by_freq_embedding_is_refused():
    model = nn.Sequential(
        nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2)
    )
    with pytest.raises(ConfigurationError, match="scale_grad_by_freq=True"):
        FisherCollector(model)


@pytest.mark.parametrize("chunk_bytes", [1, 200, 10**9])
def test_chunking_does_not_change_the_result(chunk_bytes):
    model, x, y = _case("sequence_linear_and_conv1d_hf")
    fc = FisherCollector(model, groups=None, chunk_bytes=chunk_bytes).collect(x, y)
    expected = reference_fisher(model, x, y)
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name])


def test_vocabulary_chunking_of_the_output_layer():
    model = mlp((4, 6, 50))
    x, y = torch.randn(7, 4), torch.randint(0, 50, (7,))
    fc = FisherCollector(model, groups=None, chunk_bytes=7 * 8 * 3).collect(x, y)
    expected = reference_fisher(model, x, y)
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name])


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen3", "gpt_neox"])
def test_hf_causal_lm_matches_per_sequence_loop(model_type):
    model = hf_causal_lm(model_type)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 4:] = 0
    labels = ids.clone()
    labels[0, :2] = -100
    inputs = {"input_ids": ids, "attention_mask": attention}
    fc = FisherCollector(model, "empirical", "causal_lm", groups=None).collect(inputs, labels)
    expected = reference_fisher(model, inputs, labels, likelihood="causal_lm")
    for name, value in fc.fisher().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    assert "rmsnorm_hf" in fc.handlers.values() or "layernorm" in fc.handlers.values()


def test_per_sample_gradients_reference_sums_to_autograd():
    model, x, y = _case("linear")
    per_sample = per_sample_gradients(model, x, y)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), grad in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(per_sample[name].sum(0), grad)
