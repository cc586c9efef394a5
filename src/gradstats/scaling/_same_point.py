r"""The ``same_point`` statistic: noise at a fixed θ from micro-batches or DDP ranks of one step.

Two-batch estimator (McCandlish et al. 2018). In one optimizer step, K small-batch gradients g_k
(each micro-batch backward, on each rank) average to the applied big-batch gradient g_b. With
A = mean_k ‖g_k‖² and B = ‖g_b‖², per parameter tensor:

    noise   N = (A − B) / (K − 1)        E[N] = tr Cov(g_b) = tr Σ / B_big
    signal  D = (K·B − A) / (K − 1)      E[D] = ‖G‖²

which are the spec's tr Σ ≈ (‖g_s‖² − ‖g_b‖²)/(1/B_s − 1/B_b) and
‖G‖² ≈ (B_b‖g_b‖² − B_s‖g_s‖²)/(B_b − B_s) with B_b = K·B_s. Golden: E‖g_s‖² = 9,
E‖g_b‖² = 2, B_s = 8, B_b = 64 → ‖G‖² = 1, tr Σ = 64, B_simple = tr Σ/‖G‖² = 64.
Both are unbiased at every step; numerator and denominator are smoothed by separate debiased
EMAs and ρ = EMA(N)/EMA(D) (never an EMA of ratios).

The g_k come for free: a hook on every parameter sees each backward's gradient contribution h
before it is accumulated into ``.grad`` (and, under DDP, before the all-reduce); it is counted
only once a post-accumulate hook confirms that it reached ``.grad``, so ``torch.autograd.grad``
calls (gradient penalties, per-sample probes) never enter the statistic. If a rank runs
M backward passes per step, g_k = M·h (so that the mean of the g_k over ranks and passes is the
reduced ``.grad``), whatever the loss scaling. Under DDP one small all-reduce per step sums the
per-tensor Σ‖h‖² and pass counts over ranks (ranks must run the same number of passes). With
AMP the hooks see gradients multiplied by the loss scale S, so A is divided by S².
"""

from __future__ import annotations

import torch

from gradstats._warnings import warn
from gradstats.moments import ema_reliability, ema_step_size
from gradstats.moments._distributed import all_reduce_sum_
from gradstats.scaling._host_update import on_host, update_on_host
from gradstats.scaling._kernels import squared_norms
from gradstats.scaling._state import ScalarTensorState, Totals

__all__ = ["STARVED_UPDATES", "SamePointState", "two_batch_estimates"]

# Updates in a row without micro-batches after which the scaler warns (once per scaler).
STARVED_UPDATES = 20


