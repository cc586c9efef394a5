"""Obviously-correct references for ``gradstats.eqprop``: dense float64 solves and closed forms.

* :func:`dense_jacobian`, :func:`newton_fixed_point`: the whole (flattened) Jacobian and Newton's
  method with dense solves — no relaxation, no VJP tricks.
* :func:`reference_implicit_gradient`: z* by Newton; then the gradient of L at the "phantom
  Newton step" z_θ = z* − J⁻¹F(z*; inject(x; θ), θ) (J held fixed), whose derivative is the
  implicit-function-theorem derivative dz*/dθ = −J⁻¹ ∂F/∂θ exactly at the fixed point. It shares
  no code with the library's adjoint solve or gradient assembly.
* :func:`finite_difference_gradient`: central differences, one parameter entry at a time.
* :func:`reference_spectral_penalty`: ½ mean_b σ_max(J_b)² from each sample's dense Jacobian
  and its SVD (differentiable w.r.t. the parameters).
* :class:`LinearClosedForm`: every quantity of spec §6 for F(z) = Az + Bx, L = ½‖Cz − y‖².
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from gradstats.errors import DivergenceError

__all__ = [
    "LinearClosedForm",
    "dense_jacobian",
    "finite_difference_gradient",
    "newton_fixed_point",
    "reference_implicit_gradient",
    "reference_spectral_penalty",
]


def dense_jacobian(
    fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """∂vec(fn(z))/∂vec(z) as a dense ``[N, N]`` matrix (N = z.numel()); ``create_graph``: keep
    it differentiable w.r.t. what ``fn`` closes over (e.g. the parameters)."""

    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.reshape(z.shape)).reshape(-1)

    return torch.autograd.functional.jacobian(
        flat, z.detach().reshape(-1), create_graph=create_graph
    )


def _with_input(
    force: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    return force(z, x)


def reference_spectral_penalty(
    force: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_in: torch.Tensor,
    z: torch.Tensor,
    bound: float = 0.0,
) -> torch.Tensor:
    """½ mean_b max(0, σ_max(J_b)² − ``bound``²) (``bound`` 0: ½ mean_b σ_max(J_b)²).

    J_b = ∂force(z_b, x_b)/∂z_b is the dense Jacobian of sample b alone
    (rows b of ``z`` and of the injection ``x_in``), σ_max from
    ``torch.linalg.matrix_norm(ord=2)``; built with ``create_graph``, so it can be
    differentiated w.r.t. the parameters ``force`` uses (and ``x_in``)."""
    z = z.detach()
    total = z.new_zeros(())
    for b in range(z.shape[0]):
        jac = dense_jacobian(functools.partial(_with_input, force, x_in[b : b + 1]), z[b : b + 1],
                             create_graph=True)  # fmt: skip
        total = total + (torch.linalg.matrix_norm(jac, ord=2) ** 2 - bound**2).clamp_min(0)
    return 0.5 * total / z.shape[0]


def newton_fixed_point(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    tol: float = 1e-13,
    max_iter: int = 100,
) -> torch.Tensor:
    """Solve fn(z) = 0 by Newton's method with dense Jacobians (float64 recommended).

    Raises:
        DivergenceError: no convergence (a ``RuntimeError``) to ‖fn(z)‖ ≤ tol·max(1, ‖z‖)
            within ``max_iter``.
    """
    z = z0.detach().clone()
    for _ in range(max_iter):
        with torch.no_grad():
            f = fn(z)
        if f.norm() <= tol * max(1.0, float(z.norm())):
            return z
        jac = dense_jacobian(fn, z)
        z = z - torch.linalg.solve(jac, f.reshape(-1)).reshape(z.shape)
    raise DivergenceError(f"Newton did not converge in {max_iter} iterations", step=max_iter)


def reference_implicit_gradient(model, x: torch.Tensor, y: torch.Tensor, noise=None) -> dict:
    """dL(z*(θ))/dθ of an ``EquilibriumModule`` from dense solves.

    Returns:
        ``{"grads": {name: tensor}, "state": z*, "adjoint": λ, "jacobian": J}`` with
        λ = −J⁻ᵀℓ from a dense solve and J the dense ``[N, N]`` Jacobian at z*.
    """

    def force(z, x_in):
        return model.force(z, x_in) if noise is None else model.force(z, x_in, noise=noise)

    with torch.no_grad():
        x_in0 = model.inject(x)
        z0 = model.init_state(x_in0)
    z_star = newton_fixed_point(lambda z: force(z, x_in0), z0)
    jac = dense_jacobian(lambda z: force(z, x_in0), z_star)
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in pairs], [p for _, p in pairs]
    with torch.enable_grad():
        x_in = model.inject(x)
        f = force(z_star, x_in).reshape(-1)
        z_theta = z_star.reshape(-1) - torch.linalg.solve(jac, f)
        loss = model.loss(z_theta.reshape(z_star.shape), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        zz = z_star.clone().requires_grad_(True)
        (ell,) = torch.autograd.grad(model.loss(zz, y), zz)
    lam = -torch.linalg.solve(jac.T, ell.reshape(-1)).reshape(z_star.shape)
    return {
        "grads": {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, grads, strict=True)
        },
        "state": z_star,
        "adjoint": lam,
        "jacobian": jac,
    }


def finite_difference_gradient(
    fn: Callable[[], torch.Tensor], params: dict[str, torch.Tensor], h: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Central differences (fn(θ + h e_i) − fn(θ − h e_i))/(2h) for every parameter entry."""
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            grad = torch.zeros_like(p)
            flat, gflat = p.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                plus = float(fn())
                flat[i] = old - h
                minus = float(fn())
                flat[i] = old
                gflat[i] = (plus - minus) / (2 * h)
            out[name] = grad
    return out


