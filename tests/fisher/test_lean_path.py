"""The lean batch path of Linear stacks (``gradstats.fisher._lean``) gives the general path's
bits, in float32 and float64, and is taken exactly where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstats.errors import NonFiniteError
from gradstats.fisher import FisherCollector
from gradstats.fisher._engine import Engine

DTYPES = [torch.float32, torch.float64]


def _model(dtype, bias_free_middle=False):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, 4, bias=not bias_free_middle),
        nn.Tanh(),
        nn.Linear(4, 3),
    ).to(dtype)


def _batches(dtype, sizes, nan_at=None):
    gen = torch.Generator().manual_seed(1)
    out = []
    for index, n in enumerate(sizes):
        x = (torch.randn(n, 6, generator=gen) * 3).to(dtype)
        if index == nan_at:
            x[0, 2] = float("nan")
        out.append((x, torch.randint(0, 3, (n,), generator=gen)))
    return out


def _state(fc):
    fc.result.state.flush()
    return fc.result.state.tensors()


def _pair(make, batches, **options):
    """(lean, general) collectors of ``make()``'s model fed the same batches."""
    pair = []
    for lean in (True, False):
        fc = FisherCollector(make(), "empirical", **options)
        assert fc._lean is not None
        if not lean:
            fc._lean = None
        for x, y in batches:
            fc.collect(x, y)
        pair.append(fc)
    return pair


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, {"signal": False, "groups": None}], ids=["defaults", "ef"])
@pytest.mark.parametrize("bias_free_middle", [False, True])
def test_lean_path_gives_the_general_paths_bits(dtype, options, bias_free_middle):
    sizes = [7, 1, 9, 3] * 10  # more batches than FOLD_EVERY, a batch of one
    lean, general = _pair(
        lambda: _model(dtype, bias_free_middle), _batches(dtype, sizes, nan_at=5), **options
    )
    a, b = _state(lean), _state(general)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert lean.counts == general.counts
    assert lean.counts["skipped"] == 1


def test_lean_path_is_the_one_taken(monkeypatch):
    fc = FisherCollector(_model(torch.float32), "empirical")
    batches = _batches(torch.float32, [5, 5])
    fc.collect(*batches[0])  # the first batch: completeness check on the general path

    def general_pass(*args, **kwargs):
        raise AssertionError("the general path ran")

    monkeypatch.setattr(Engine, "run_pass", general_pass)
    fc.collect(*batches[1])
    assert fc.counts["batches"] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"element_se": True},
        {"mode": "ema"},
        {"kind": "mc"},
        {"kind": "exact"},
        {"groups": None, "params": ["0.weight", "2.weight"]},  # a bias left out: fine
    ],
    ids=["element_se", "ema", "mc", "exact", "params"],
)
def test_eligibility(options):
    kind = options.pop("kind", "empirical")
    fc = FisherCollector(_model(torch.float32), kind, **options)
    assert (fc._lean is not None) == ("params" in str(options))


def test_a_conv_model_takes_the_general_path():
    conv = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 2))
    assert FisherCollector(conv, "empirical")._lean is None


def _sequence_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).double()


def _shared_model():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(4, 4), shared, nn.Tanh(), shared, nn.Linear(4, 3)).double()


@pytest.mark.parametrize(
    ("make", "shape"),
    [(_sequence_model, (6, 3, 4)), (_shared_model, (6, 4))],
    ids=["seq", "shared"],
)
def test_a_batch_it_does_not_handle_falls_back_to_the_general_path(make, shape):
    model = make()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    a, b = (_state(fc) for fc in _pair(lambda: model, [(x, y)] * 3))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_raise_changes_nothing():
    fc = FisherCollector(_model(torch.float64), "empirical", nonfinite="raise")
    good, bad = _batches(torch.float64, [4, 4], nan_at=1)
    fc.collect(*good).collect(*good)
    before = {k: v.clone() for k, v in _state(fc).items()}
    with pytest.raises(NonFiniteError, match="non-finite batch"):
        fc.collect(*bad)
    after = _state(fc)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_replaced_layer_is_still_detected():
    model = _model(torch.float32)
    fc = FisherCollector(model, "empirical")
    x, y = _batches(torch.float32, [4])[0]
    fc.collect(x, y).collect(x, y)
    model[2] = nn.Linear(5, 4)
    with pytest.raises(Exception, match="replaced"):
        fc.collect(x, y)


