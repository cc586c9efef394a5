"""generate(): the incremental (KV-cached) relaxation equals relaxing the full window; sampling."""

import warnings

import pytest
import torch

from gradstats.eqprop import ConvergenceWarning, relax
from gradstats.eqprop._settings import resolve_settings
from gradstats.eqprop.models import BackpropTransformer, EquilibriumTransformer, generate
from gradstats.eqprop.models._generate import _Backprop, _Equilibrium
from gradstats.errors import ConfigurationError, ConfigurationTypeError, NonFiniteError
from gradstats.testing import assert_state_equal

from ._cases import gen

VOCAB, BLOCK = 11, 12
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
ATOL = {torch.float64: 1e-9, torch.float32: 2e-4}  # logits, for a solve to TOL
MODES = ["thick", "real", "energy", "layered", "layered_fb"]


def model_of(mode="thick", dtype=torch.float64, seed=0, **kw):
    std = 0.03 if mode == "energy" else 0.15  # attention and FFN matter; the map contracts
    if mode == "layered_fb":  # the layered block with its output fed back: an equilibrium
        mode, kw = "layered", {"feedback": 0.5, **kw}
    model = EquilibriumTransformer(
        VOCAB, BLOCK, 16, 2, attn_mode=mode, init_std=std, generator=gen(seed), **kw
    )
    return model.to(dtype)


def baseline_of(layers=2, dtype=torch.float64, seed=0):
    model = BackpropTransformer(VOCAB, BLOCK, 16, 2, n_layers=layers, init_std=0.15,
                                generator=gen(seed))  # fmt: skip
    return model.to(dtype)


def prompt_of(batch, length, seed=5):
    return torch.randint(VOCAB, (batch, length), generator=gen(seed))


def incremental_logits(model, ids, start, settings=None):
    """Logits [B, n - start, V] of positions start..n-1 of ``ids``: the window ids[:, :start]
    relaxed once, then one position at a time against the cache."""
    if isinstance(model, EquilibriumTransformer):
        s = resolve_settings("implicit", model.solver_defaults, model.embed.token.dtype,
                             **(settings or {}))  # fmt: skip
        stepper = _Equilibrium(model, ids.shape[0], s)
    else:
        stepper = _Backprop(model, ids.shape[0])
    with torch.no_grad():
        out = [stepper.window(ids[:, :start])]
        out += [stepper.extend(ids[:, n], n) for n in range(start, ids.shape[1] - 1)]
    return torch.stack(out, 1)


def full_logits(model, ids, tol=None):
    with torch.no_grad():
        if isinstance(model, BackpropTransformer):
            return model(ids)
        z, stats = relax(model, ids, tol=tol, max_steps=5000)
        assert stats.all_converged()
        return model.logits(z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("batch", "start", "length"), [(1, 1, 12), (3, 4, 9), (2, 11, 12)])
def test_incremental_relaxation_equals_the_full_window(dtype, mode, batch, start, length):
    model = model_of(mode, dtype)
    ids = prompt_of(batch, length)
    tol = TOL[dtype]
    ours = incremental_logits(model, ids, start, {"tol": tol, "max_steps": 5000})
    full = full_logits(model, ids[:, :-1], tol)[:, start - 1 :]
    torch.testing.assert_close(ours, full, rtol=0, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
def test_at_the_models_default_tolerance_the_logits_agree_to_ten_times_it(dtype, mode):
    model = model_of(mode, dtype)
    ids = prompt_of(3, BLOCK)
    ours = incremental_logits(model, ids, 3, {"max_steps": 5000})
    full = full_logits(model, ids[:, :-1])[:, 2:]
    tol = resolve_settings("implicit", model.solver_defaults, dtype).tol
    torch.testing.assert_close(ours, full, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [1, 2])
def test_baseline_cache_equals_the_full_forward(dtype, layers):
    model = baseline_of(layers, dtype)
    ids = prompt_of(2, BLOCK)
    ours = incremental_logits(model, ids, 3)
    full = full_logits(model, ids[:, :-1])[:, 2:]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, full, rtol=0, atol=atol)


