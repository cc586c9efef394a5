r"""``FisherCollector``: the diagonal Fisher information from exact per-unit gradients.

Estimands (declared, stored with every result; see :mod:`gradstats.fisher._estimands`). With
per-unit loss l_i = −log p(y_i | x_i), sum-reduced over the unit's targets, and g_i = ∇_θ l_i:
``"empirical"`` EF_jj = (1/N) Σ_i g_ij² at the data labels; ``"mc"`` (1/N) Σ_i (1/K) Σ_k g_ikj²
with labels y ~ p_θ(·|x), unbiased for F; ``"exact"`` (1/N) Σ_i diag(J_iᵀ Λ_i J_i), the
expectation over labels in closed form; ``"batch_grad_sq"`` the *mistaken* (1/#batches)
Σ_B (ḡ_B)², with expectation μ² + σ²/m for batches of m i.i.d. units (μ² + σ²/m · (N−m)/(N−1)
without replacement) — never the Fisher, never a default.

Units: ``unit="sample"`` (a sequence for language models: G_i = Σ_t g_it) or ``unit="token"``
(per-position gradients: exact for the output layer, a labelled *position-wise* approximation
elsewhere, with positions without an active target dropped). Identity: EF = (ḡ)² + Var, reported
as ``signal()``, ``fisher()`` and ``variance()``. The statistics live in a
:class:`~gradstats.fisher.FisherResult` (``fc.result``), which :func:`resume` continues.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from gradstats.errors import ConfigurationError, ConfigurationTypeError, StateError
from gradstats.fisher._architectures import build_groups
from gradstats.fisher._engine import Engine
from gradstats.fisher._estimands import Pass
from gradstats.fisher._inputs import batch_size, call_model, select_parameters
from gradstats.fisher._io import same_shapes
from gradstats.fisher._lean import LeanLinearPath
from gradstats.fisher._likelihoods import Likelihood, Prepared
from gradstats.fisher._passes import SpecialPasses, unit_requests
from gradstats.fisher._result import FisherResult, load
from gradstats.fisher._spec import DEFAULT, KINDS, MODES, UNITS, FisherSpec, fingerprint
from gradstats.fisher._streaming import Streaming

__all__ = ["KINDS", "MODES", "UNITS", "FisherCollector", "fingerprint", "resume"]


class FisherCollector(Streaming, SpecialPasses):
    r"""Collect the diagonal Fisher of ``model`` from exact per-unit gradients.

    ``collect()`` any number of times with any batch sizes gives the result of one call on all
    the data (``mode="cumulative"``). See the module docstring for the estimands.

    Args:
        model: the network. Its output is the logits/prediction tensor, a mapping or
            ``ModelOutput`` with ``logits``, or a tuple whose first element it is.
        kind: ``"empirical"`` (default), ``"mc"``, ``"exact"`` or ``"batch_grad_sq"``.
        likelihood: ``"classification"``, ``"regression"``, ``"causal_lm"``, a
            :class:`~gradstats.fisher.Likelihood`, or a callable ``fn(output, targets)`` returning
            per-unit losses (see ``loss_reduction``); default ``"classification"``.
        unit: ``"sample"`` (default) or ``"token"`` (token likelihoods only).
        spec: every option of this list bar ``generator``, ``params`` and ``groups`` at once, as
            a :class:`~gradstats.fisher.FisherSpec` (then pass none of them separately). An
            option not passed takes the ``FisherSpec`` field's default (shown below).
        mc_samples: K labels drawn per unit for ``kind="mc"`` (default 1).
        generator: the ``torch.Generator`` (on the model's device) for ``kind="mc"``; default: a
            new one seeded with ``seed``.
        seed: seed of the default generator (default 0); files store the generator's state.
        params: names of the parameters to collect (default: all that require grad).
        groups: ``"auto"`` (architecture registry from ``model.config``; output channels for
            models without a config), ``None``, a :class:`~gradstats.fisher.GroupMap` or a list
            of :class:`~gradstats.fisher.GroupFamily`.
        mode: ``"cumulative"`` (default: exact sums, mergeable) or ``"ema"`` (debiased EMA).
        beta: EMA decay for ``mode="ema"`` (default 0.99).
        signal: also accumulate the mean gradient (default True: ``"empirical"``, ``"mc"``).
        element_se: also accumulate per-batch sums of g² − c and (g² − c)² about a reference
            c from the batch (Chan-merged, float64) for elementwise standard errors
            (``kind="empirical"``; default False); right for float32 models even at large
            gradient offsets.
        loss_reduction: for callables returning a scalar: ``"sum"`` (default) or ``"mean"``
            over the B samples (a mean is undone: the objective is multiplied by B).
        chunk_bytes: memory budget of one chunk of materialised per-unit gradients (256 MiB).
        check_first_batch: on the first batch, check that the hooks' per-unit gradients add up to
            autograd's gradient for every parameter (one host sync) — catches parameters used
            outside their module's forward (default True).
        max_exact_passes: refuse ``kind="exact"`` label enumerations longer than this (4096).
        nonfinite: a batch whose loss or statistics (Σg², Σg⁴, Σg, group rows) are not finite:
            ``"skip"`` (default) drops it on the device, without a host sync, and counts it in
            ``counts["skipped"]`` (reads then warn); ``"raise"`` raises
            :class:`~gradstats.errors.NonFiniteError` before anything is accumulated, at the
            cost of one host read per batch (the batch's finite flag).

    Host syncs per batch (none on the CUDA hot path beyond these): the first batch's
    completeness check; ``collect_loader(until_rel_se=...)`` reads the standard errors;
    ``nonfinite="raise"`` reads the batch's finite flag; the ``torch.func`` loop fallback.
    Target ranges are checked on CPU tensors only, and on the CPU the finite flag is read. Reads
    (``fisher()``, ``group_fisher()``, ...) read two counters each (see
    :mod:`gradstats.fisher._element_reads`): a collector without data raises a ``StateError``
    instead of returning NaN, and reads after skipped batches warn.

    The statistics and every read belong to ``fc.result``, a
    :class:`~gradstats.fisher.FisherResult` (the collector's reads delegate to it); ``fc.config``
    is the :class:`~gradstats.fisher.FisherSpec`, ``fc.spec()`` the dict stored in files.

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
        kind: str = DEFAULT,
        likelihood: object = DEFAULT,
        unit: str = DEFAULT,
        *,
        spec: FisherSpec | None = None,
        mc_samples: int = DEFAULT,
        generator: torch.Generator | None = None,
        seed: int = DEFAULT,
        params: Iterable[str] | None = None,
        groups: object = "auto",
        mode: str = DEFAULT,
        beta: float = DEFAULT,
        signal: bool = DEFAULT,
        element_se: bool = DEFAULT,
        loss_reduction: str = DEFAULT,
        chunk_bytes: int = DEFAULT,
        check_first_batch: bool = DEFAULT,
        max_exact_passes: int = DEFAULT,
        nonfinite: str = DEFAULT,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationTypeError(
                f"model must be a torch.nn.Module; got {type(model).__name__}"
            )
        given = {k: v for k, v in locals().items() if k in FisherSpec.OPTIONS and v is not DEFAULT}
        if spec is None:
            spec = FisherSpec(**given)  # validated there
        elif not isinstance(spec, FisherSpec):
            raise ConfigurationTypeError(f"spec must be a FisherSpec or None; got {spec!r}")
        elif given:
            raise ConfigurationError(
                f"pass spec= or the options it holds, not both; got spec= and {', '.join(given)}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigurationTypeError(
                f"generator must be a torch.Generator; got {type(generator).__name__}"
            )
        lik = spec.make_likelihood()
        selected = select_parameters(model, params)
        result = FisherResult(
            spec,
            {n: tuple(p.shape) for n, p in selected.items()},
            {n: p.dtype for n, p in selected.items()},
            group_map=build_groups(model, {n: p.detach() for n, p in selected.items()}, groups),
            device=next(iter(selected.values())).device,
        )
        self._start(model, lik, result, Engine(model, selected), generator)

    def _start(
        self,
        model: nn.Module | None,
        likelihood: Likelihood | None,
        result: FisherResult,
        engine: Engine | None,
        generator: torch.Generator | None,
    ) -> None:
        """Bind the collector's parts (the one initialiser of live and read-only collectors)."""
        self.model, self.likelihood, self.result, self._engine = model, likelihood, result, engine
        self._generator = generator
        self._check_pending = result.config.check_first_batch and result.estimand.per_unit
        self._closed_form: bool | None = None
        wide = any(d == torch.float64 for d in result.dtypes.values())
        self._compute_dtype = torch.float64 if wide else torch.float32
        if engine is not None:
            engine.set_requests(unit_requests(self._unit_families, result.device))
        self._lean = None if engine is None else LeanLinearPath.build(self)

    # ------------------------------------------------------------- plumbing
    def reset(self) -> FisherCollector:
        """Forget every observation (keeps the model hooks, settings and group map)."""
        self.result = self.result.empty_like()
        return self

    def close(self) -> None:
        """Remove the collector's hooks from the model (it can still be read and saved)."""
        if self._engine is not None:
            self._engine.close()
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
        if self._generator is None:  # a resumed mc collection continues the saved stream
            fresh = torch.Generator(device=device).manual_seed
            self._generator = self.result.restored_generator(device) or fresh(self.seed)
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
        estimand = self.estimand
        try:
            with torch.enable_grad():
                if estimand.per_unit:
                    with engine.recording(batch_size(inputs)):
                        raw = call_model(model, inputs)
                else:
                    raw = call_model(model, inputs)
            prepared = likelihood.prepare(raw, targets, inputs)
            if estimand.needs_targets and prepared.output is not None and prepared.targets is None:
                raise ConfigurationError(f"kind={self.kind!r} needs targets (the data labels)")
            if self.unit == "token" and prepared.token_mask is None:
                raise ConfigurationError("unit='token' needs per-token losses, not per-sample ones")
            if not estimand.per_unit:
                self._batch_grad_sq(prepared)
            elif self._lean is None or not self._lean.collect(self, prepared):  # same numbers
                self._collect(prepared)
        finally:
            engine.release()
        return self

    def _collect(self, prepared: Prepared) -> None:
        """One batch of per-unit passes: the estimand's (objective, direction, weight) each."""
        engine, likelihood, estimand = self._live_engine, self._live_likelihood, self.estimand
        device = self._state.device
        layout = self._layout(prepared, device)
        names = list(engine.selected)
        g_sum: dict[str, torch.Tensor] = {}
        checks: list[torch.Tensor] = []  # scalars that must be finite for the batch to count
        site = self._closed_form_site(prepared) if estimand.closed_form else None
        self._closed_form = site is not None if estimand.closed_form else None
        if estimand.closed_form:  # label-free: the batch is finite when its logits are
            checks.append(prepared.logits.detach().sum())
        passes: Iterator[Pass]
        if site is not None:
            if self._check_pending:  # any direction checks Σ_i g_i (parameters used elsewhere)
                first = next(iter(likelihood.exact_directions(prepared)))
                self._check_complete(prepared, names, None, first)
            self._closed_form_pass(prepared, layout, site)
            count, passes = 0, iter([])
        else:
            count, passes = estimand.passes(
                likelihood,
                prepared,
                mc_samples=self.mc_samples,
                generator=self._gen(device) if estimand.sampled else None,
                max_passes=self.max_exact_passes,
            )
        # with token units the mean gradient is summed from the hooks' per-position gradients,
        # so that it covers exactly the positions the Fisher does (prompts and padding dropped)
        from_hooks = self.collect_signal and self.unit == "token"
        for index, (objective, direction, weight) in enumerate(passes):
            root = math.sqrt(weight)
            if objective is not None:
                checks.append(objective.detach())
                if root != 1.0:
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
                        value = grad if root == 1.0 else grad * root  # (no graph: no detach)
                        g_sum[name] = g_sum[name] + value if name in g_sum else value
        layout.lin = None
        self._finish(prepared, layout, checks, g_sum, draw_weight_sq=1.0 / self.mc_samples)

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """:meth:`FisherResult.save` (with the mc label generator's state). Returns the path."""
        if self._generator is not None:
            self.result.generator_state = self._generator.get_state()
        return self.result.save(path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        *,
        likelihood: object = None,
        device: torch.device | str | None = None,
    ) -> FisherCollector:
        """Read a file written by :meth:`save` as a collector (``gradstats.fisher.load`` reads it
        as a :class:`~gradstats.fisher.FisherResult`).

        Without ``model`` the collector can be read, merged and saved; with ``model`` (whose
        parameters must match the file's fingerprint) it keeps collecting
        (:func:`~gradstats.fisher.resume`). A callable likelihood must be passed again as
        ``likelihood``.

        Raises:
            StateError: the file is not a gradstats Fisher file, is damaged or tampered with
                (bad metadata, impossible statistics such as NaN sums or negative counts), or
                ``model`` is not the model it was collected on. Nothing is loaded (no hooks are
                left on ``model``).
        """
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigurationTypeError(
                f"model must be a torch.nn.Module or None; got {type(model).__name__}"
            )
        result = load(path, device=device)
        if model is None:
            reader = cls.__new__(cls)  # a collector without model hooks: only _start binds it
            reader._start(None, None, result, None, None)
            return reader
        try:
            return resume(result, model, likelihood=likelihood)
        except StateError as error:
            raise StateError(f"{path}: {error}") from None


def resume(
    result: FisherResult,
    model: nn.Module,
    *,
    likelihood: object = None,
    generator: torch.Generator | None = None,
) -> FisherCollector:
    """A collector on ``model`` that keeps collecting from (a copy of) ``result``.

    Save → :func:`~gradstats.fisher.load` → ``resume`` → collect the rest gives the statistics of
    one uninterrupted collection (float64, exact). ``likelihood``: the callable again, for a
    collection with a callable likelihood. ``generator``: where ``kind="mc"`` continues to draw
    labels (default: the generator state saved with the file, else a new one seeded with the
    spec's ``seed``). ``result`` itself is not changed.

    Raises:
        StateError: ``model`` lacks a parameter of ``result`` (names and shapes: the
            fingerprint), nothing is attached to the model.
        ConfigurationError: a callable likelihood was not passed again.
    """
    if not isinstance(result, FisherResult):
        raise ConfigurationTypeError(f"result must be a FisherResult; got {type(result).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigurationTypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not same_shapes(model, result.shapes):
        raise StateError(
            "the result was collected on a different model: its parameters (names and shapes, "
            f"fingerprint {result.fingerprint}) are not all in this model"
        )
    config = result.config if likelihood is None else result.config.with_likelihood(likelihood)
    fc = FisherCollector(
        model,
        spec=config,
        params=list(result.shapes),
        groups=result.group_map,
        generator=generator,
    )
    try:  # an exact copy onto the collector's device (validated again)
        fc.result.state.load_tensors(result.state.tensors(), "the resumed result")
        fc.result.generator_state = result.generator_state  # (used if generator= is None)
    except BaseException:
        fc.close()
        raise
    return fc
