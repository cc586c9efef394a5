"""The error family, the non-finite policy check, and warnings attributed to the user's line."""

import warnings
from pathlib import Path

import pytest

import gradstats
from gradstats import errors
from gradstats._validation import check_choice, check_positive_int, check_state_header
from gradstats._warnings import deprecated_alias, warn


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigurationError, ValueError),
        (errors.ConfigurationTypeError, TypeError),
        (errors.ConfigurationTypeError, ValueError),
        (errors.StateError, ValueError),
        (errors.DivergenceError, RuntimeError),
        (errors.NonFiniteError, FloatingPointError),
    ],
)
def test_each_error_is_a_gradstats_error_and_its_builtin(cls, builtin):
    assert issubclass(cls, errors.GradstatsError)
    assert issubclass(cls, builtin)


def test_the_family_is_reexported_at_the_top_level():
    for name in ("GradstatsError", "ConfigurationError", "StateError", "DivergenceError"):
        assert getattr(gradstats, name) is getattr(errors, name)


def test_divergence_error_carries_where_it_happened():
    error = errors.DivergenceError("boom", phase="free", step=3, samples=[1])
    assert (error.phase, error.step, error.samples) == ("free", 3, [1])
    assert errors.DivergenceError("boom").samples == []


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_check_nonfinite_accepts_the_two_policies(policy):
    assert errors.check_nonfinite("nonfinite", policy) == policy


@pytest.mark.parametrize("bad", ["warn", "", None, 1])
def test_check_nonfinite_names_the_valid_values(bad):
    with pytest.raises(errors.ConfigurationError, match="nonfinite must be one of 'skip', 'raise'"):
        errors.check_nonfinite("nonfinite", bad)


def test_validation_helpers_raise_the_family():
    with pytest.raises(errors.ConfigurationError, match="mode must be one of 'a'"):
        check_choice("mode", "b", ("a",))
    with pytest.raises(errors.ConfigurationTypeError, match="steps must be an int"):
        check_positive_int("steps", 1.5)
    with pytest.raises(errors.StateError, match="not a x state dict"):
        check_state_header({"format": "y"}, "x", 1)


def test_warn_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn("look here")  # this line
    assert caught[0].filename == __file__
    source = Path(__file__).read_text().splitlines()
    assert "warn(" in source[caught[0].lineno - 1]


def test_deprecated_alias_forwards_and_warns():
    with pytest.warns(FutureWarning, match="old= is deprecated; use new="):
        assert deprecated_alias("old", "new", "x", None, "default") == "x"


@pytest.mark.parametrize(("given", "expected"), [("y", "y"), (None, "default")])
def test_deprecated_alias_without_the_old_name(given, expected):
    assert deprecated_alias("old", "new", None, given, "default") == expected


@pytest.mark.parametrize("new_value", ["y", "default"], ids=["different", "equal-to-default"])
def test_deprecated_alias_refuses_both_names(new_value):
    with pytest.raises(errors.ConfigurationError, match="not both"):
        deprecated_alias("old", "new", "x", new_value, "default")
