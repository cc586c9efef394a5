"""The lean Linear path (``gradstats.fisher._lean``) against the general path, case by case.

The lean path must hand ``FisherState.update`` exactly the tensors of the general path
(``fc._lean = None``), or not be taken. Two group configurations it once accepted and computed
differently — a family of weight rows whose bias is not selected, and one family fed by two
layers — are refused now (the loop references show the general path's values are the right
ones). The rest pins what was checked and found equal: the
statistics, counts, errors and warnings of many configurations and batch sequences, the direct
forward-hook branch against the pre-change hook, and the float32 rounding of the 32-batch folds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradstats.fisher import FisherCollector, GroupFamily, Member, _lean
from gradstats.fisher import _state_pending as pending
from gradstats.fisher._engine import Engine, Site
from gradstats.fisher._inputs import batch_rows
from gradstats.testing import labelled_gradients, reference_group_values


# ----------------------------------------------------------------------------- harness
def _batches(dtype, sizes, *, d=6, classes=3, nan_at=None, seq=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index, n in enumerate(sizes):
        shape = (n, d) if seq is None or seq[index] is None else (n, seq[index], d)
        x = (torch.randn(*shape, generator=gen) * 2).to(dtype)
        if index == nan_at:
            x[0, 1] = float("nan")
        out.append((x, torch.randint(0, classes, (n,), generator=gen)))
    return out


def _run(make, batches, lean, monkeypatch=None, **options):
    """Collect ``batches`` on a fresh ``make()``; (collector, outcomes, warnings, lean results)."""
    hits: list[object] = []
    original = _lean.LeanLinearPath.collect

    def spy(self, collector, prepared):
        try:
            value = original(self, collector, prepared)
        except BaseException:
            hits.append("raised")
            raise
        hits.append(value)
        return value

    kind = options.pop("kind", "empirical")
    likelihood = options.pop("likelihood", "classification")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fc = FisherCollector(make(), kind, likelihood, **options)
        took = fc._lean is not None
        if not lean:
            fc._lean = None
        outcomes = []
        _lean.LeanLinearPath.collect = spy
        try:
            for x, y in batches:
                try:
                    fc.collect(x, y)
                    outcomes.append(None)
                except Exception as error:
                    outcomes.append((type(error).__name__, str(error)))
        finally:
            _lean.LeanLinearPath.collect = original
    return fc, took, outcomes, [str(w.message) for w in caught], hits


def _state(fc):
    fc.result.state.flush()
    return {k: v.clone() for k, v in fc.result.state.tensors().items()}


def _assert_same(make, batches, *, expect_lean=True, **options):
    """Both paths: same state bits, counts, errors and warnings; returns the lean hits."""
    lean, took, out_a, warn_a, hits = _run(make, batches, True, **dict(options))
    general, _, out_b, warn_b, _ = _run(make, batches, False, **dict(options))
    assert took == expect_lean
    assert out_a == out_b
    assert warn_a == warn_b
    assert lean.counts == general.counts
    a, b = _state(lean), _state(general)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    return hits


def _mlp(dtype=torch.float64, *, out=3, bias=True, act=nn.Tanh, width=5):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(6, width, bias=bias), act(), nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, out)
        ).to(dtype)

    return make


def _with_random_biases(make):
    def inner():
        model = make()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        return model

    return inner


def _reference_groups(model, batches, family):
    """Loop over samples (float64): per-family mean trace and mask values."""
    pairs = []
    for x, y in batches:
        pairs += labelled_gradients(model, x, y, kind="empirical", likelihood="classification")
    params = dict(model.named_parameters())
    return reference_group_values(pairs, params, family)


# ------------------------------------------------------------- finding 1: weight-only channel
def test_weight_only_channel_family_of_a_linear_with_bias():
    """``params=`` leaves a Linear's bias out: the generic channel family then holds only the
    weight rows, whose mask value is θ·g = b·(W a) — without the bias. The lean path takes it
    (``_channel_family`` accepts a lone weight request) and uses b·y with y = W a + bias."""
    make = _with_random_biases(_mlp())
    params = ["0.weight", "2.weight", "2.bias", "4.weight", "4.bias"]
    batches = _batches(torch.float64, [7, 4, 5])
    lean, *_ = _run(make, batches, True, params=params)
    general, *_ = _run(make, batches, False, params=params)
    family = general.group_map.family("0")
    assert [m.param for m in family.members] == ["0.weight"]
    expected = _reference_groups(make(), batches, family)
    torch.testing.assert_close(general.group_fisher("mask")["0"], expected["mask"])  # right
    torch.testing.assert_close(general.group_fisher("trace")["0"], expected["trace"])
    torch.testing.assert_close(lean.group_fisher("trace")["0"], expected["trace"])
    torch.testing.assert_close(lean.group_fisher("mask")["0"], expected["mask"])  # fails


def test_weight_only_channel_family_takes_the_general_path():
    make = _with_random_biases(_mlp())
    batches = _batches(torch.float64, [7, 4, 5])
    _assert_same(make, batches, expect_lean=False, params=["0.weight", "4.weight"])


def test_hf_bert_head_weights_only():
    """The same through the BERT registry: ``pooler`` / ``classifier`` channel families of a
    Hugging Face model (biases non-zero, as after any fine-tuning step), weights selected."""
    transformers = pytest.importorskip("transformers")

    def make():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=11,
            hidden_size=4,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=6,
            max_position_embeddings=8,
            num_labels=3,
        )
        model = transformers.BertForSequenceClassification(config).double().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        return model

    gen = torch.Generator().manual_seed(2)
    batches = [
        ({"input_ids": torch.randint(0, 11, (n, 5), generator=gen)}, torch.randint(0, 3, (n,)))
        for n in (4, 3, 5)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
        full += ["classifier.weight", "classifier.bias"]
        _assert_same(make, batches, params=full)  # weight + bias: equal
        weights = ["bert.pooler.dense.weight", "classifier.weight"]
        _assert_same(make, batches, expect_lean=False, params=weights)


# ---------------------------------------------------------- finding 2: a family over two layers
def _two_layer_family():
    rows = tuple(range(5))
    members = [Member(f"{layer}.{p}", 0, rows) for layer in (0, 2) for p in ("weight", "bias")]
    return GroupFamily("both", "channel", 5, tuple(members))


def _square_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def test_a_family_over_two_linear_layers():
    """One family whose groups take row k (and bias k) of two Linear layers of equal width:
    the general path adds the layers' traces and their θ·g before squaring; the lean path
    keeps only the last layer written (``trace[layer.family] = ...``)."""
    family = _two_layer_family()
    batches = _batches(torch.float64, [7, 4, 5])
    lean, *_ = _run(_square_mlp, batches, True, groups=[family])
    general, *_ = _run(_square_mlp, batches, False, groups=[family])
    expected = _reference_groups(_square_mlp(), batches, family)
    for read in ("trace", "mask"):
        torch.testing.assert_close(general.group_fisher(read)["both"], expected[read])  # right
    for read in ("trace", "mask"):
        torch.testing.assert_close(lean.group_fisher(read)["both"], expected[read])  # fails


# ------------------------------------------------------------------ checked and found equal
DTYPES = [torch.float32, torch.float64]


def _loss_none(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _loss_mean(out, y):
    return nn.functional.cross_entropy(out, y)


CASES = {
    "defaults+nan": ({}, {"nan_at": 2}),
    "regression": ({"likelihood": "regression"}, {"regression": 2}),
    "raise": ({"nonfinite": "raise"}, {"nan_at": 2}),
    "no-first-check+nan-first": ({"check_first_batch": False}, {"nan_at": 0}),
    "signal-off": ({"signal": False}, {}),
    "groups-none": ({"groups": None}, {}),
    "chunked-some": ({"chunk_bytes": 64}, {}),  # batches of 7 and 4 chunk, of 1 do not
    "callable-none": ({"likelihood": _loss_none}, {"nan_at": 2}),
    "callable-mean": ({"likelihood": _loss_mean, "loss_reduction": "mean"}, {}),
    "params-subset": ({"params": ["0.weight", "0.bias", "4.weight", "4.bias"]}, {}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_configurations_give_the_same_bits(dtype, case):
    options, data = (dict(part) for part in CASES[case])
    regression = data.pop("regression", None)
    make = _mlp(dtype, out=regression or 3)
    batches = _batches(dtype, [7, 1, 4, 5], **data)
    if regression:
        gen = torch.Generator().manual_seed(5)
        batches = [
            (x, torch.randn(x.shape[0], regression, generator=gen).to(dtype)) for x, _ in batches
        ]
    hits = _assert_same(make, batches, **options)
    assert True in hits  # the lean path did run


class _InPlace(nn.Module):
    """Linear outputs changed in place after the layer (add_, mul_, ReLU(inplace=True))."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.a(x)
        h.add_(1.0).mul_(0.5)
        return self.c(torch.tanh(self.relu(self.b(torch.tanh(h)))))