def naive(model, prompt, tokens, shift=1):
    """Greedy generation that re-relaxes (re-runs) the whole window for every token."""
    ids, keep = prompt, BLOCK - shift + 1
    start = max(0, ids.shape[1] - BLOCK)
    for _ in range(tokens):
        logits = full_logits(model, ids[:, start:], tol=1e-12)[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        if ids.shape[1] - start > BLOCK:
            start = ids.shape[1] - keep
    return ids


@pytest.mark.parametrize("kind", ["equilibrium", "baseline"])
@pytest.mark.parametrize(
    ("length", "tokens", "shift"), [(3, 6, 1), (5, 15, 1), (4, 20, 4), (14, 3, 1)]
)
def test_greedy_generation_equals_re_relaxing_the_window(kind, length, tokens, shift):
    model = model_of() if kind == "equilibrium" else baseline_of()
    prompt = prompt_of(2, length)
    settings = {"tol": 1e-12, "max_steps": 5000} if kind == "equilibrium" else {}
    ours = generate(model, prompt, tokens, temperature=0, window_shift=shift, **settings)
    assert torch.equal(ours, naive(model, prompt, tokens, shift))


def test_a_one_dimensional_prompt_gives_one_sequence():
    model = model_of()
    out = generate(model, torch.tensor([1, 2, 3]), 5, temperature=0)
    assert out.shape == (8,)
    assert out[:3].tolist() == [1, 2, 3]
    assert torch.equal(out, generate(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)[0])


def test_zero_tokens_returns_the_prompt():
    prompt = prompt_of(2, 4)
    assert torch.equal(generate(model_of(), prompt, 0), prompt)


@pytest.mark.parametrize("kind", ["equilibrium", "baseline"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_with_a_seeded_generator_is_reproducible(kind, top_k):
    model = model_of() if kind == "equilibrium" else baseline_of()
    prompt = prompt_of(2, 3)

    def run(seed):
        return generate(model, prompt, 15, temperature=1.5, top_k=top_k, generator=gen(seed))

    first = run(7)
    assert torch.equal(first, run(7))
    assert not torch.equal(first, run(8))


@pytest.mark.parametrize("greedy", [{"temperature": 0.0}, {"top_k": 1}])
def test_greedy_decoding_is_deterministic_and_draws_nothing(greedy):
    model, prompt = model_of(), prompt_of(2, 3)
    before = torch.random.get_rng_state()
    first = generate(model, prompt, 8, **greedy)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, generate(model, prompt, 8, **greedy))
    assert torch.equal(first, generate(model, prompt, 8, temperature=0))


def test_top_k_restricts_the_draws_to_the_k_most_likely_tokens():
    model = baseline_of()
    prompt = prompt_of(64, 3)
    out = generate(model, prompt, 1, temperature=5.0, top_k=2, generator=gen(3))
    with torch.no_grad():
        top2 = model(prompt)[:, -1].topk(2).indices
    assert (top2 == out[:, -1:]).any(-1).all()


def test_generation_leaves_the_model_unchanged():
    model = model_of()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = generate(model, prompt_of(2, 3), 4, generator=gen(0))
    assert_state_equal(model.state_dict(), before)
    assert model.training
    assert not out.requires_grad


def test_unconverged_relaxations_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model_of(), prompt_of(2, 3), 5, temperature=0, tol=1e-14, max_steps=3)
    ours = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(ours) == 1
    assert "5 of 5 relaxations did not reach tol=1e-14" in str(ours[0].message)
    assert ours[0].filename == __file__


BAD = [
    ({"tokens": -1}, ConfigurationError, "tokens must be"),
    ({"tokens": 2.5}, ConfigurationTypeError, "tokens must be"),
    ({"tokens": True}, ConfigurationTypeError, "tokens must be"),
    ({"temperature": -0.5}, ConfigurationError, "temperature must be a finite float >= 0"),
    ({"temperature": float("nan")}, ConfigurationError, "temperature must be a finite float"),
    ({"temperature": "hot"}, ConfigurationTypeError, "temperature must be a finite float"),
    ({"top_k": 0}, ConfigurationError, "top_k must be"),
    ({"top_k": -3}, ConfigurationError, "top_k must be"),
    ({"top_k": 2.0}, ConfigurationTypeError, "top_k must be"),
    ({"prompt_ids": torch.tensor([[1, VOCAB]])}, ConfigurationError, f"id {VOCAB}, outside"),
    ({"prompt_ids": torch.tensor([[-1, 2]])}, ConfigurationError, "id -1, outside"),
    ({"prompt_ids": torch.tensor([], dtype=torch.int64)}, ConfigurationError, "is empty"),
    ({"prompt_ids": torch.zeros(2, 0, dtype=torch.int64)}, ConfigurationError, "is empty"),
    ({"prompt_ids": torch.zeros(1, 3)}, ConfigurationTypeError, "integer tensor"),
    ({"prompt_ids": torch.zeros(1, 1, 3, dtype=torch.int64)}, ConfigurationTypeError, r"\[T\]"),
    ({"prompt_ids": torch.ones(1, 3, dtype=torch.bool)}, ConfigurationTypeError, "integer"),
    ({"prompt_ids": [1, 2, 3]}, ConfigurationTypeError, "got list"),
    ({"window_shift": 0}, ConfigurationError, "window_shift must be"),
    ({"window_shift": BLOCK + 1}, ConfigurationError, "window_shift must be between 1 and"),
    ({"generator": 3}, ConfigurationTypeError, "generator must be a torch.Generator"),
    ({"tol": -1.0}, ConfigurationError, "tol must be"),
    ({"max_steps": 0}, ConfigurationError, "max_steps must be"),
]


@pytest.mark.parametrize(("change", "error", "match"), BAD)
def test_bad_input_is_a_configuration_error(change, error, match):
    args = {"prompt_ids": prompt_of(2, 3), "tokens": 3, **change}
    prompt, tokens = args.pop("prompt_ids"), args.pop("tokens")
    with pytest.raises(error, match=match) as caught:
        generate(model_of(), prompt, tokens, **args)
    assert isinstance(caught.value, ConfigurationError)


def test_a_model_other_than_the_transformers_is_refused():
    with pytest.raises(ConfigurationTypeError, match="model must be an EquilibriumTransformer"):
        generate(torch.nn.Linear(2, 2), prompt_of(1, 2), 2)  # type: ignore[arg-type]


def test_solver_settings_are_refused_for_the_baseline():
    with pytest.raises(ConfigurationError, match="tol apply only to an EquilibriumTransformer"):
        generate(baseline_of(), prompt_of(1, 2), 2, tol=1e-6)


@pytest.mark.parametrize(("shift", "expected"), [(1, [4, 1, 1, 6, 6, 6]), (3, [4, 1, 1, 4, 1, 1])])
def test_each_token_relaxes_one_position_until_the_window_slides(monkeypatch, shift, expected):
    import gradstats.eqprop.models._generate as module

    widths = []
    solve = module.fixed_point

    def recording(fn, z0, **kw):
        widths.append(z0.shape[1])
        return solve(fn, z0, **kw)

    monkeypatch.setattr(module, "fixed_point", recording)
    model = EquilibriumTransformer(VOCAB, 6, 8, 2, generator=gen(0)).double()
    generate(model, prompt_of(2, 4), 6, temperature=0, window_shift=shift)
    assert widths == expected


@pytest.mark.parametrize("kind", ["equilibrium", "baseline"])
def test_non_finite_weights_are_refused_before_any_compute(kind):
    model = model_of() if kind == "equilibrium" else baseline_of()
    with torch.no_grad():
        model.readout.proj[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite weights \(NaN or inf\) in readout.proj"):
        generate(model, prompt_of(1, 3), 2)


def test_a_tiny_temperature_is_greedy_without_overflow():
    model, prompt = baseline_of(), prompt_of(2, 3)
    tiny = generate(model, prompt, 6, temperature=1e-300, generator=gen(0))
    assert torch.equal(tiny, generate(model, prompt, 6, temperature=0))
