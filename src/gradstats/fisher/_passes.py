r"""The collector's special passes: the first-batch completeness check, the closed form of the
output layer's exact Fisher, the mistaken ``batch_grad_sq`` estimator, and what the hooks fill
per unit for the group families (:func:`unit_requests`).

* Completeness: on the first batch one extra pass with samples as units checks that the
  hooks' Σ_i g_i equals autograd's gradient for every parameter — a parameter read outside its
  module's forward would otherwise get incomplete per-unit gradients, silently.
* Closed form: when only the output layer (the module producing the logits, called once, its
  parameters used nowhere else and no per-unit group values requested) is collected,
  ``kind="exact"`` is Σ_rows diag(Λ)ᵀ(h²), chunked over the output features (vocabulary), with
  diag(Λ) = p(1 − p) for the softmax and 1 for σ² = 1 Gaussians; cross-position terms vanish in
  expectation because every position's score has mean zero.
* ``batch_grad_sq``: (ḡ_B)² with ḡ_B the batch-mean gradient (observations are batches).
"""

from __future__ import annotations

import torch
from torch.autograd.graph import get_gradient_edge

from gradstats.errors import ConfigurationError
from gradstats.fisher._accumulate import Request, UnitLayout, compute_dtype
from gradstats.fisher._batch import BatchCore
from gradstats.fisher._groups import GroupFamily
from gradstats.fisher._likelihoods import Prepared
from gradstats.fisher._persample import LinearHandler

__all__ = ["SpecialPasses", "unit_requests"]


class SpecialPasses(BatchCore):
    """Mixin of :class:`~gradstats.fisher.FisherCollector` (see the module docstring)."""

    def _check_complete(self, prepared, names, objective, direction) -> None:
        """First batch only: one extra pass with samples as units, in which the hooks' Σ_i g_i
        must equal autograd's gradient for every parameter (one host sync). Catches parameters
        used outside their module's forward, whose per-unit gradients would be incomplete."""
        layout = self._layout(prepared, self._state.device, check=True)
        lin: dict[str, torch.Tensor] = {}
        layout.lin = lin
        grads = self._live_engine.run_pass(
            layout,
            objective=objective,
            output=prepared.output,
            direction=direction,
            param_grads=True,
            retain=True,
        )
        bad = []
        for name, grad in zip(names, grads, strict=True):
            if grad is None or grad.numel() == 0:  # a zero-size parameter has nothing to check
                continue
            grad = grad.detach().to(torch.float64)
            seen = lin.get(name, torch.zeros_like(grad))
            tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(self._dtypes[name], 5e-2)
            scale = grad.abs().max()
            if bool((seen - grad).abs().max() > tol * scale + 1e-30):  # sync-ok: first batch
                bad.append(name)
        if bad:
            owner = {
                n: h.label for h in self._live_engine.handlers.values() for n in h.attrs.values()
            }
            named = ", ".join(f"{n} (module {owner.get(n, '?')!r})" for n in bad[:5])
            raise ConfigurationError(
                f"the per-sample gradients seen by the hooks do not add up to autograd's gradient "
                f"for {named}: either the parameter is used outside its module's forward (e.g. "
                "read directly by a parent module), so its per-sample gradients would be "
                "incomplete — wrap that use in a module — or the module mixes the samples of a "
                "batch (batch statistics), so per-sample gradients are undefined; exclude the "
                "parameter (params=...) or fix the module"
            )
        self._check_pending = False  # only once passed: a failed check is repeated next batch

    def _closed_form_site(self, prepared: Prepared):
        """The output layer's one call when the closed form applies to this batch, else None.

        It applies when the only handler is a Linear called exactly once, whose output is the
        model output, whose parameters are used nowhere else, and for which no per-unit group
        values (``trace``/``mask`` rows) are requested: the closed form yields the Fisher
        numerator only, so per-unit families fall back to label enumeration."""
        engine = self._live_engine
        if prepared.output is None or len(engine.handlers) != 1:
            return None
        ((module, handler),) = engine.handlers.items()
        if not isinstance(handler, LinearHandler) or engine.calls[module] != 1:
            return None
        names = list(handler.attrs.values())
        if any(n in engine.static_multi or engine.requests.get(n) for n in names):
            return None
        output = prepared.output
        sites = [i for i, s in enumerate(engine.sites) if s.handler is handler]
        if len(sites) != 1 or not (isinstance(output, torch.Tensor) and output.requires_grad):
            return None
        # the site's output must *be* the model output (same autograd edge: an id() could be
        # reused by a later tensor once the layer's own output was freed)
        edge, mine = get_gradient_edge(output), engine.edges[sites[0]]
        if edge.node is not mine.node or edge.output_nr != mine.output_nr:
            return None
        return engine.sites[sites[0]]

    def _closed_form_pass(self, prepared: Prepared, layout: UnitLayout, site) -> None:
        """Exact Fisher of the output layer: Σ_rows diag(Λ)ᵀ(h²), chunked over outputs."""
        handler = site.handler
        h = site.saved[0].reshape(-1, site.saved[0].shape[-1])
        cdt = compute_dtype(h)
        h2 = h.to(cdt).square()
        width = prepared.logits.shape[-1]
        step = max(1, min(width, self.chunk_bytes // max(1, 8 * h.shape[0])))
        for start in range(0, width, step):
            cols = slice(start, min(width, start + step))
            lam = self._live_likelihood.output_fisher_diagonal(prepared, cols)
            lam = lam.reshape(-1, lam.shape[-1]).to(cdt)
            if "weight" in handler.attrs:
                handler._add_weight(layout, layout.sq, cols, lam.T @ h2)
            if "bias" in handler.attrs:
                handler._add_rows(layout, layout.sq, handler.attrs["bias"], cols, lam.sum(0))

    def _batch_grad_sq(self, prepared: Prepared) -> None:
        """The mistaken estimator: (ḡ_B)² with ḡ_B the batch-mean gradient."""
        names = list(self._live_engine.selected)
        objective = self._live_likelihood.loss(prepared, prepared.targets)
        grads = torch.autograd.grad(
            objective, list(self._live_engine.selected.values()), allow_unused=True
        )
        device = self._state.device
        n = prepared.n_samples if self.unit == "sample" else prepared.n_tokens
        inv = 1.0 / torch.as_tensor(n, dtype=torch.float64, device=device)
        layout = UnitLayout(self.unit, prepared.n_samples, prepared.token_mask, self.chunk_bytes)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                layout.sq[name] = (grad.detach().to(torch.float64) * inv).square()
        self._finish(prepared, layout, [objective.detach()], {}, draw_weight_sq=1.0)


def unit_requests(families: list[GroupFamily], device: torch.device) -> dict[str, list[Request]]:
    """Parameter name -> what the hooks fill per unit for each family with per-unit values."""
    requests: dict[str, list[Request]] = {}
    for index, fam in enumerate(families):
        for member in fam.members:
            assign = torch.tensor(member.assign, dtype=torch.long, device=device)
            assign = torch.where(assign < 0, fam.size, assign)
            size = len(member.assign) // fam.size if fam.size else 0  # zero-width layer
            contiguous = (
                size > 0
                and size * fam.size == len(member.assign)
                and all(k == j // size for j, k in enumerate(member.assign))
            )
            request = Request(index, member.axis, assign, member.in_mask, size if contiguous else 0)
            requests.setdefault(member.param, []).append(request)
    return requests
