"""The linear parameters of the spectral model: template weights and additive polynomials.

For fixed LOSVD parameters the model is linear, ``model = A @ x``. kinjax never lets a
sampler or optimiser wander over ``x``: it is solved for (non-negative least squares,
pPXF's choice), by the optimisers and by the samplers (:func:`profile_loglike`). The
analytic Gaussian marginal (:func:`marginal_loglike`) is kept for comparison.

Everything here is pure JAX, jit- and vmap-compatible. Arrays: ``A`` is
``(n_pix, n_lin)``, ``y``/``weights`` are ``(n_pix,)`` with ``weights = mask / noise``
(zero on masked pixels).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["normal_equations", "qr_reduce", "nnls", "nnls_qr", "lstsq", "solve_linear", "FreeBlock", "free_block",
           "solve_projected", "LinearTerms", "profile_loglike", "marginal_loglike"]


def normal_equations(A, y, weights):
    """Weighted normal equations with column scaling for conditioning.

    Returns
    -------
    gram : (n_lin, n_lin) scaled ``AᵀWA`` (unit diagonal where a column is non-zero)
    rhs : (n_lin,) scaled ``AᵀWy``
    scale : (n_lin,) column norms; the solution of the scaled system divided by
        ``scale`` solves the original one.
    """
    # the Gram of the weighted columns first, then scaled by its diagonal: one pass over
    # the (n_pix, n_lin) matrix instead of three (a third faster on XLA:CPU)
    Aw = A * weights[:, None]
    gram = Aw.T @ Aw
    scale = jnp.sqrt(jnp.diagonal(gram))
    scale = jnp.where(scale > 0, scale, 1.0)
    return gram / jnp.outer(scale, scale), (Aw.T @ (y * weights)) / scale, scale


def _scaled_columns(A, weights):
    """``(W A) / scale`` with unit column norms (zero columns left as they are), and ``scale``."""
    Aw = A * weights[:, None]
    scale = jnp.sqrt(jnp.sum(Aw**2, axis=0))
    scale = jnp.where(scale > 0, scale, 1.0)
    return Aw / scale, scale


def _masked_solve(gram, rhs, passive):
    """Solve the normal equations restricted to the ``passive`` set (zeros elsewhere)."""
    both = passive[:, None] & passive[None, :]
    eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
    m = jnp.where(both, gram, eye)
    # tiny ridge keeps exactly collinear templates solvable; relative to unit diagonal
    m = m + eye * (jnp.finfo(gram.dtype).eps * 1e3)
    # LU rather than Cholesky: on XLA:CPU the float64 Cholesky is ~200x slower here
    z = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(m), jnp.where(passive, rhs, 0.0))
    return jnp.where(passive, z, 0.0)


def nnls(gram, rhs, nonneg, passive=None, max_iter=None):
    """Least squares with some variables constrained to be non-negative (Lawson–Hanson).

    Minimises ``½ xᵀ G x − rᵀ x`` subject to ``x[nonneg] ≥ 0``; free variables (e.g.
    additive polynomial coefficients) are always in the passive set.

    Parameters
    ----------
    gram : (n, n) positive semi-definite matrix (e.g. from :func:`normal_equations`).
    rhs : (n,)
    nonneg : (n,) bool, True for constrained variables.
    passive : (n,) bool, optional
        Warm start: variables expected to be non-zero (e.g. the previous solution's
        support in an outer optimisation loop). Variables whose unconstrained solution
        is negative are dropped first, then the usual active-set iterations follow, so
        the result does not depend on the warm start (only the work does).
    max_iter : int, optional
        Outer iterations (default ``3 n``).

    Returns
    -------
    (n,) solution.

    Notes
    -----
    In single precision use :func:`nnls_qr`: the Gram matrix squares the condition
    number of the design matrix, and for similar templates that exceeds float32's
    precision (E-MILES on NGC 4550: ~1e7 on the active set; a float32 fit through the
    normal equations ended with χ²/DOF 2.9 instead of 1.08).
    """
    n = rhs.shape[0]
    tol = 10 * jnp.finfo(gram.dtype).eps * n * jnp.maximum(1.0, jnp.max(jnp.abs(rhs)))
    return _active_set(lambda p: _masked_solve(gram, rhs, p), lambda x: rhs - gram @ x,
                       n, tol, nonneg, passive, max_iter)


def qr_reduce(A, y, weights):
    """The weighted least-squares problem reduced by a QR factorisation.

    With ``As = (W A) / scale = Q R`` (column-scaled as in :func:`normal_equations`),
    ``||W (A x − y)||² = ||R z − q||² + const`` for ``z = scale · x`` and ``q = Qᵀ W y``:
    the same problem, of size n_lin, without squaring the condition number.

    Returns
    -------
    R : (n_lin, n_lin) upper triangular; q : (n_lin,); scale : (n_lin,)
    """
    As, scale = _scaled_columns(A, weights)
    n = A.shape[1]
    # R of [As | W y] holds R and q = Qᵀ W y without forming Q (XLA:CPU forms Q ~100x
    # slower than it factorises)
    r = jnp.linalg.qr(jnp.concatenate([As, (y * weights)[:, None]], axis=1), mode="r")
    return r[:n, :n], r[:n, n], scale


def _masked_solve_qr(R, q, passive):
    """``argmin ||R z − q||`` over the ``passive`` columns (zeros elsewhere), by QR.

    Each column outside the passive set is replaced by a unit row that pins its
    coefficient to zero; a tiny ridge (100 ε per unit column) keeps exactly collinear
    templates solvable without the squared condition number of the normal equations.
    """
    n = R.shape[1]
    eps = jnp.finfo(R.dtype).eps
    top = jnp.concatenate([jnp.where(passive[None, :], R, 0.0), q[:, None]], axis=1)
    bottom = jnp.concatenate([jnp.diag(jnp.where(passive, 100 * eps, 1.0)).astype(R.dtype),
                              jnp.zeros((n, 1), R.dtype)], axis=1)
    r = jnp.linalg.qr(jnp.concatenate([top, bottom]), mode="r")  # [q; 0] rides along
    z = jax.scipy.linalg.solve_triangular(r[:n, :n], r[:n, n], lower=False)
    return jnp.where(passive, z, 0.0)


def nnls_qr(R, q, nonneg, passive=None, max_iter=None):
    """:func:`nnls` for the QR-reduced problem ``min ||R x − q||`` (:func:`qr_reduce`).

    Same algorithm and arguments as :func:`nnls` (``gram = RᵀR``, ``rhs = Rᵀq``), but
    every solve is a QR least-squares solve, accurate in float32 (the GPU default).
    The stopping tolerance on the gradient is ε ``||q||``, the rounding error of
    ``Rᵀ(q − R x)``: :func:`nnls`'s looser ``10 ε n max|Rᵀq|`` stopped a float32 fit of NGC 4550
    at one template and χ² 1201 instead of five and 352 (adding one of several nearly
    collinear templates has a small gradient but a large gain). Variables that pass this
    tolerance only by rounding are blocked by the safeguard in the active-set loop.
    """
    n = q.shape[0]
    tol = jnp.finfo(q.dtype).eps * jnp.maximum(1.0, jnp.linalg.norm(q))
    return _active_set(lambda p: _masked_solve_qr(R, q, p), lambda x: R.T @ (q - R @ x),
                       n, tol, nonneg, passive, max_iter)


def _active_set(solve, gradient, n, tol, nonneg, passive, max_iter):
    """Lawson–Hanson iterations given ``solve(passive) -> z`` and ``gradient(x) = −∇½χ²``.

    ``tol``: a constrained variable joins the passive set only if its gradient exceeds it.
    """
    max_iter = 3 * n if max_iter is None else max_iter
    passive = ~nonneg if passive is None else (passive | ~nonneg)

    # Phase 1: shrink the warm-start set until its solution is feasible.
    def shrink(state):
        z, passive, it = state
        passive = passive & ~(nonneg & (z <= 0))
        return solve(passive), passive, it + 1

    def shrink_cond(state):
        z, passive, it = state
        return jnp.any(passive & nonneg & (z <= 0)) & (it < n)

    z0 = solve(passive)
    x, passive, _ = jax.lax.while_loop(shrink_cond, shrink, (z0, passive, 0))
    x = jnp.where(passive & nonneg, jnp.maximum(x, 0.0), x)

    # Phase 2: Lawson–Hanson active-set iterations from that feasible point.
    def inner(state):
        x, passive, z, it = state
        bad = passive & nonneg & (z <= 0)
        ratio = jnp.where(bad, x / jnp.where(bad, x - z, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        x = x + alpha * (z - x)
        passive = passive & ~(nonneg & (x <= tol))
        x = jnp.where(passive, x, 0.0)
        return x, passive, solve(passive), it + 1

    def inner_cond(state):
        _, passive, z, it = state
        return jnp.any(passive & nonneg & (z <= 0)) & (it < n)

    # A variable whose gradient exceeds tol only through rounding enters with z_j ≤ 0
    # (impossible in exact arithmetic) and would leave again at once, for ever: such a
    # variable is blocked until another one enters (Lawson & Hanson's safeguard).
    def outer(state):
        x, passive, blocked, it = state
        j = jnp.argmax(jnp.where(nonneg & ~passive & ~blocked, gradient(x), -jnp.inf))
        trial = passive.at[j].set(True)
        z = solve(trial)

        def enter():
            x2, p2, z2, _ = jax.lax.while_loop(inner_cond, inner, (x, trial, z, 0))
            return z2, p2, jnp.zeros_like(blocked)

        x, passive, blocked = jax.lax.cond(z[j] > 0, enter, lambda: (x, passive, blocked.at[j].set(True)))
        return x, passive, blocked, it + 1

    def outer_cond(state):
        x, passive, blocked, it = state
        return jnp.any(nonneg & ~passive & ~blocked & (gradient(x) > tol)) & (it < max_iter)

    x, _, _, _ = jax.lax.while_loop(outer_cond, outer, (x, passive, jnp.zeros_like(passive), 0))
    return x


def lstsq(A, y, weights, use=None):
    """Unconstrained weighted least squares ``argmin ||(A x - y) * weights||`` (n_lin,).

    ``use`` : (n_lin,) bool, optional: solve on these columns only, the others' coefficients
    set to 0 (default: all columns).
    """
    use = jnp.ones(A.shape[1], bool) if use is None else use
    if _single(A):
        R, q, scale = qr_reduce(A, y, weights)
        return _masked_solve_qr(R, q, use) / scale
    gram, rhs, scale = normal_equations(A, y, weights)
    return _masked_solve(gram, rhs, use) / scale


def _single(A) -> bool:
    """True for float32 (or narrower) arrays: solve by QR instead of normal equations.

    Decided when the function is traced. float64 keeps the normal equations (LU of a
    small Gram matrix: faster on CPU, and accurate in double precision).
    """
    return jnp.finfo(A.dtype).bits < 64


def solve_linear(A, y, weights, nonneg, passive=None):
    """Best linear parameters for the model ``A @ x`` (weighted, masked).

    Parameters
    ----------
    A : (n_pix, n_lin) design matrix.
    y : (n_pix,) data.
    weights : (n_pix,) ``mask / noise`` (0 on masked pixels).
    nonneg : (n_lin,) bool, True where ``x`` must be ≥ 0 (template weights).
    passive : (n_lin,) bool, optional
        Warm start for the active set (see :func:`nnls`).

    Returns
    -------
    (n_lin,) solution.
    """
    if _single(A):
        R, q, scale = qr_reduce(A, y, weights)
        solve, active = (lambda: _masked_solve_qr(R, q, jnp.ones_like(nonneg))), (lambda: nnls_qr(R, q, nonneg, passive))
        return jax.lax.cond(~jnp.any(nonneg), solve, active) / scale
    return _solve_gram(*normal_equations(A, y, weights), nonneg, passive)


def _solve_gram(gram, rhs, scale, nonneg, passive):
    """Solution of scaled normal equations (:func:`normal_equations`), NNLS where ``nonneg``."""
    solve, active = (lambda: _masked_solve(gram, rhs, jnp.ones_like(nonneg))), (lambda: nnls(gram, rhs, nonneg, passive))
    return jax.lax.cond(~jnp.any(nonneg), solve, active) / scale


class FreeBlock(NamedTuple):
    """Columns with free coefficients that do not change during a fit, factorised once.

    The additive polynomials are such columns: with ``P * weights[:, None] = q @ r``
    (reduced QR), :func:`solve_projected` solves for them by projection, so that the
    per-step solve only involves the template columns (a pytree).

    q : (n_pix, n_free) orthonormal columns; r : (n_free, n_free) upper triangular.
    """

    q: jax.Array
    r: jax.Array


def free_block(P, weights) -> FreeBlock:
    """:class:`FreeBlock` of the columns ``P`` (n_pix, n_free) under ``weights`` (n_pix,)."""
    q, r = jnp.linalg.qr(P * weights[:, None])
    return FreeBlock(q, r)


def solve_projected(T, y, weights, nonneg, passive, block: FreeBlock):
    """:func:`solve_linear` of ``A = [T, P]`` when ``P``'s coefficients are free and fixed.

    ``P`` (e.g. the additive polynomials) enters through its factorisation ``block``
    (:func:`free_block` with the same ``weights``). With ``Q`` its orthonormal basis, the
    template coefficients solve the problem projected off ``P``: Gram matrix
    ``TᵀWWT − (QᵀWT)ᵀ(QᵀWT)`` and right-hand side ``TᵀWWy − (QᵀWT)ᵀQᵀWy``; then
    ``x_P = r⁻¹ Qᵀ W (y − T x_T)``. The solution is that of :func:`solve_linear` on the
    whole matrix (to rounding: the subtraction costs the digits by which ``P`` explains
    the templates, so float64 only), but the per-step work is
    ``n_T (n_T + n_P) n_pix`` instead of ``(n_T + n_P)² n_pix``: for 16 templates and an
    additive degree of 20, 2.3 times less.

    Parameters
    ----------
    T : (n_pix, n_T) array
    y, weights : (n_pix,) arrays
    nonneg, passive : (n_T,) bool
        As in :func:`nnls` (``passive`` may be None).
    block : FreeBlock

    Returns
    -------
    x_T : (n_T,) array
    x_P : (n_free,) array
    """
    if _single(T):
        raise ValueError("solve_projected loses the digits P explains in single precision: use solve_linear")
    Tw, yw = T * weights[:, None], y * weights
    c, c_y = block.q.T @ Tw, block.q.T @ yw
    gram = Tw.T @ Tw - c.T @ c
    rhs = Tw.T @ yw - c.T @ c_y
    diag = jnp.diagonal(gram)
    scale = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
    x_t = _solve_gram(gram / jnp.outer(scale, scale), rhs / scale, scale, nonneg, passive)
    x_p = jax.scipy.linalg.solve_triangular(block.r, c_y - c @ x_t, lower=False)
    return x_t, x_p


class LinearTerms(NamedTuple):
    """Which columns of a design matrix the profile likelihood solves for (a pytree).

    use : (n_lin,) bool
        Columns in the model (False: dropped, e.g. unused template slots).
    nonneg : (n_lin,) bool
        Columns whose coefficient must be ≥ 0 (template weights, unless PCA components).
    free : FreeBlock, optional
        The additive polynomials (the last columns, all used), factorised once, so that
        :func:`kinjax.models.forward_profile_loglike` solves for them by projection
        (:func:`solve_projected`; float64). :func:`profile_loglike` ignores it.
    """

    use: jax.Array
    nonneg: jax.Array
    free: FreeBlock | None = None


def profile_loglike(A, y, weights, terms: LinearTerms):
    """Log-likelihood with the linear parameters at their best values, ``-χ²_min / 2``.

    The best values are the non-negative least-squares solution (pPXF's choice: template
    weights ≥ 0, additive polynomial free; see :class:`LinearTerms`). The gradient with
    respect to anything ``A`` depends on is exact without differentiating the solver: at
    the optimum ∂χ²/∂x vanishes on the free coefficients and the active constraints hold
    x = 0 under small changes (envelope theorem), so the solution enters through
    ``stop_gradient``.

    Parameters
    ----------
    A : (n_pix, n_lin); y, weights : (n_pix,) (``weights = mask / noise``); terms : LinearTerms.
    """
    A = A * terms.use
    nonneg = terms.nonneg | ~terms.use  # a dropped (zero) column never enters the active set
    x = jax.lax.stop_gradient(solve_linear(jax.lax.stop_gradient(A), y, weights, nonneg, passive=terms.use))
    r = (A @ x - y) * weights
    return -0.5 * (r @ r)


def marginal_loglike(A, y, weights, prior_scale):
    """Log-likelihood with the linear parameters integrated out analytically.

    Not what kinjax's samplers use: with many similar templates the ``log det`` term of
    a wide Gaussian prior favours the LOSVDs that make the columns most collinear (broad
    ones), which moved S/N-30 posteriors far from the truth (see
    :func:`profile_loglike` and the NUTS calibration in ``benchmarks/RESULTS.md``).

    With ``y = A x + ε``, ``ε ~ N(0, diag(1/weights²))`` and the prior
    ``x ~ N(0, diag(prior_scale²))``, returns ``log p(y | A)`` up to terms that do not
    depend on ``A`` (the noise normalisation is omitted).

    Parameters
    ----------
    A : (n_pix, n_lin); y, weights : (n_pix,); prior_scale : (n_lin,) or scalar,
        prior standard deviation of each linear parameter (in data units per unit
        column amplitude; make it wide).
    """
    Aw = A * weights[:, None]
    yw = y * weights
    prior_scale = jnp.broadcast_to(prior_scale, (A.shape[1],))
    # work with x = prior_scale * u, u ~ N(0, I): M = I + Sᵀ AᵀWA S
    As = Aw * prior_scale
    m = jnp.eye(A.shape[1], dtype=A.dtype) + As.T @ As
    rhs = As.T @ yw
    # LU (not Cholesky: far slower for float64 on XLA:CPU); m is SPD so det > 0
    lu = jax.scipy.linalg.lu_factor(m)
    quad = rhs @ jax.scipy.linalg.lu_solve(lu, rhs)
    logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(lu[0]))))
    return -0.5 * (yw @ yw - quad) - 0.5 * logdet