class _Broadcast(nn.Module):
    """A Linear called on a batch of one, broadcast over the batch (expanded by the hook)."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.b = nn.Linear(6, 5), nn.Linear(2, 5), nn.Linear(5, 3)
        self.register_buffer("c", torch.ones(1, 2))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x) + self.p(self.c)))


class _Maybe3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h.sum(1) if h.dim() == 3 else h)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _NoGradBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.p, self.b = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            z = self.p(x)
        return self.b(torch.tanh(self.a(x) + z))


class _FrozenTwice(nn.Module):
    """An unselected (hook-less) Linear called twice between two collected ones."""

    def __init__(self):
        super().__init__()
        self.a, self.f, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.f(torch.tanh(self.f(self.a(x))))))


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5).double(), nn.Linear(5, 3).float()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.double())).float())


class _ZeroWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.z, self.e, self.b = (
            nn.Linear(6, 5),
            nn.Linear(5, 0),
            nn.Linear(0, 5),
            nn.Linear(5, 3),
        )

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + self.e(self.z(h)))


def _of(cls, dtype=torch.float64):
    def make():
        torch.manual_seed(0)
        model = cls()
        return model if cls is _Mixed else model.to(dtype)

    return make


STRUCTURES = {
    "in-place": (_of(_InPlace), {}, {}, True),
    "broadcast": (_of(_Broadcast), {}, {}, True),
    "3d-then-2d": (_of(_Maybe3D), {"seq": [3, None, 2, None, 1]}, {}, True),
    "called-twice": (_of(_Twice), {}, {}, False),
    "no-grad-output": (_of(_NoGradBranch), {}, {}, False),
    "frozen-twice": (
        _of(_FrozenTwice),
        {},
        {"params": ["a.weight", "a.bias", "c.weight", "c.bias"]},
        True,
    ),
    "mixed-dtypes": (_of(_Mixed), {"dtype": torch.float32}, {}, True),
    "zero-width": (_of(_ZeroWidth), {}, {"groups": None}, True),
    "bfloat16": (_mlp(torch.bfloat16), {"dtype": torch.bfloat16}, {}, True),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structures_give_the_same_bits(name):
    make, data, options, runs_lean = STRUCTURES[name]
    data = dict(data)
    dtype = data.pop("dtype", torch.float64)
    hits = _assert_same(make, _batches(dtype, [7, 1, 4, 5, 3], **data), **options)
    assert (True in hits) == runs_lean


def test_reset_resume_and_merge_give_the_same_bits(tmp_path):
    batches = _batches(torch.float32, [7, 1, 4, 5, 3, 6])
    states = {}
    for lean in (True, False):
        model = _mlp(torch.float32)()
        fc = FisherCollector(model, "empirical")
        if not lean:
            fc._lean = None
        for x, y in batches[:3]:
            fc.collect(x, y)
        path = fc.save(tmp_path / f"{lean}.safetensors")
        fc.close()
        resumed = FisherCollector.load(path, model)
        if not lean:
            resumed._lean = None
        for x, y in batches[3:]:
            resumed.collect(x, y)
        other = FisherCollector(_mlp(torch.float32)(), "empirical")
        if not lean:
            other._lean = None
        for x, y in batches:
            other.collect(x, y)
        other.reset()
        for x, y in batches[1:]:
            other.collect(x, y)
        resumed.merge(other)
        resumed.collect(*batches[0])
        states[lean] = _state(resumed)
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[True])


def test_eligibility_refusals():
    make = _mlp()
    assert FisherCollector(make(), "empirical", element_se=True)._lean is None
    assert FisherCollector(make(), "empirical", mode="ema")._lean is None
    assert FisherCollector(make(), "mc")._lean is None
    assert FisherCollector(make(), "batch_grad_sq")._lean is None
    assert FisherCollector(make(), "empirical", "causal_lm", "token")._lean is None

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    assert FisherCollector(Tied(), "empirical")._lean is None
    # a bias without its weight; a family with the weight but not the bias (in_mask=False)
    assert FisherCollector(make(), "empirical", params=["0.bias", "4.weight"])._lean is None
    rows = tuple(range(5))
    fam = GroupFamily("c", "channel", 5, (Member("0.weight", 0, rows, in_mask=False),))
    assert FisherCollector(make(), "empirical", groups=[fam])._lean is None


def test_a_tiny_gpt2_takes_the_general_path():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=4, n_layer=1, n_head=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = FisherCollector(transformers.GPT2LMHeadModel(config).eval(), "empirical", "causal_lm")
    assert fc._lean is None


# ------------------------------------------------------ the direct branch of the forward hook
def _pre_change_hook(self, module, args, kwargs, output):
    """``Engine._forward_hook`` as it was before f141c71 (no direct branch)."""
    if not self._recording or self._replaying:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        raise AssertionError("unreachable in these tests")
    handler = self.handlers[module]
    output, args, kwargs, tensors, broadcast = batch_rows(output, args, kwargs, self.batch_size)
    if not tensors:
        return None
    site = Site(handler, handler.save(args, kwargs, output), id(tensors[0]))
    self.calls[module] += 1
    self.sites.append(site)
    from torch.autograd.graph import get_gradient_edge

    self.edges.append(get_gradient_edge(tensors[0]))
    return output if broadcast else None


class _Positions(nn.Module):
    """Embedding of position ids [1, T] (broadcast), LayerNorm, Conv1d, Linear heads."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.norm, self.conv = nn.LayerNorm(4), nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        h = self.conv(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h).sum(1))