class LinearClosedForm:
    """Closed forms for F(z) = Az + Bx, L = ½ Σ_b ‖Cz_b − y_b‖² (rows are samples).

    H = CᵀC, ℓ = Cᵀ(Cz* − y), z* = −A⁻¹Bx, λ = −A⁻ᵀℓ, P = A⁻ᵀH.
    """

    def __init__(self, A, B, C, x, y) -> None:
        self.A, self.B, self.C = (t.detach().double() for t in (A, B, C))
        self.x, self.y = x.double(), y.double()
        self.H = self.C.T @ self.C
        self.n = self.A.shape[0]
        self.z_star = torch.linalg.solve(self.A, -(self.B @ self.x.T)).T
        self.ell = (self.z_star @ self.C.T - self.y) @ self.C
        self.lam = self._solve(self.A.T, -self.ell)

    @classmethod
    def of(cls, model, x, y) -> LinearClosedForm:
        """From a :class:`gradstats.eqprop.models.LinearModel`."""
        return cls(model.A, model.B, model.C, x, y)

    @staticmethod
    def _solve(m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(m, rows.T).T

    def grads(self, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """dL/dA = Σ aᵀ... with a = λ (exact) or any adjoint estimate: {A: aᵀz*, B: aᵀx, C}."""
        a = self.lam if a is None else a
        resid = self.z_star @ self.C.T - self.y
        return {"A": a.T @ self.z_star, "B": a.T @ self.x, "C": resid.T @ self.z_star}

    def ep_limit(self) -> torch.Tensor:
        """Plain EP as β → 0: −A⁻¹ℓ (= λ iff A is symmetric)."""
        return self._solve(self.A, -self.ell)

    def ep(self, beta: float) -> torch.Tensor:
        """One-sided EP: −(A − βH)⁻¹ℓ."""
        return self._solve(self.A - beta * self.H, -self.ell)

    def ep_symmetric(self, beta: float) -> torch.Tensor:
        """Symmetric EP: −½[(A + βH)⁻¹ + (A − βH)⁻¹]ℓ."""
        return 0.5 * (self._solve(self.A + beta * self.H, -self.ell) + self.ep(beta))

    def aep(self, beta: float) -> torch.Tensor:
        """AEP: −½[(Aᵀ + βH)⁻¹ + (Aᵀ − βH)⁻¹]ℓ = λ + O(β²)."""
        at = self.A.T
        return 0.5 * (
            self._solve(at + beta * self.H, -self.ell) + self._solve(at - beta * self.H, -self.ell)
        )

    def holomorphic_aep(self, radius: float, points: int) -> torch.Tensor:
        """Holomorphic AEP with N points: (I − r^N P^N)⁻¹λ, P = A⁻ᵀH."""
        p = torch.linalg.solve(self.A.T, self.H)
        m = torch.eye(self.n, dtype=p.dtype) - radius**points * torch.linalg.matrix_power(p, points)
        return self._solve(m, self.lam)

    def holomorphic_ep(self, radius: float, points: int) -> torch.Tensor:
        """Holomorphic plain EP: −(I − r^N Q^N)⁻¹A⁻¹ℓ, Q = A⁻¹H."""
        q = torch.linalg.solve(self.A, self.H)
        m = torch.eye(self.n, dtype=q.dtype) - radius**points * torch.linalg.matrix_power(q, points)
        return self._solve(m, self.ep_limit())

    def analyticity_radius(self) -> float:
        """R = 1/ρ(P): the radius of convergence of β ↦ z_β for the corrected dynamics."""
        p = torch.linalg.solve(self.A.T, self.H)
        return float(1.0 / torch.linalg.eigvals(p).abs().max())

    def aep_finite(self, beta: float, step_size: float, steps: int) -> torch.Tensor:
        """AEP (fixed anchor) after exactly T2 relaxation steps from z*, exact in β.

        δ±_T = ±β (Aᵀ ∓ βH)⁻¹ (I − M±^T) ℓ with M± = I + ε(Aᵀ ∓ βH); a_T = (δ₋ − δ₊)/(2β).
        """
        eye = torch.eye(self.n, dtype=self.A.dtype)

        def delta(sign: float) -> torch.Tensor:
            k = self.A.T - sign * beta * self.H
            m = torch.linalg.matrix_power(eye + step_size * k, steps)
            return sign * beta * self._solve(k, self.ell @ (eye - m).T)

        return (delta(-1.0) - delta(1.0)) / (2 * beta)

    def truncation_limit(self, step_size: float, steps: int) -> torch.Tensor:
        """The β → 0 limit of :meth:`aep_finite`: λ − (I + εAᵀ)^T λ."""
        eye = torch.eye(self.n, dtype=self.A.dtype)
        m = torch.linalg.matrix_power(eye + step_size * self.A.T, steps)
        return self.lam - self.lam @ m.T
