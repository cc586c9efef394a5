"""Jacobian products with the conventions EP needs: Jᵀu (not Jᴴu) and Jv at a fixed point.

PyTorch's reverse mode returns the *conjugate* transpose for complex inputs: for a holomorphic
f with f'(z) = a, ``torch.autograd.grad(f(z), z, v)`` is conj(a)·v. Equilibrium propagation on
complex states needs the plain transpose, Jᵀu = conj(Jᴴ conj(u)), which :func:`transpose_vjp`
returns for real and complex inputs alike.

:class:`Linearization` keeps one evaluation of F at a point and answers Jᵀu and Jv there as often
as needed (the AEP correction needs both every step), always for the *same* force closure — and
so for the same noise realisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gradstats.errors import ConfigurationError

__all__ = ["Linearization", "per_sample_norm", "transpose_vjp"]


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over every dimension but the first (modulus for complex): ``[B]``."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _tdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


def transpose_vjp(
    fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Jᵀu for J = ∂fn/∂z at ``z``, real or complex (holomorphic ``fn``).

    For real ``z`` this is the ordinary VJP. For complex ``z`` PyTorch's VJP returns Jᴴu; we
    return conj(Jᴴ conj(u)) = Jᵀu, the transpose that equilibrium propagation needs.

    Example:
        >>> a = torch.tensor(2 + 3j, dtype=torch.complex128)
        >>> z = torch.tensor(1 + 1j, dtype=torch.complex128)
        >>> transpose_vjp(lambda t: a * t, z, torch.ones_like(z))
        tensor(2.+3.j, dtype=torch.complex128)
    """
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        out = fn(z)
        if z.is_complex():
            (g,) = torch.autograd.grad(out, z, u.conj())
            return g.conj()
        (g,) = torch.autograd.grad(out, z, u)
    return g


class Linearization:
    """F and its Jacobian J at a fixed point ``point``: Jᵀu, Jv and (J − Jᵀ)v on demand.

    One forward pass at ``point`` is kept (with its graph); each product is then one backward
    (Jᵀu) or one double backward (Jv, ``jvp_mode="reverse"``: Jv = ∂(Jᵀw)/∂w · v). With
    ``jvp_mode="forward"``, Jv uses ``torch.func.jvp`` (one forward-mode pass each call).

    A real point accepts complex vectors: J is real there, so Jv = J Re v + i J Im v.

    Args:
        fn: the force closure z ↦ F(z) (carrying its input and noise realisation).
        point: where to linearise (detached).
        jvp_mode: ``"reverse"`` or ``"forward"``.
        create_graph: keep the products differentiable w.r.t. parameters (penalties).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        point: torch.Tensor,
        jvp_mode: str = "reverse",
        create_graph: bool = False,
    ) -> None:
        if jvp_mode not in ("reverse", "forward"):
            raise ConfigurationError(
                f"jvp_mode must be one of 'reverse', 'forward'; got {jvp_mode!r}"
            )
        self.fn, self.jvp_mode, self.create_graph = fn, jvp_mode, create_graph
        self.point = point.detach()
        with torch.enable_grad():
            self._z = self.point.clone().requires_grad_(True)
            self.value = fn(self._z)
        self._w: torch.Tensor | None = None
        self._jtw: torch.Tensor | None = None

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Within the block the products are not differentiable w.r.t. the parameters (no
        graph is kept even if ``create_graph``): for iterations whose result is detached."""
        keep, self.create_graph = self.create_graph, False
        try:
            yield
        finally:
            self.create_graph = keep

    @property
    def complex_point(self) -> bool:
        return self.point.is_complex()

    def _split(self, v: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]):
        if v.is_complex() and not self.complex_point:
            return torch.complex(op(v.real.contiguous()), op(v.imag.contiguous()))
        return op(v)

    def _vjp_raw(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if self.complex_point:
                (g,) = torch.autograd.grad(
                    self.value, self._z, u.conj(), retain_graph=True, create_graph=self.create_graph
                )
                return g.conj()
            (g,) = torch.autograd.grad(
                self.value, self._z, u, retain_graph=True, create_graph=self.create_graph
            )
        return g

    def _jvp_raw(self, v: torch.Tensor) -> torch.Tensor:
        if self.jvp_mode == "forward":  # a graph to the parameters only where it is wanted
            with torch.enable_grad() if self.create_graph else torch.no_grad():
                return torch.func.jvp(self.fn, (self.point,), (v,))[1]
        with torch.enable_grad():
            if self._w is None or self._jtw is None:
                self._w = torch.zeros_like(self.value, requires_grad=True)
                (self._jtw,) = torch.autograd.grad(
                    self.value, self._z, self._w, retain_graph=True, create_graph=True
                )
            # w ↦ Jᴴw is linear with adjoint (Jᴴ)ᴴ = J, so its VJP with v is Jv (real or complex).
            (g,) = torch.autograd.grad(
                self._jtw, self._w, v, retain_graph=True, create_graph=self.create_graph
            )
        return g

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀu (plain transpose, also for complex points and vectors)."""
        return self._split(u, self._vjp_raw)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """Jv."""
        return self._split(v, self._jvp_raw)

    def _antisymmetric_raw(self, v: torch.Tensor) -> torch.Tensor:
        # One backward with create_graph gives Jᵀv as a (linear) function of its cotangent w;
        # differentiating that function along v gives Jv: two passes instead of three.
        with torch.enable_grad():
            w = (v.conj() if self.complex_point else v).detach().clone().requires_grad_(True)
            (jtw,) = torch.autograd.grad(
                self.value, self._z, w, retain_graph=True, create_graph=True
            )
            (jv,) = torch.autograd.grad(
                jtw, w, v, retain_graph=True, create_graph=self.create_graph
            )
        jtv = jtw.conj() if self.complex_point else jtw
        return jv - (jtv if self.create_graph else jtv.detach())

    def antisymmetric(self, v: torch.Tensor) -> torch.Tensor:
        """(J − Jᵀ)v: the AEP correction, exact (never clipped or rescaled)."""
        if self.jvp_mode == "forward":
            return self.jvp(v) - self.vjp(v)
        return self._split(v, self._antisymmetric_raw)

    def adjointness_gap(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """⟨u, Jv⟩ − ⟨Jᵀu, v⟩ (zero up to rounding when J and Jᵀ belong to the same force)."""
        return _tdot(u, self.jvp(v)) - _tdot(self.vjp(u), v)
