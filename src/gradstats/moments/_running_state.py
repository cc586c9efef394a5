"""``RunningMoments``' state dict: writing it, and reading it back validated (nothing changes
before every key has been checked)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradstats._validation import check_state_header
from gradstats.errors import StateError
from gradstats.moments._checks import renamed_key, state_shape, state_tensor
from gradstats.moments._shift import absolute_mean, is_shifted, split_mean
from gradstats.moments._welford import Moments, scalar_dtype

__all__ = ["read_running_state", "running_state_dict"]

FORMAT = "gradstats.RunningMoments"
VERSION = 1


def running_state_dict(
    state: Moments, shift: torch.Tensor | None, weights: str, skipped: torch.Tensor
) -> dict[str, object]:
    """The state dict of a summary (see :meth:`RunningMoments.state_dict`): copies, and for a
    shifted state the mean rounded to its dtype plus ``mean_residual``."""
    tensors = {key: value.detach().clone() for key, value in state.as_dict().items()}
    dtype = state.mean.dtype
    if shift is not None:
        tensors["mean"], tensors["mean_residual"] = split_mean(
            absolute_mean(state.mean, shift), dtype
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "shape": list(state.mean.shape),
        "weights": weights,
        "dtype": str(dtype).removeprefix("torch."),
        **tensors,
        "skipped": skipped.detach().clone(),
    }


def read_running_state(
    state_dict: Mapping[str, object],
    shape: tuple[int, ...],
    weights: str,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Moments, torch.Tensor | None, torch.Tensor]:
    """(summary, shift or None, skipped) of a validated ``state_dict`` for a ``RunningMoments``
    of ``shape``, ``weights`` and ``dtype`` on ``device`` (new tensors). A float64 state gets
    the mean with its residual added back; a shifted one K = the mean rounded to ``dtype`` and
    m = the rest, so a float64 dict keeps its low part.

    Raises:
        StateError: see :meth:`RunningMoments.load_state_dict`.
    """
    check_state_header(state_dict, FORMAT, VERSION)
    state_shape(state_dict, "RunningMoments", shape)
    if state_dict.get("weights") != weights:
        raise StateError(
            f"state_dict uses weights={state_dict.get('weights')!r} but this RunningMoments "
            f"uses weights={weights!r}"
        )
    counter = renamed_key(state_dict, "skipped", "rejected")
    checked = {
        "count": state_tensor(state_dict, "count", (), nonnegative="a count", whole=True),
        "weight_sum": state_tensor(state_dict, "weight_sum", (), nonnegative="a weight sum"),
        "weight_sq_sum": state_tensor(
            state_dict, "weight_sq_sum", (), nonnegative="a sum of squared weights"
        ),
        "mean": state_tensor(state_dict, "mean", shape),
        "m2": state_tensor(state_dict, "m2", shape, nonnegative="M2 (a sum of squared deviations)"),
    }
    skipped = state_tensor(state_dict, counter, (), nonnegative="a count", whole=True)
    residual = None
    if "mean_residual" in state_dict:
        residual = state_tensor(state_dict, "mean_residual", shape)
    scalar = scalar_dtype(device)
    fields = {
        name: value.to(device, dtype if name in ("mean", "m2") else scalar, copy=True)
        for name, value in checked.items()
    }
    shift = None
    if residual is not None or is_shifted(dtype):  # the mean + what a rounding of it left
        absolute = checked["mean"].to(device, scalar)
        if residual is not None:
            absolute = absolute + residual.to(device, scalar)
        if is_shifted(dtype):  # K = the mean rounded to dtype, m = the rest
            shift, fields["mean"] = split_mean(absolute, dtype)
        else:  # float64: the mean with its residual added back
            fields["mean"] = absolute.to(dtype)
    return Moments(**fields), shift, skipped.to(device=device, dtype=torch.int64, copy=True)
