r"""The same-point EMA update on Python floats, for state that lives on the CPU.

On the CPU reading a tensor waits for nothing, and the update of a few dozen per-tensor scalars
costs more in ~25 small tensor ops (5–20 µs each right after a backward) than in Python. This
is :meth:`~gradstats.scaling._same_point.SamePointState.update`'s arithmetic, per tensor j with
K_j contributions, Σ_j their Σ‖h‖², B_j = ‖ĝ_j‖² and the step's ``take`` flag:

    A = K²Σ / max(K, 1),   noise = (A − B)/(K − 1),   signal = (K·B − A)/(K − 1),
    valid = take ∧ K ≥ 2 ∧ both finite,   t ← t + valid,   a = valid ? a_t : 0,
    ema ← ema + a·(where(valid, estimate, 0) − ema)

in the same order, on IEEE doubles (the same correctly rounded +, −, ×, ÷ as torch's float64
kernels), with a_t from :func:`~gradstats.moments.ema_step_sizes` (torch's own ``pow`` on the
new count tensor), so the result has the tensor path's bits (pinned by tests). Beyond
``HOST_UPDATE_MAX`` tensors the Python loop is the slower one (measured, one thread: 8 tensors
145 vs 254 µs, 200 tensors 482 vs 406 µs per update), and the tensor path runs.
"""

from __future__ import annotations

import math

import torch

from gradstats.moments import ema_step_sizes

__all__ = ["HOST_UPDATE_MAX", "HostUpdate", "on_host", "update_on_host"]

HOST_UPDATE_MAX = 128


def on_host(device: torch.device, distributed: bool, n: int) -> bool:
    """Whether an update of ``n`` tensors' state on ``device`` takes the host path."""
    return (
        device.type == "cpu"
        and not distributed
        and n <= HOST_UPDATE_MAX
        and not torch.compiler.is_compiling()
    )


class HostUpdate:
    """The new ``count`` (int64 [n]), ``ema`` ([noise; signal], float64 [2, n]) and
    ``passes`` (K as float64 [n]) of one update, on the state's device."""

    __slots__ = ("count", "ema", "passes")

    def __init__(self, count: torch.Tensor, ema: torch.Tensor, passes: torch.Tensor) -> None:
        self.count, self.ema, self.passes = count, ema, passes


def update_on_host(
    beta: float,
    sums: torch.Tensor,
    sq_norms: torch.Tensor,
    take: torch.Tensor,
    passes: list[float],
    count: torch.Tensor,
    ema: tuple[list[float], list[float]],
) -> HostUpdate:
    """One update (see the module docstring): ``sums`` Σ‖h‖² per tensor, ``sq_norms`` ‖ĝ‖²,
    ``take`` the step's flags, ``passes`` the host counts K, ``count`` the EMA counts and
    ``ema`` the current (noise, signal) EMAs as host lists."""
    total, sq, ok = sums.tolist(), sq_norms.tolist(), take.tolist()  # sync-ok: CPU state
    isfinite = math.isfinite
    estimates: list[tuple[float, float] | None] = []
    for t, b, good, k in zip(total, sq, ok, passes, strict=True):
        if good and k >= 2.0:
            small = k * k * t / k  # K²Σ/max(K, 1), in the tensor path's order
            noise, signal = (small - b) / (k - 1.0), (k * b - small) / (k - 1.0)
            if isfinite(noise) and isfinite(signal):
                estimates.append((noise, signal))
                continue
        estimates.append(None)
    before = count.tolist()  # sync-ok: CPU state
    counts = [c + (e is not None) for c, e in zip(before, estimates, strict=True)]
    device = count.device
    new_count = torch.tensor(counts, dtype=count.dtype, device=device)
    noise_ema, signal_ema = ema
    noise_row, signal_row = [], []
    for estimate, step, m, s in zip(
        estimates, ema_step_sizes(beta, new_count), noise_ema, signal_ema, strict=True
    ):  # ema + step·(where(valid, estimate, 0) − ema)
        x, y = estimate or (0.0, 0.0)
        if estimate is None:
            step = 0.0
        noise_row.append(m + step * (x - m))
        signal_row.append(s + step * (y - s))
    # the new EMAs and the counts K in one host-to-device copy
    known = torch.tensor([noise_row, signal_row, passes], dtype=torch.float64, device=device)
    return HostUpdate(new_count, known[:2], known[2])
