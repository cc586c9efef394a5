"""Deep comparison of state dicts, for "nothing half-updated" checks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["assert_state_equal"]


def assert_state_equal(actual: object, expected: object, path: str = "state_dict") -> None:
    """Assert that two (nested) state dicts are identical: same keys, same Python values, and
    bitwise-equal tensors of the same dtype, shape and device (NaN equals NaN).

    >>> import torch
    >>> assert_state_equal({"n": torch.tensor(2), "k": [1]}, {"n": torch.tensor(2), "k": [1]})

    Raises:
        AssertionError: naming the first path that differs.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__}, not a tensor"
        same_meta = (actual.dtype, actual.shape, actual.device) == (
            expected.dtype,
            expected.shape,
            expected.device,
        )
        assert same_meta, (
            f"{path}: {actual.dtype}{list(actual.shape)} on {actual.device} != "
            f"{expected.dtype}{list(expected.shape)} on {expected.device}"
        )
        same = torch.equal(actual, expected) or (
            actual.is_floating_point()
            and bool(((actual == expected) | (actual.isnan() & expected.isnan())).all())
        )
        assert same, f"{path}: tensor values differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__}, not a mapping"
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_state_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{path}: {actual!r} != {expected!r}"
        assert len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_state_equal(a, e, f"{path}[{index}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