@pytest.mark.parametrize("sizes", [[3, 1, 4], [1, 1]])
def test_the_direct_hook_branch_changes_no_bit(monkeypatch, sizes):
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randint(0, 7, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for n in sizes
    ]
    states = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(Engine, "_forward_hook", _pre_change_hook)
        torch.manual_seed(0)
        fc = FisherCollector(_Positions().double(), "empirical")
        for x, y in batches:
            fc.collect(x, y)
        states.append(_state(fc))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ------------------------------------------------------------------- folds every 32 batches
@pytest.mark.parametrize("batch", [1, 4, 32])
def test_float32_folds_stay_within_the_documented_bound(batch):
    """Exactly known per-sample gradients (zero weights, inputs of ones: g = −y, float32
    representable), 200 float32 batches: F within FOLD_EVERY · 2⁻²⁴ of the float64 truth
    (plus the one rounding of each square)."""
    n_batches = 200
    gen = torch.Generator().manual_seed(7)
    y = 1e3 + 10.0 * torch.randn(n_batches * batch, 2, generator=gen, dtype=torch.float64)
    y = y.float().double()
    model = nn.Linear(3, 2, dtype=torch.float32)
    for p in model.parameters():
        nn.init.zeros_(p)
    fc = FisherCollector(model, "empirical", "regression", groups=None)
    assert fc._lean is not None
    x = torch.ones(n_batches * batch, 3, dtype=torch.float32)
    for i in range(n_batches):
        rows = slice(i * batch, (i + 1) * batch)
        fc.collect(x[rows], y[rows].float())
    truth = y.square().mean(0)
    bound = (pending.FOLD_EVERY + batch + 1) * 2.0**-24
    fisher = fc.fisher()
    assert ((fisher["bias"] - truth).abs() / truth).max() <= bound
    assert ((fisher["weight"] - truth[:, None]).abs() / truth[:, None]).max() <= bound


def test_the_cpu_fold_gives_the_foreach_bits():
    gen = torch.Generator().manual_seed(0)
    sources = [
        torch.rand(s, generator=gen, dtype=torch.float32) * 1e3 for s in ((5, 7), (3,), (0, 4))
    ]
    targets = [torch.rand(s.shape, generator=gen, dtype=torch.float64) for s in sources]
    expected = [t.clone() for t in targets]
    torch._foreach_add_(expected, sources)
    sums = pending.PendingSums()
    sums.buffers = {i: s.clone() for i, s in enumerate(sources)}
    sums.batches = 1
    sums.fold(dict(enumerate(targets)))
    assert all(torch.equal(a, b) for a, b in zip(targets, expected, strict=True))
    assert all(not b.any() for b in sums.buffers.values())