def two_batch_estimates(
    small_sq: torch.Tensor, big_sq: torch.Tensor, passes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, signal) = ((A − B)/(K − 1), (K·B − A)/(K − 1)) for A = ``small_sq`` = mean_k ‖g_k‖²,
    B = ``big_sq`` = ‖mean_k g_k‖² and K = ``passes`` >= 2 (elementwise)."""
    denom = passes - 1.0
    return (small_sq - big_sq) / denom, (passes * big_sq - small_sq) / denom


class SamePointState(ScalarTensorState):
    """Scalar-per-tensor state of the same-point statistic for the tensors of one device."""

    statistic = "same_point"
    parameter_hooks = True  # fed by the parameter hooks of GradientTracker
    min_count = 1  # every step's estimate is already unbiased
    _KEYS = ("count", "noise_ema", "signal_ema")

    def __init__(
        self, params: list[torch.Tensor], beta: float, distributed: bool, group: object = None
    ) -> None:
        self.beta, self.distributed, self.group = beta, distributed, group
        device = params[0].device if params else torch.device("cpu")
        self.numel = torch.tensor([p.numel() for p in params], dtype=torch.float64, device=device)
        self.count = torch.zeros(len(params), dtype=torch.int64, device=device)
        self.noise_ema = torch.zeros(len(params), dtype=torch.float64, device=device)
        self.signal_ema = torch.zeros_like(self.noise_ema)
        self._sums = torch.zeros_like(self.noise_ema)  # Σ‖h‖² added as device vectors
        self._passes = torch.zeros_like(self.noise_ema)  # and their number (subclasses)
        # contributions committed one by one, summed once per update (no device op per
        # tensor and pass): the tensor of each, its ‖h‖² (a one-element float64 vector)
        self._rows: list[int] = []
        self._values: list[torch.Tensor] = []
        self._staged: list[torch.Tensor | None] = [None] * len(params)  # not yet in .grad
        self._pending = [False] * len(params)
        self._host_passes = [0] * len(params)  # contributions per tensor (host counts)
        self.starved = 0  # consecutive updates whose rank recorded fewer than 2 passes
        self.warned = False  # the missing-micro-batches warning was given
        self.last_passes = torch.zeros_like(self.noise_ema)

    def stage(self, index: int, grad: torch.Tensor) -> None:
        """Tensor-hook body: hold ‖h‖² of one gradient contribution (on the device, no sync)."""
        self._staged[index] = squared_norms([grad.detach()])  # scale-safe, float64
        self._pending[index] = True

    def commit(self, index: int) -> None:
        """Post-accumulate-hook body: the staged contribution reached ``.grad``; count it."""
        if self._pending[index]:
            self._pending[index] = False
            staged = self._staged[index]
            if staged is not None:
                self._rows.append(index)
                self._values.append(staged)
                self._host_passes[index] += 1

    def discard_pending(self) -> None:
        """Forget this step's recorded contributions (the step will not be applied)."""
        self._rows, self._values = [], []
        self._sums = torch.zeros_like(self._sums)
        self._passes = torch.zeros_like(self._passes)
        self._pending = [False] * len(self._pending)
        self._host_passes = [0] * len(self._host_passes)

    def observe(self, index: int, grad: torch.Tensor) -> None:
        """Record one contribution that is known to be part of ``.grad`` (explicit calls)."""
        self.stage(index, grad)
        self.commit(index)

    def update(
        self,
        grads: list[torch.Tensor | None],
        sq_norms: torch.Tensor,
        take: torch.Tensor,
        *,
        grad_inv: torch.Tensor | None = None,
        hook_inv: torch.Tensor | None = None,
    ) -> None:
        """``sq_norms``: unscaled ‖.grad‖²; ``hook_inv``: 1/S if the hooks saw scaled gradients.
        On the CPU (few tensors, one process) the update runs on Python floats with the same
        bits (:mod:`~gradstats.scaling._host_update`)."""
        host = [float(k) for k in self._host_passes]
        sums, local = self._collect()
        self._watch_passes()
        if hook_inv is not None:
            sums = sums * hook_inv.to(device=sums.device, dtype=torch.float64).square()
        if on_host(sums.device, self.distributed, len(host)):
            ema = (self.noise_ema.tolist(), self.signal_ema.tolist())  # sync-ok: CPU state
            new = update_on_host(self.beta, sums, sq_norms, take, host, self.count, ema)
            self.count, self.last_passes = new.count, new.passes
            self.noise_ema, self.signal_ema = new.ema.unbind(0)
            return
        total_sums, passes = sums, local
        if self.distributed:
            total_sums, passes = all_reduce_sum_([sums, local], self.group)
        self.last_passes = passes
        small = local.square() * total_sums / passes.clamp(min=1.0)  # mean_k ‖M h‖²
        noise, signal = two_batch_estimates(small, sq_norms, passes)
        valid = take & (passes >= 2) & torch.isfinite(noise) & torch.isfinite(signal)
        self.count = self.count + valid.to(torch.int64)
        step = torch.where(valid, ema_step_size(self.beta, self.count), 0.0)
        self.noise_ema = self.noise_ema + step * (torch.where(valid, noise, 0.0) - self.noise_ema)
        self.signal_ema = self.signal_ema + step * (
            torch.where(valid, signal, 0.0) - self.signal_ema
        )

    def _collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ‖h‖², number of contributions) per tensor of this step, and forget them: two
        index_adds and one small host-to-device copy, however many tensors and passes."""
        sums, passes = self._sums, self._passes
        self._sums, self._passes = torch.zeros_like(sums), torch.zeros_like(passes)
        if self._rows:
            device = sums.device
            rows = torch.tensor(self._rows, dtype=torch.int64).to(device, non_blocking=True)
            ones = torch.ones(len(self._rows), dtype=torch.float64, device=device)
            sums = sums.index_add(0, rows, torch.cat([v.to(device) for v in self._values]))
            passes = passes.index_add(0, rows, ones)
            self._rows, self._values = [], []
        return sums, passes

    def _watch_passes(self) -> None:
        """Warn once when K < 2 for ``STARVED_UPDATES`` updates in a row (host counts only)."""
        passes = max(self._host_passes, default=0)
        self._host_passes = [0] * len(self._host_passes)
        if self.distributed or passes >= 2:  # DDP: the ranks are the small batches
            self.starved = 0
            return
        self.starved += 1
        if self.starved == STARVED_UPDATES and not self.warned:
            self.warned = True
            warn(
                f"statistic='same_point' has had no estimate for {STARVED_UPDATES} updates: "
                f"each step recorded {passes} backward pass(es), but the two-batch estimator "
                "needs the gradients of several micro-batches of one step (gradient "
                "accumulation: call backward() on k >= 2 micro-batches before step(), or "
                "record them with observe()) or DDP ranks; until then the factor stays 1 and "
                "rho is NaN. With one backward per step pass model= (statistic='auto' or "
                "'per_sample': the exact same-point noise of that backward), or use "
                "statistic='temporal' (it also counts parameter drift as noise)",
                RuntimeWarning,
            )

    def totals(self) -> Totals:
        return Totals(
            noise=self.noise_ema,
            signal=self.signal_ema,
            count=self.count,
            variance=self.noise_ema,
            signal_raw=self.signal_ema,
            reliability=ema_reliability(self.beta, self.count),
        )
