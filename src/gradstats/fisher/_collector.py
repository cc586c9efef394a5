r"""``FisherCollector``: the diagonal Fisher information from exact per-unit gradients.

Estimands (declared, stored with every result). With per-unit loss l_i = −log p(y_i | x_i),
sum-reduced over the unit's targets, and g_i = ∇_θ l_i:

* ``kind="empirical"``: EF_jj = (1/N) Σ_i g_ij² at the data labels.
* ``kind="mc"``: labels y ~ p_θ(·|x), K = ``mc_samples`` per unit: (1/N) Σ_i (1/K) Σ_k g_ikj²,
  unbiased for the Fisher.
* ``kind="exact"``: the expectation over labels in closed form, (1/N) Σ_i diag(J_iᵀ Λ_i J_i)
  (softmax: Λ = diag(p) − ppᵀ; Gaussian σ² = 1: Λ = I), by label enumeration through the
  network, or by (p(1−p))ᵀ(h²) when only the output layer's parameters are collected.
* ``kind="batch_grad_sq"``: the *mistaken* estimator (1/#batches) Σ_B (ḡ_B)² of the mean-batch
  gradient squared, kept to reproduce it. Its expectation is μ² + σ²/m for batches of m i.i.d.
  units (μ²+ σ²/m · (N−m)/(N−1) for batches drawn without replacement from N units) — it
  depends on the batch size and is never the Fisher. Never a default.

Units: ``unit="sample"`` (a sequence for language models: G_i = Σ_t g_it) or ``unit="token"``
(per-position gradients: exact for the output layer, a labelled *position-wise* approximation
elsewhere, with positions without an active target dropped). Identity: EF = (ḡ)² + Var, reported
as ``signal()``, ``fisher()`` and ``variance()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from gradstats._validation import check_choice, check_open_unit, check_positive_int
from gradstats.errors import (
    ConfigurationError,
    ConfigurationTypeError,
    check_nonfinite,
)
from gradstats.fisher._accumulate import Request
from gradstats.fisher._architectures import build_groups
from gradstats.fisher._engine import Engine
from gradstats.fisher._inputs import batch_size, call_model, select_parameters
from gradstats.fisher._io import load_collector, save_collector
from gradstats.fisher._likelihoods import CallableLikelihood, Prepared, make_likelihood
from gradstats.fisher._passes import SpecialPasses
from gradstats.fisher._spec import KINDS, MODES, UNITS, fingerprint
from gradstats.fisher._streaming import Streaming

__all__ = ["KINDS", "MODES", "UNITS", "FisherCollector", "fingerprint"]

Pass = tuple[torch.Tensor | None, torch.Tensor | None, float]  # objective, direction, weight


class FisherCollector(Streaming, SpecialPasses):
    r"""Collect the diagonal Fisher of ``model`` from exact per-unit gradients.

    ``collect()`` any number of times with any batch sizes gives the result of one call on all
    the data (``mode="cumulative"``). See the module docstring for the estimands.

    Args:
        model: the network. Its output is the logits/prediction tensor, a mapping or
            ``ModelOutput`` with ``logits``, or a tuple whose first element it is.
        kind: ``"empirical"``, ``"mc"``, ``"exact"`` or ``"batch_grad_sq"``.
        likelihood: ``"classification"``, ``"regression"``, ``"causal_lm"``, a
            :class:`~gradstats.fisher.Likelihood`, or a callable ``fn(output, targets)`` returning
            per-unit losses (see ``loss_reduction``).
        unit: ``"sample"`` or ``"token"`` (token likelihoods only).
        mc_samples: K labels drawn per unit for ``kind="mc"``.
        generator: the ``torch.Generator`` (on the model's device) for ``kind="mc"``; default: a
            new one seeded with ``seed``.
        seed: seed of the default generator.
        params: names of the parameters to collect (default: all that require grad).
        groups: ``"auto"`` (architecture registry from ``model.config``; output channels for
            models without a config), ``None``, a :class:`~gradstats.fisher.GroupMap` or a list
            of :class:`~gradstats.fisher.GroupFamily`.
        mode: ``"cumulative"`` (exact sums, mergeable) or ``"ema"`` (debiased EMA of batch means).
        beta: EMA decay for ``mode="ema"``.
        signal: also accumulate the mean gradient (costs the usual weight-gradient GEMMs).
        element_se: also accumulate per-batch sums of g² − c and (g² − c)² about a reference
            c from the batch (Chan-merged, float64) for elementwise standard errors
            (``kind="empirical"``); right for float32 models even at large gradient offsets.
        loss_reduction: for callables returning a scalar: ``"sum"`` or ``"mean"`` over the B
            samples (a mean is undone: the objective is multiplied by B).
        chunk_bytes: memory budget of one chunk of materialised per-unit gradients.
        check_first_batch: on the first batch, check that the hooks' per-unit gradients add up to
            autograd's gradient for every parameter (one host sync) — catches parameters used
            outside their module's forward.
        max_exact_passes: refuse ``kind="exact"`` label enumerations longer than this.
        nonfinite: a batch whose loss or statistics (Σg², Σg⁴, Σg, group rows) are not finite:
            ``"skip"`` (default) drops it on the device, without a host sync, and counts it in
            ``counts["skipped"]`` (reads then warn); ``"raise"`` raises
            :class:`~gradstats.errors.NonFiniteError` before anything is accumulated, at the
            cost of one host read per batch (the batch's finite flag).

    Host syncs per batch (none on the CUDA hot path beyond these): the first batch's
    completeness check (one read); ``collect_loader(until_rel_se=...)`` reads the
    standard errors; ``nonfinite="raise"`` reads the batch's finite flag (one read); the
    ``torch.func`` loop fallback runs Python per sample. Target ranges are checked on CPU
    tensors only, and on the CPU the batch's finite flag is read (free there). Reads
    (``fisher()``, ``group_fisher()``, ...) read two counters each (see
    :mod:`gradstats.fisher._reads`): a collector without data raises a ``StateError`` instead
    of returning NaN, and reads after skipped batches warn.

    Example (per-sample gradients g = [1, −1, 2, 4]: EF = mean g² = 5.5, in any split):
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> _ = torch.nn.init.ones_(model.weight)
        >>> x, y = torch.ones(4, 1), torch.tensor([[0.0], [2.0], [-1.0], [-3.0]])
        >>> fc = FisherCollector(model, "empirical", "regression")
        >>> _ = fc.collect(x[:1], y[:1]).collect(x[1:], y[1:])
        >>> fc.fisher()["weight"].item(), fc.counts["samples"]
        (5.5, 4)
        >>> fc.signal()["weight"].item(), fc.variance()["weight"].item()  # EF = ḡ² + Var
        (2.25, 3.25)
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "empirical",
        likelihood: object = "classification",
        unit: str = "sample",
        *,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        seed: int = 0,
        params: Iterable[str] | None = None,
        groups: object = "auto",
        mode: str = "cumulative",
        beta: float = 0.99,
        signal: bool = True,
        element_se: bool = False,
        loss_reduction: str = "sum",
        chunk_bytes: int = 256 * 2**20,
        check_first_batch: bool = True,
        max_exact_passes: int = 4096,
        nonfinite: str = "skip",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationTypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}"
            )
        kind = check_choice("kind", kind, KINDS)
        lik = make_likelihood(likelihood, loss_reduction)
        if kind not in lik.kinds:
            raise ConfigurationError(
                f"kind={kind!r} is not available for likelihood {lik.name!r} (available: "
                f"{', '.join(lik.kinds)}): a callable likelihood cannot sample or enumerate labels"
            )
        unit = check_choice("unit", unit, UNITS)
        if unit == "token" and not (lik.has_tokens or isinstance(lik, CallableLikelihood)):
            raise ConfigurationError(
                f"unit='token' needs a likelihood with token positions ('causal_lm' or a callable "
                f"returning [B, T] losses); likelihood {lik.name!r} has none"
            )
        mc_samples = check_positive_int("mc_samples", mc_samples)
        if mc_samples != 1 and kind != "mc":
            raise ConfigurationError(f"mc_samples applies to kind='mc' only; got kind={kind!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigurationTypeError(
                f"generator must be a torch.Generator; got {type(generator).__name__}"
            )
        for flag, value in (("signal", signal), ("element_se", element_se)):
            if not isinstance(value, bool):
                raise ConfigurationTypeError(f"{flag} must be True or False; got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationTypeError(f"seed must be an int; got {type(seed).__name__}")
        mode = check_choice("mode", mode, MODES)
        beta = check_open_unit("beta", beta)
        if element_se and (kind != "empirical" or mode != "cumulative"):
            raise ConfigurationError(
                "element_se=True needs kind='empirical' and mode='cumulative' (one backward "
                "pass per batch); group standard errors are available for every kind"
            )
        if kind == "batch_grad_sq" and mode != "cumulative":
            raise ConfigurationError("kind='batch_grad_sq' supports mode='cumulative' only")
        check_positive_int("chunk_bytes", chunk_bytes)
        check_positive_int("max_exact_passes", max_exact_passes)
        self.nonfinite = check_nonfinite("nonfinite", nonfinite)
        if not isinstance(check_first_batch, bool):
            raise ConfigurationTypeError(
                f"check_first_batch must be True or False; got {check_first_batch!r}"
            )
        selected = select_parameters(model, params)
        self.model = model
        self.kind, self.unit, self.mode, self.beta = kind, unit, mode, beta
        self.mc_samples, self.seed = mc_samples, seed
        self.likelihood = lik
        self.collect_signal = signal and kind in ("empirical", "mc")
        self.element_se = element_se
        self.chunk_bytes, self.max_exact_passes = chunk_bytes, max_exact_passes
        self._generator = generator
        self._check_pending = check_first_batch and kind != "batch_grad_sq"
        self._closed_form: bool | None = None
        shapes = {n: tuple(p.shape) for n, p in selected.items()}
        device = next(iter(selected.values())).device
        self.group_map = build_groups(model, {n: p.detach() for n, p in selected.items()}, groups)
        per_unit = kind != "batch_grad_sq"
        self._setup(shapes, device, per_unit)
        self._dtypes = {n: p.dtype for n, p in selected.items()}
        wide = any(p.dtype == torch.float64 for p in selected.values())
        self._compute_dtype = torch.float64 if wide else torch.float32
        self._engine = Engine(model, selected)
        self._engine.set_requests(self._requests(device))

    # ------------------------------------------------------------- plumbing
    def _requests(self, device: torch.device) -> dict[str, list[Request]]:
        requests: dict[str, list[Request]] = {}
        for index, fam in enumerate(self._unit_families):
            for member in fam.members:
                assign = torch.tensor(member.assign, dtype=torch.long, device=device)
                assign = torch.where(assign < 0, fam.size, assign)
                size = len(member.assign) // fam.size if fam.size else 0  # zero-width layer
                contiguous = (
                    size > 0
                    and size * fam.size == len(member.assign)
                    and all(k == j // size for j, k in enumerate(member.assign))
                )
                request = Request(
                    index, member.axis, assign, member.in_mask, size if contiguous else 0
                )
                requests.setdefault(member.param, []).append(request)
        return requests

    def reset(self) -> FisherCollector:
        """Forget every observation (keeps the model hooks, settings and group map)."""
        state = self._state
        self._setup(state.shapes, state.device, self.kind != "batch_grad_sq")
        return self

    def close(self) -> None:
        """Remove the collector's hooks from the model (it can still be read and saved)."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
            self._engine = None

    def __enter__(self) -> FisherCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def handlers(self) -> dict[str, str]:
        """Module name -> per-sample handler (``"linear"``, ``"conv2d"``, ``"vmap"``, ...)."""
        return {} if self._engine is None else self._engine.report()

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    # --------------------------------------------------------------- collect
    def collect(self, inputs: object, targets: torch.Tensor | None = None) -> FisherCollector:
        """Add one batch: ``model(inputs)`` (a tensor, ``**mapping`` or ``*tuple``) scored against
        ``targets`` (optional for ``kind="exact"``/``"mc"``; for ``causal_lm`` the labels
        default to ``input_ids`` with ``attention_mask`` zeros ignored).

        A batch whose loss or statistics are not finite follows ``nonfinite``: ``"skip"`` leaves
        the state unchanged and ``counts["skipped"]`` grows; ``"raise"`` raises
        :class:`~gradstats.errors.NonFiniteError`. Bad input raises before anything changes.

        Raises:
            StateError: a submodule or parameter of the model was replaced after the collector
                was built (its gradients would be left out silently); build a new collector.
        """
        engine, likelihood = self._live_engine, self._live_likelihood
        model = self.model
        if model is None:
            raise ConfigurationError("this collector has no model; pass model= to load()")
        engine.check_attached()  # a submodule replaced since construction: StateError
        record = self.kind != "batch_grad_sq"
        try:
            with torch.enable_grad():
                if record:
                    with engine.recording(batch_size(inputs)):
                        raw = call_model(model, inputs)
                else:
                    raw = call_model(model, inputs)
            prepared = likelihood.prepare(raw, targets, inputs)
            empirical = self.kind in ("empirical", "batch_grad_sq")
            if empirical and prepared.output is not None and prepared.targets is None:
                raise ConfigurationError(f"kind={self.kind!r} needs targets (the data labels)")
            if self.unit == "token" and prepared.token_mask is None:
                raise ConfigurationError(
                    "unit='token' needs per-token losses: the likelihood callable returned "
                    "per-sample losses"
                )
            if self.kind == "batch_grad_sq":
                self._batch_grad_sq(prepared)
            else:
                self._collect(prepared)
        finally:
            engine.release()
        return self

    def _collect(self, prepared: Prepared) -> None:
        engine, likelihood = self._live_engine, self._live_likelihood
        device = self._state.device
        layout = self._layout(prepared, device)
        names = list(engine.selected)
        g_sum: dict[str, torch.Tensor] = {}
        passes: Iterator[Pass]
        ok = torch.ones((), dtype=torch.bool, device=device)
        site = self._closed_form_site(prepared) if self.kind == "exact" else None
        self._closed_form = site is not None if self.kind == "exact" else None
        if site is not None:
            if self._check_pending:  # any direction checks Σ_i g_i (parameters used elsewhere)
                first = next(iter(likelihood.exact_directions(prepared)))
                self._check_complete(prepared, names, None, first)
            self._closed_form_pass(prepared, layout, site)
            count, passes = 0, iter([])
            ok &= torch.isfinite(prepared.logits).all()
        elif self.kind == "exact":
            count = likelihood.exact_passes(prepared)
            if count > self.max_exact_passes:
                raise ConfigurationError(
                    f"kind='exact' needs {count} backward passes for this batch (label "
                    f"enumeration), more than max_exact_passes={self.max_exact_passes}; use "
                    "kind='mc' or collect only the output layer, without per-unit group "
                    "families for it (closed form)"
                )
            passes = ((None, d, 1.0) for d in likelihood.exact_directions(prepared))
            ok &= torch.isfinite(prepared.logits).all()
        elif self.kind == "mc":
            count, gen = self.mc_samples, self._gen(device)
            passes = (
                (likelihood.loss(prepared, likelihood.sample(prepared, gen)), None, 1 / count)
                for _ in range(count)
            )
        else:
            count = 1
            passes = iter([(likelihood.loss(prepared, prepared.targets), None, 1.0)])
        # with token units the mean gradient is summed from the hooks' per-position gradients,
        # so that it covers exactly the positions the Fisher does (prompts and padding dropped)
        from_hooks = self.collect_signal and self.unit == "token"
        for index, (objective, direction, weight) in enumerate(passes):
            root = math.sqrt(weight)
            if objective is not None:
                ok &= torch.isfinite(objective)
                objective = objective * root
            if self._check_pending:
                self._check_complete(prepared, names, objective, direction)
            lin: dict[str, torch.Tensor] = {}
            if from_hooks:
                layout.lin = lin
            grads = engine.run_pass(
                layout,
                objective=objective,
                output=prepared.output,
                direction=direction,
                param_grads=self.collect_signal and not from_hooks,
                retain=index < count - 1,
            )
            if from_hooks:
                grads = [lin.get(name) for name in names]
            if self.collect_signal:
                for name, grad in zip(names, grads, strict=True):
                    if grad is not None:
                        value = grad.detach() if root == 1.0 else grad.detach() * root
                        g_sum[name] = g_sum[name] + value if name in g_sum else value
        layout.lin = None
        self._finish(prepared, layout, ok, g_sum, draw_weight_sq=1.0 / self.mc_samples)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file: float32 Fisher / mean gradient / group traces, the float64
        sufficient statistics, and the spec (kind, likelihood, unit, counts, dtypes, model
        fingerprint) in the metadata. Returns the path."""
        return save_collector(self, path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        *,
        likelihood: object = None,
        device: torch.device | str | None = None,
    ) -> FisherCollector:
        """Read a file written by :meth:`save`.

        Without ``model`` the result can be read, merged and saved; with ``model`` (whose
        parameters must match the file's fingerprint) it keeps collecting. A callable likelihood
        must be passed again as ``likelihood``.

        Raises:
            StateError: the file is not a gradstats Fisher file, is damaged or tampered with
                (bad metadata, impossible statistics such as NaN sums or negative counts), or
                ``model`` is not the model it was collected on. Nothing is loaded (no hooks are
                left on ``model``).
        """
        return load_collector(cls, lambda: cls.__new__(cls), path, model, likelihood, device)