class _WithUnusedBranch(nn.Module):
    """A Linear whose output does not reach the loss: its gradient is None, its Fisher zero."""

    def __init__(self):
        super().__init__()
        self.body, self.aux, self.head = nn.Linear(6, 5), nn.Linear(6, 2), nn.Linear(5, 3)

    def forward(self, x):
        self.aux(x)
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_output_that_does_not_reach_the_loss(dtype):
    torch.manual_seed(0)
    model = _WithUnusedBranch().to(dtype)
    a, b = (_state(fc) for fc in _pair(lambda: model, _batches(dtype, [5, 4, 6])))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not a["g2_sum/aux.weight"].any()


def test_batch_flag_of_a_host_bool_and_of_a_tensor():
    from gradstats.fisher._state_pending import batch_flag

    cpu = torch.device("cpu")
    accepted, flag = batch_flag(True, cpu)
    assert accepted is True
    assert flag.dtype == torch.bool
    assert bool(flag)
    accepted, flag = batch_flag(False, cpu)
    assert accepted is False
    assert not bool(flag)
    accepted, flag = batch_flag(torch.tensor(False), cpu)
    assert accepted is False
    assert not bool(flag)


def test_huge_but_finite_batches_take_the_general_paths_decisions(monkeypatch):
    """Entries near 1e19 in float32: the maxima's bound no longer decides, the proxies do —
    accepted where the general path accepts, skipped where it skips, the same bits."""
    import gradstats.fisher._lean as lean_module

    fallbacks = []
    exact = lean_module._proxies_total
    monkeypatch.setattr(lean_module, "_proxies_total", lambda sq: fallbacks.append(1) or exact(sq))
    batches = []
    for scale in (1.0, 3e17, 1e18, 2e18, 5e18, 1e19, 1.0):  # a² up to ~1e38·9
        x, y = _batches(torch.float32, [4])[0]
        batches.append((x * scale, y))

    def linear():  # logits' gradients p − onehot stay O(1) however large the input
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 3)).float()

    lean, general = _pair(linear, [batches[0], *batches])
    a, b = _state(lean), _state(general)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lean.counts == general.counts
    assert fallbacks  # the bound did not decide some batches
    assert 0 < lean.counts["skipped"] < len(batches) - 2  # some huge batches kept, some not


def test_a_row_sum_overflow_next_to_a_zero_row_is_the_general_paths_decision():
    """float32 inputs ±1.5e19: a² is finite but its row sums overflow, while the labels (the
    argmax) make the gradient rows exactly zero; the general proxy is inf·0 = NaN and skips
    the batch — the maxima's bound (0) must not accept it."""
    gen = torch.Generator().manual_seed(3)

    def linear():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 3)).float()

    model = linear()
    ordinary = _batches(torch.float32, [4])[0]
    x = (torch.randn(4, 6, generator=gen).sign() * 1.5e19).float()
    with torch.no_grad():
        y = model(x).argmax(1)
    lean, general = _pair(linear, [ordinary, ordinary, (x, y), ordinary], groups=None)
    a, b = _state(lean), _state(general)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lean.counts == general.counts


class _ZeroInput(nn.Module):
    """A layer with no input features (its output is its bias) feeding an ordinary one."""

    def __init__(self, bias: float):
        super().__init__()
        torch.manual_seed(0)
        self.empty = nn.Linear(0, 3)
        nn.init.constant_(self.empty.bias, bias)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.empty(x[:, :0]).sqrt() + x[:, :3])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("bias", [0.0, 1.0])
def test_a_zero_width_layer_is_the_general_paths_decision(bias):
    """in_features = 0: no maxima of a² to take; its bias's proxy Σb² still decides (sqrt at 0
    makes that layer's output gradients infinite)."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 3, generator=gen).float(), torch.randint(0, 2, (5,), generator=gen)
    batches = [(x, y)] * 3
    lean, general = _pair(lambda: _ZeroInput(bias).float(), batches, groups=None)
    a, b = _state(lean), _state(general)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lean.counts == general.counts
    assert lean.counts["skipped"] == (len(batches) if bias == 0.0 else 0)
